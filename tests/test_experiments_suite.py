"""The suite's registry and runner: lazy per-id modules, run order, timing, failures that do not stop the
others, the exit status, and the outputs rewritten after every experiment."""
import importlib.util
import json
import sys
import time

import matplotlib

matplotlib.use("Agg")
import pytest  # noqa: E402
import torch  # noqa: E402

import fisherext  # noqa: E402

from fisherext.experiments import suite  # noqa: E402
from fisherext.experiments.data import DataUnavailable  # noqa: E402
from fisherext.experiments.registry import Config, Experiment, Figure, Outcome, Result  # noqa: E402

SEVEN = ["gaussian", "kl_fisher", "adversarial", "influence", "ewc", "sharpness", "curvature"]


def _line(fig):
    fig.add_subplot().plot([0, 1], [0, 1])


class Fake:
    """An experiment whose run records the configs it got and does what ``behaviour`` says."""

    def __init__(self, exp_id, behaviour="ok"):
        self.id, self.behaviour, self.configs = exp_id, behaviour, []

    def run(self, config):
        self.configs.append(config)
        if self.behaviour == "raise":
            raise RuntimeError(f"{self.id} exploded")
        if self.behaviour == "data":
            raise DataUnavailable("data: mnist is not under '/nowhere'")
        if self.behaviour == "interrupt":
            raise KeyboardInterrupt
        if self.behaviour == "library error":
            model = torch.nn.Linear(2, 2)
            fisherext.fisher(model, (torch.zeros(4, 2), torch.zeros(4, dtype=torch.long)), batch_size=0)
        if self.behaviour == "sleep":
            time.sleep(0.02)
        draw = torch.randn(3, generator=config.generator(1)).tolist()
        data = {"draw": draw, "quick": config.quick}
        if self.behaviour == "tensor":
            data["bad"] = object()
        figures = [Figure(f"{self.id}_line", "a line", _line)]
        if self.behaviour == "figure":
            figures.append(Figure(f"{self.id}_broken", "broken", lambda fig: 1 / 0))
        return Result(self.id, f"Title of {self.id}", "summary", data,
                      [Outcome(f"{self.id} holds", True, 1.0), Outcome(f"{self.id} fails", False, 2.0)],
                      figures=figures)

    def experiment(self):
        return Experiment(self.id, "000", f"Title of {self.id}", self.run)


@pytest.fixture
def fakes(monkeypatch):
    """Installs a registry of fake experiments: fakes("a", ("b", "raise"), ...) → {id: Fake}."""
    def install(*specs):
        made = {}
        for spec in specs:
            exp_id, behaviour = (spec, "ok") if isinstance(spec, str) else spec
            made[exp_id] = Fake(exp_id, behaviour)
        monkeypatch.setattr(suite, "EXPERIMENTS", {i: f.experiment() for i, f in made.items()})
        return made
    return install


# ---- the registry ---------------------------------------------------------------------------------

def test_the_registry_lists_the_seven_experiments_in_report_order_without_importing_them():
    before = set(sys.modules)
    assert list(suite.EXPERIMENTS) == SEVEN == list(suite.IDS)
    assert len(suite.EXPERIMENTS) == 7 and "ewc" in suite.EXPERIMENTS and "nope" not in suite.EXPERIMENTS
    assert not {m for m in set(sys.modules) - before if m.startswith("fisherext.experiments.")}


@pytest.mark.parametrize("exp_id", SEVEN)
def test_each_experiment_module_defines_its_experiment(exp_id):
    if importlib.util.find_spec(f"fisherext.experiments.{exp_id}") is None:
        pytest.skip(f"fisherext/experiments/{exp_id}.py is not written yet")
    experiment = suite.EXPERIMENTS[exp_id]
    assert isinstance(experiment, Experiment) and experiment.id == exp_id
    assert experiment.title and experiment.seeds is not None and callable(experiment.run)


