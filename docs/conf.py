"""Sphinx configuration of the fisherext API reference (``make docs``; built with warnings as errors)."""
import fisherext

project = "fisherext"
release = version = fisherext.__version__
copyright = "fisherext authors"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

# Google-style docstrings only.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"
autodoc_default_options = {"members": True, "show-inheritance": True}
# The shared argument types render under their names (see the types page), not expanded into Unions.
autodoc_type_aliases = {name: f"fisherext._core.types.{name}" for name in ("Params", "Data", "Loss")}
python_use_unqualified_type_names = True

html_theme = "furo"
html_title = f"fisherext {release}"
exclude_patterns = ["_build"]


# ---- the top-level exports table, and references to the package checked and resolved ----
import importlib
import inspect

from sphinx.util import inspect as sphinx_inspect
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import make_refnode

logger = logging.getLogger(__name__)

def _lookup(name):
    """The object named by the dotted ``name`` (a module, or an attribute path inside one), else None."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


def _summary(obj):
    """The first paragraph of an object's docstring, on one line."""
    doc = inspect.getdoc(obj) or ""
    return " ".join(doc.split("\n\n")[0].split())


class ExportsTable(SphinxDirective):
    """``.. fisherext-exports::``: a table of ``fisherext.__all__``, each name linked (by :func:`_resolve`)
    to where its object is documented, with the first paragraph of its docstring."""

    def run(self):
        lines = [".. list-table::", "   :widths: 30 70", ""]
        for name in fisherext.__all__:
            if name == "__version__":
                continue
            obj = getattr(fisherext, name)
            role = "mod" if inspect.ismodule(obj) else "obj"
            lines += [f"   * - :py:{role}:`fisherext.{name}`", f"     - {_summary(obj)}"]
        return self.parse_text_to_nodes("\n".join(lines))


class KernelFamily(SphinxDirective):
    """``.. fisherext-family:: fisherext.ops.<family>``: a section with the family module's docstring and
    every op of ``fisherext.ops.__all__`` defined there, documented under its public name."""

    required_arguments = 1

    def run(self):
        family = importlib.import_module(self.arguments[0])
        short = family.__name__.rpartition(".")[2]
        ops = importlib.import_module("fisherext.ops")
        names = [name for name in ops.__all__ if getattr(getattr(ops, name), "__module__", None) == family.__name__]
        lines = [f"``{short}``", "-" * (len(short) + 4), "", inspect.getdoc(family), ""]
        lines += [f".. autofunction:: fisherext.ops.{name}" for name in names]
        return self.parse_text_to_nodes("\n".join(lines), allow_section_headings=True)


# The public modules: every name of their ``__all__`` (or, without one, every public function and class
# they define) must be documented, under that name or another.
PUBLIC = ["fisherext", "fisherext.capture", "fisherext.curvature", "fisherext.perturb", "fisherext.gaussian",
          "fisherext.linalg", "fisherext.linalg.linop", "fisherext.linalg.solvers", "fisherext.linalg.spectral",
          "fisherext.influence", "fisherext.ewc", "fisherext.optim", "fisherext.attacks", "fisherext.detect",
          "fisherext.experiments", "fisherext.experiments.gaussian_kl", "fisherext.experiments.suite",
          "fisherext.experiments.report", "fisherext.cli", "fisherext.ops",
          "fisherext.reference", "fisherext._core.types"]


def _public_names(module):
    if hasattr(module, "__all__"):
        return [name for name in module.__all__ if name != "__version__"]
    return [name for name, obj in vars(module).items() if not name.startswith("_")
            and (inspect.isfunction(obj) or inspect.isclass(obj)) and obj.__module__ == module.__name__]


def _check_public(app, env):
    """A build warning for every public name that no page documents."""
    domain = env.get_domain("py")
    _index(domain)
    for modname in PUBLIC:
        module = importlib.import_module(modname)
        for name in _public_names(module):
            obj = getattr(module, name)
            if not (f"{modname}.{name}" in domain.objects
                    or inspect.ismodule(obj) and obj.__name__ in domain.objects
                    or not inspect.ismodule(obj) and callable(obj) and id(obj) in _documented):
                logger.warning("%s.%s is public but not documented", modname, name)


_documented = {}  # id of a documented (non-data) object -> its entry in the Python domain


def _index(domain):
    if not _documented:
        for full, documented in domain.objects.items():
            if documented.objtype not in ("data", "attribute"):
                _documented.setdefault(id(_lookup(full)), documented)


def _resolve(app, env, node, contnode):
    """Python references to ``fisherext...`` names that Sphinx did not resolve: an alias of a documented
    object (``fisherext.FisherMatrix``, a class under its defining module) or a documented type alias
    referenced as a class links to it; a name that does not exist (a dead reference) or a public name that
    is not documented is a build warning."""
    target = node.get("reftarget", "")
    if node.get("refdomain") != "py" or target.split(".")[0] != "fisherext":
        return None
    domain = env.get_domain("py")
    entry = domain.objects.get(target)
    if entry is None:
        obj = _lookup(target)
        if obj is None:
            logger.warning("reference to %s, which does not exist", target, location=node)
            return None
        _index(domain)
        entry = _documented.get(id(obj))
        if entry is None:
            if not any(part.startswith("_") for part in target.split(".")):
                logger.warning("reference to %s, which is not documented", target, location=node)
            return None
    return make_refnode(app.builder, node["refdoc"], entry.docname, entry.node_id, contnode, target)


def _alias_inside_expressions():
    """An alias inside a type expression (``Data | None``) renders under its name too: Sphinx's stand-in
    for an alias gets the ``__module__`` and ``__qualname__`` that its annotation formatter reads."""
    ref = sphinx_inspect.TypeAliasForwardRef
    init = ref.__init__

    def __init__(self, name):
        init(self, name)
        self.__module__, _, self.__qualname__ = name.rpartition(".")

    ref.__init__ = __init__


def setup(app):
    _alias_inside_expressions()
    app.add_directive("fisherext-exports", ExportsTable)
    app.add_directive("fisherext-family", KernelFamily)
    app.connect("env-check-consistency", _check_public)
    app.connect("missing-reference", _resolve)
