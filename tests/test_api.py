"""The public API as a whole: the layering of the package, and the vocabulary every entry point follows
(argument names, progress, batch_size, generator, the error prefix, old spellings naming the new)."""
import ast
import dataclasses
import importlib
import importlib.util
import inspect
import pathlib

import pytest
import torch
from torch import nn

import fisherext

PACKAGE = pathlib.Path(fisherext.__file__).parent

# The layers, top to bottom: a module may import only from its own layer's package or from layers below.
LAYERS = [
    {"cli", "__main__"},  # the command line, above everything it runs
    {"influence", "ewc", "optim", "attacks", "detect", "experiments"},
    {"capture", "curvature", "perturb", "gaussian"},
    {"linalg"},
    {"_core"},
    {"ops", "reference", "_C", "_version"},
]
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "__init__.py":
            continue
        yield rel, ast.parse(path.read_text())


def _imports(rel, tree):
    """(top-level package part imported, names imported) of every relative import of a module."""
    here = list(rel.parts[:-1])
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = here[:len(here) - (node.level - 1)] if node.level > 1 else here
            target = base + (node.module.split(".") if node.module else [])
            if not target:  # "from . import x" at the package root
                for alias in node.names:
                    yield alias.name, []
            else:
                yield target[0], [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fisherext."):
            yield node.module.split(".")[1], [a.name for a in node.names]


def _private(name):
    return name.startswith("_") and not name.startswith("__") and name != "_C"


@pytest.mark.parametrize("rel,tree", list(_modules()), ids=lambda v: str(v) if isinstance(v, pathlib.Path) else "")
def test_imports_never_run_up_and_take_no_private_names(rel, tree):
    own = rel.parts[0].removesuffix(".py")
    for target, names in _imports(rel, tree):
        if target == own:
            continue
        assert LAYER_OF[target] >= LAYER_OF[own], f"{rel} imports {target}, a higher layer"
        private = [n for n in names if _private(n)]
        assert not private, f"{rel} imports private names {private} from {target}"


def test_no_module_within_a_package_imports_private_names_of_a_sibling():
    for rel, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                private = [a.name for a in node.names if _private(a.name)]
                assert not private, f"{rel} imports private names {private}"


def test_no_module_is_named_like_a_function_it_exports():
    for name in fisherext.__all__:
        obj = getattr(fisherext, name)
        if inspect.isfunction(obj) or inspect.isclass(obj):
            assert importlib.util.find_spec(f"fisherext.{name}") is None, f"fisherext.{name} is also a module"


def _public_modules():
    mods = {fisherext}
    for name in fisherext.__all__:
        obj = getattr(fisherext, name)
        if inspect.ismodule(obj):
            mods.add(obj)
    for name in ("capture", "curvature", "perturb", "linalg", "experiments.gaussian_kl"):
        mods.add(importlib.import_module(f"fisherext.{name}"))
    return mods


def _entry_points():
    """(qualified name, callable) of every public function, class and public method of the package,
    except the compiled-op wrappers and their twins (which prefix their own errors)."""
    seen, out = set(), []
    for mod in _public_modules():
        if mod.__name__ in ("fisherext.ops", "fisherext.reference"):
            continue
        names = getattr(mod, "__all__", None) or [
            n for n, o in vars(mod).items() if not n.startswith("_") and getattr(o, "__module__", None) == mod.__name__]
        for name in names:
            obj = getattr(mod, name)
            if id(obj) in seen or not (inspect.isfunction(obj) or inspect.isclass(obj)) or dataclasses.is_dataclass(obj):
                continue
            if inspect.isclass(obj) and issubclass(obj, Warning):  # a warning category: raised, never called
                continue
            home = getattr(obj, "__module__", "") or ""
            if not home.startswith("fisherext") or home.startswith(("fisherext.ops", "fisherext._core.entry")):
                continue
            seen.add(id(obj))
            out.append((name, obj))
            if inspect.isclass(obj):
                for attr, member in vars(obj).items():
                    if inspect.isfunction(member) and not attr.startswith("_"):
                        out.append((f"{name}.{attr}", member))
    return sorted(out, key=lambda item: item[0])


ENTRY_POINTS = _entry_points()
OLD_SPELLINGS = {"loss_fn", "r", "seed"}


def _parameters(obj):
    fn = obj.__init__ if inspect.isclass(obj) else obj
    return inspect.signature(fn).parameters


def test_the_walk_sees_the_whole_api():
    names = {name for name, _ in ENTRY_POINTS}
    for expected in ("fisher", "per_sample_fisher", "hvp", "FisherMatrix", "FisherMatrix.solve", "HessianOperator",
                     "InfluenceFunctions", "InfluenceFunctions.influence", "fd_quadratic", "cg", "lanczos",
                     "mvn_fisher", "kl_vs_fisher_study", "flatten"):
        assert expected in names


@pytest.mark.parametrize("name,obj", ENTRY_POINTS, ids=[n for n, _ in ENTRY_POINTS])
def test_every_entry_point_is_wrapped_and_follows_the_vocabulary(name, obj):
    fn = obj.__init__ if inspect.isclass(obj) else obj
    assert hasattr(fn, "__fisherext_entry__"), f"{name} is not an entry point (@entry_point / @entry_points)"
    params = _parameters(obj)
    assert not OLD_SPELLINGS & params.keys(), f"{name} still takes {OLD_SPELLINGS & params.keys()}"
    streams = "data" in params or "train_data" in params
    if streams:
        for needed in ("progress", "batch_size"):
            assert needed in params, f"{name} streams over data but has no '{needed}'"
    if "kind" in params or "distribution" in params or "mc_samples" in params:
        assert "generator" in params, f"{name} draws random numbers but takes no 'generator'"
    if "generator" in params:
        assert params["generator"].default is None


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double().eval()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.arange(6) % 3
    return model, (x, y)


STREAMING_CALLS = {
    "fisher": lambda m, d, **kw: fisherext.fisher(m, d, **kw),
    "hvp": lambda m, d, **kw: fisherext.hvp(m, "cross_entropy", d, torch.zeros(31, dtype=torch.float64), **kw),
    "HessianOperator": lambda m, d, **kw: fisherext.HessianOperator(m, "cross_entropy", d, **kw),
    "GGNOperator": lambda m, d, **kw: fisherext.GGNOperator(m, "cross_entropy", d, **kw),
    "FisherOperator": lambda m, d, **kw: fisherext.FisherOperator(m, "cross_entropy", d, **kw),
    "InfluenceFunctions": lambda m, d, **kw: fisherext.InfluenceFunctions(m, "cross_entropy", d, **kw),
}


@pytest.mark.parametrize("entry", list(STREAMING_CALLS))
def test_errors_carry_the_prefix_and_name_the_argument(entry):
    model, data = _problem()
    with pytest.raises(ValueError, match=rf"^fisherext\.{entry}: argument 'batch_size' must be a positive integer"):
        STREAMING_CALLS[entry](model, data, batch_size=0)


@pytest.mark.parametrize("name,obj", [(n, o) for n, o in ENTRY_POINTS
                                      if getattr(o.__init__ if inspect.isclass(o) else o, "__fisherext_renamed__", None)],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_old_spellings_name_the_new_one(name, obj):
    fn = obj.__init__ if inspect.isclass(obj) else obj
    for old, new in fn.__fisherext_renamed__.items():
        with pytest.raises(TypeError, match=rf"^fisherext\.{name}: argument '{old}' is now called '{new}'"):
            obj(**{old: None})


def test_removed_modules_say_where_their_contents_went():
    with pytest.raises(AttributeError, match="fisherext.flatten"):
        fisherext.utils  # noqa: B018
    with pytest.raises(AttributeError, match="fisherext.per_sample_fisher"):
        fisherext.measures  # noqa: B018