@pytest.fixture
def package(tmp_path, monkeypatch):
    root = tmp_path / "fakesuite"
    root.mkdir()
    (root / "__init__.py").write_text("")
    header = "from fisherext.experiments.registry import Experiment\n"
    (root / "alpha.py").write_text(header + "EXPERIMENT = Experiment('alpha', '000', 'Alpha', lambda c: None)\n")
    (root / "wrong.py").write_text(header + "EXPERIMENT = Experiment('other', '000', 'Other', lambda c: None)\n")
    (root / "broken.py").write_text("raise ImportError('broken needs a missing package')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "fakesuite"
    for name in [m for m in sys.modules if m.startswith("fakesuite")]:
        del sys.modules[name]


def test_registry_imports_a_module_on_first_lookup_only(package):
    registry = suite.Registry(["alpha", "wrong", "broken", "ghost"], package)
    assert "alpha" in registry and list(registry) == ["alpha", "wrong", "broken", "ghost"]
    assert "fakesuite.alpha" not in sys.modules
    experiment = registry["alpha"]
    assert "fakesuite.alpha" in sys.modules
    assert experiment.id == "alpha" and experiment.title == "Alpha" and registry["alpha"] is experiment


def test_registry_errors_name_the_module(package):
    registry = suite.Registry(["alpha", "wrong", "broken", "ghost"], package)
    with pytest.raises(TypeError, match=r"fakesuite\.wrong must define EXPERIMENT = Experiment\(id='wrong'"):
        registry["wrong"]
    with pytest.raises(ImportError, match="broken needs a missing package"):
        registry["broken"]
    with pytest.raises(ModuleNotFoundError, match="fakesuite.ghost"):
        registry["ghost"]
    with pytest.raises(KeyError):
        registry["nope"]
    with pytest.raises(ValueError, match=r"^fisherext\.Registry: argument 'ids' repeated experiment ids"):
        suite.Registry(["a", "a"], package)


# ---- the runner -----------------------------------------------------------------------------------

def test_run_suite_runs_each_experiment_once_in_report_order_with_the_config(fakes, tmp_path):
    made = fakes("a", "b", "c")
    config = Config(quick=True, seed=5)
    run = suite.run_suite(["c", "a", "c"], config, tmp_path)
    assert list(run.results) == ["a", "c"]
    assert made["a"].configs == [config] and made["c"].configs == [config] and made["b"].configs == []
    assert run.status == 0 and run.failures == [] and run.figure_errors == {}
    assert [(i, o.claim) for i, o in run.outcomes] == [("a", "a holds"), ("a", "a fails"), ("c", "c holds"),
                                                       ("c", "c fails")]
    assert run.report_path == str(tmp_path / "report.md") and run.json_path == str(tmp_path / "results.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_line.png", "c_line.png", "report.md", "results.json"]


def test_run_suite_runs_everything_by_default_and_is_deterministic_for_a_seed(fakes, tmp_path):
    fakes("a", "b")
    first = suite.run_suite(None, Config(seed=3), tmp_path / "one")
    second = suite.run_suite(None, Config(seed=3), tmp_path / "two")
    other = suite.run_suite(None, Config(seed=4), tmp_path / "three")
    assert list(first.results) == ["a", "b"]
    assert first.results["a"].data == second.results["a"].data != other.results["a"].data


def test_run_suite_times_each_experiment(fakes, tmp_path):
    fakes(("slow", "sleep"))
    run = suite.run_suite(None, Config(), tmp_path)
    assert 0.02 <= run.results["slow"].seconds <= run.seconds
    assert json.loads((tmp_path / "results.json").read_text())["slow"]["seconds"] == run.results["slow"].seconds


def test_a_failing_experiment_is_reported_and_the_others_still_run(fakes, tmp_path):
    made = fakes("a", ("b", "raise"), "c")
    lines = []
    run = suite.run_suite(None, Config(), tmp_path, echo=lines.append)
    assert made["c"].configs, "the experiment after the failing one did not run"
    assert run.status == 1 and [f.id for f in run.failures] == ["b"]
    failure = run.results["b"]
    assert failure.error == "RuntimeError: b exploded" and "Traceback" in failure.details
    assert failure.title == "Title of b" and not failure.data_unavailable
    data = json.loads((tmp_path / "results.json").read_text())
    assert list(data) == ["a", "b", "c"] and data["b"]["error"] == "RuntimeError: b exploded"
    text = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "## 2. Title of b (`b`)" in text and "## 3. Title of c (`c`)" in text
    assert lines[1] == f"b: FAILED after {failure.seconds:.1f} s: RuntimeError: b exploded"
    assert lines[0] == f"a: 1 of 2 expected outcomes held ({run.results['a'].seconds:.1f} s)"


def test_errors_of_library_calls_inside_an_experiment_keep_their_prefix(fakes, tmp_path):
    fakes(("a", "library error"))
    run = suite.run_suite(None, Config(), tmp_path)
    assert run.results["a"].error.startswith("ValueError: fisherext.fisher: argument 'batch_size' must be a positive")


def test_missing_data_gives_status_2(fakes, tmp_path):
    fakes(("a", "data"), ("b", "raise"), "c")
    run = suite.run_suite(None, Config(), tmp_path)
    assert run.status == 2 and run.results["a"].data_unavailable
    assert run.results["a"].error == "DataUnavailable: data: mnist is not under '/nowhere'"
    assert "c" in json.loads((tmp_path / "results.json").read_text())


def test_results_that_results_json_cannot_hold_fail_their_experiment(fakes, tmp_path):
    fakes(("a", "tensor"), "b")
    run = suite.run_suite(None, Config(), tmp_path)
    assert run.status == 1
    assert run.results["a"].error == ("TypeError: results['a']['bad'] is of type object, which results.json "
                                     "cannot hold (use numbers, strings, lists and dicts)")
    assert list(json.loads((tmp_path / "results.json").read_text())) == ["a", "b"]


def test_a_broken_figure_gives_status_1_and_keeps_the_results(fakes, tmp_path):
    fakes(("a", "figure"))
    run = suite.run_suite(None, Config(), tmp_path)
    assert run.status == 1 and run.failures == []
    assert run.figure_errors == {"a": {"a_broken": "ZeroDivisionError: division by zero"}}
    assert (tmp_path / "a_line.png").is_file() and not (tmp_path / "a_broken.png").exists()


def test_an_interrupted_run_leaves_the_report_of_what_finished(fakes, tmp_path):
    fakes("a", ("b", "interrupt"))
    with pytest.raises(KeyboardInterrupt):
        suite.run_suite(None, Config(), tmp_path)
    assert list(json.loads((tmp_path / "results.json").read_text())) == ["a"]
    assert "## 1. Title of a (`a`)" in (tmp_path / "report.md").read_text(encoding="utf-8")
    # interrupted in its first experiment, a run replaces the report of an earlier one at once
    fakes(("c", "interrupt"))
    with pytest.raises(KeyboardInterrupt):
        suite.run_suite(None, Config(), tmp_path)
    assert json.loads((tmp_path / "results.json").read_text()) == {}
    assert "Title of a" not in (tmp_path / "report.md").read_text(encoding="utf-8")


def test_progress_bar_counts_experiments(fakes, tmp_path, capsys):
    fakes("a", "b")
    suite.run_suite(None, Config(progress=True), tmp_path)
    err = capsys.readouterr().err
    assert "fisherext suite" in err and "2/2" in err


def test_run_suite_refuses_bad_arguments(fakes, tmp_path):
    fakes("a")
    with pytest.raises(ValueError, match=r"^fisherext\.run_suite: argument 'ids' unknown experiment 'z'; "
                                         r"the experiments are a$"):
        suite.run_suite(["z"], Config(), tmp_path)
    with pytest.raises(ValueError, match=r"argument 'ids' no experiment asked for"):
        suite.run_suite([], Config(), tmp_path)
    with pytest.raises(TypeError, match=r"argument 'config' expected a fisherext\.experiments\.registry\.Config"):
        suite.run_suite(None, {"quick": True}, tmp_path)
