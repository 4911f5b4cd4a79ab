r"""The suite: the registry of every experiment and the runner behind ``fisherext suite``.

:data:`EXPERIMENTS` maps each experiment id to its :class:`~fisherext.experiments.registry.Experiment`, in
the order the report shows them: ``gaussian``, ``kl_fisher``, ``adversarial``, ``influence``, ``ewc``,
``sharpness``, ``curvature``. Each lives in its own module ``fisherext.experiments.<id>`` (defining
``EXPERIMENT``), imported only when the experiment is first looked up, so that listing the suite or running
one experiment does not import the others, and one module that fails to import fails only its own
experiment.

:func:`run_suite` runs the experiments asked for under one :class:`~fisherext.experiments.registry.Config`,
times each (``Result.seconds``, wall-clock), and writes ``report.md``, the PNG figures and ``results.json``
into the output folder (:mod:`fisherext.experiments.report`), rewritten after every experiment so that an
interrupted run leaves the report of what finished. An experiment that raises does not stop the others: it
becomes a :class:`Failure` (its error in the report and in ``results.json``), and the run's
:attr:`SuiteRun.status` is 1; a data set that is not on the machine (``data.DataUnavailable``) makes it 2,
the status of a usage error. Expected outcomes that do not hold are results, not errors: they leave the
status at 0 and the report lists them.
"""
from __future__ import annotations

import contextvars
import importlib
import json
import os
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from .._core.data import progress_bar
from .._core.entry import entry_point, entry_points
from . import report
from .data import DataUnavailable
from .registry import Config, Experiment, Result

__all__ = ["EXPERIMENTS", "IDS", "Failure", "Registry", "SuiteRun", "run_suite"]

#: The experiment ids in report order; each is the module ``fisherext.experiments.<id>``.
IDS = ("gaussian", "kl_fisher", "adversarial", "influence", "ewc", "sharpness", "curvature")


@entry_points
class Registry(Mapping):
    """A read-only mapping id → :class:`Experiment` whose entries are imported on first access.

    Args:
        ids: the experiment ids, in order (iteration, ``keys()`` and the report follow it).
        package: the package holding one module per id, each defining ``EXPERIMENT`` (an
            :class:`Experiment` whose ``id`` is the module's name).

    Looking up an id whose module is missing or broken raises the import's error (``ImportError`` and
    others) with the module named; a module without a matching ``EXPERIMENT`` raises ``TypeError``.
    Membership (``id in registry``) and iteration never import anything.
    """

    def __init__(self, ids: Sequence[str], package: str):
        ids = tuple(ids)
        if len(set(ids)) != len(ids):
            raise ValueError(f"ids: repeated experiment ids in {list(ids)}")
        self._ids = ids
        self._package = package
        self._loaded: dict[str, Experiment] = {}

    def __getitem__(self, key: str) -> Experiment:
        if key not in self._ids:
            raise KeyError(key)
        if key not in self._loaded:
            module = importlib.import_module(f"{self._package}.{key}")
            experiment = getattr(module, "EXPERIMENT", None)
            if not isinstance(experiment, Experiment) or experiment.id != key:
                raise TypeError(f"{module.__name__} must define EXPERIMENT = Experiment(id={key!r}, ...), "
                                f"found {experiment!r}")
            self._loaded[key] = experiment
        return self._loaded[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._ids)

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, key) -> bool:
        return key in self._ids

    def __repr__(self) -> str:
        return f"Registry({list(self._ids)}, {self._package!r})"


#: Every experiment of the suite, id → Experiment, in report order (imported lazily; see :class:`Registry`).
EXPERIMENTS: Mapping[str, Experiment] = Registry(IDS, __name__.rpartition(".")[0])


@dataclass
class Failure:
    """An experiment that raised instead of returning its :class:`Result`: its ``id`` and ``title`` (the id
    when the module could not even be imported), the ``error`` (``"TypeName: message"``), the formatted
    ``details`` (traceback), ``seconds`` until it raised, and whether the cause is a data set missing from
    the machine (``data_unavailable``)."""
    id: str
    title: str
    error: str
    details: str
    seconds: float = 0.0
    data_unavailable: bool = False

    def to_json(self) -> dict:
        """The entry of ``results.json``: ``{"error", "outcomes": [], "seconds"}``."""
        return {"error": self.error, "outcomes": [], "seconds": self.seconds}


@dataclass
class SuiteRun:
    """What :func:`run_suite` did: ``results`` (id → :class:`Result` or :class:`Failure`, in report order),
    the output folder ``out_dir``, the total wall-clock ``seconds``, and ``figure_errors`` (id → {figure
    name: error} of the figures that could not be drawn or saved)."""
    results: dict[str, Result | Failure]
    out_dir: str
    seconds: float
    figure_errors: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def report_path(self) -> str:
        """The path of ``report.md``."""
        return os.path.join(self.out_dir, report.REPORT_NAME)

    @property
    def json_path(self) -> str:
        """The path of ``results.json``."""
        return os.path.join(self.out_dir, report.JSON_NAME)

    @property
    def failures(self) -> list[Failure]:
        """The experiments that failed, in report order."""
        return [r for r in self.results.values() if isinstance(r, Failure)]

    @property
    def outcomes(self) -> list[tuple[str, object]]:
        """(experiment id, Outcome) of every experiment that ran to the end."""
        return [(i, o) for i, r in self.results.items() if isinstance(r, Result) for o in r.outcomes]

    @property
    def status(self) -> int:
        """2 when a data set was missing, 1 when an experiment failed or a figure could not be drawn, else 0
        (outcomes that did not hold are reported, not errors)."""
        if any(f.data_unavailable for f in self.failures):
            return 2
        if self.failures or any(self.figure_errors.values()):
            return 1
        return 0


def _select(ids: Iterable[str] | None, experiments: Mapping[str, Experiment]) -> list[str]:
    if ids is None:
        return list(experiments)
    if isinstance(ids, str):
        ids = [ids]
    ids = list(ids)
    unknown = [i for i in ids if i not in experiments]
    if unknown:
        raise ValueError(f"ids: unknown experiment {unknown[0]!r}; the experiments are {', '.join(experiments)}")
    if not ids:
        raise ValueError("ids: no experiment asked for")
    # Report order, whatever the order asked in; an id asked twice runs once.
    return [i for i in experiments if i in ids]


def _failure(exp_id: str, title: str, err: BaseException, seconds: float) -> Failure:
    return Failure(exp_id, title, f"{type(err).__name__}: {err}",
                   "".join(traceback.format_exception(type(err), err, err.__traceback__)),
                   seconds, isinstance(err, DataUnavailable))


def _run_one(exp_id: str, config: Config, experiments: Mapping[str, Experiment]) -> tuple[Result | Failure, str]:
    """The experiment's Result or Failure, and its seeds ("" when it could not be looked up)."""
    title, seeds = exp_id, ""
    start = time.perf_counter()
    try:
        experiment = experiments[exp_id]
        title, seeds = experiment.title, experiment.seeds
        # A fresh context: run_suite is an entry point itself, and inside it the library's entry points
        # would take their calls for nested ones and leave their errors without the "fisherext.<name>:" prefix.
        result = contextvars.Context().run(experiment.run, config)
        if not isinstance(result, Result):
            raise TypeError(f"the run of {exp_id!r} returned {type(result).__name__}, not a Result")
        result.seconds = time.perf_counter() - start
        # Caught here, where the experiment is named, rather than when results.json is written.
        json.dumps(report.jsonable(result.to_json(), where=f"results[{exp_id!r}]"), allow_nan=False)
        return result, seeds
    except Exception as err:  # noqa: BLE001 (any error of one experiment must not stop the others)
        return _failure(exp_id, title, err, time.perf_counter() - start), seeds


def _line(exp_id: str, result: Result | Failure) -> str:
    if isinstance(result, Failure):
        return f"{exp_id}: FAILED after {result.seconds:.1f} s: {result.error}"
    held = sum(bool(o.held) for o in result.outcomes)
    return f"{exp_id}: {held} of {len(result.outcomes)} expected outcomes held ({result.seconds:.1f} s)"


@entry_point
def run_suite(ids: Iterable[str] | None = None, config: Config | None = None,
              out_dir: str | os.PathLike = "fisherext-report", *, command: str | None = None,
              echo: Callable[[str], None] | None = None) -> SuiteRun:
    """Runs experiments of :data:`EXPERIMENTS` and writes their report.

    Args:
        ids: experiment ids (a subset of :data:`EXPERIMENTS`; they run in report order, each once), or None
            for all of them.
        config: the :class:`Config` every experiment runs under (default ``Config()``: full sizes, CPU,
            seed 0, no progress bars). With ``config.progress`` a tqdm bar counts the experiments.
        out_dir: the folder receiving ``report.md``, ``results.json`` and the figures ``<name>.png``
            (created when missing; files of the same names are overwritten).
        command: the command line shown in the report's header (default: a Python call).
        echo: called with one line per finished experiment (its held count and time, or its error);
            None prints nothing.

    Returns:
        A :class:`SuiteRun`: the results by id (:class:`Result`, with ``seconds`` set, or
        :class:`Failure`), the paths written, the total time and the exit ``status``.

    Raises ``ValueError`` for an unknown id; an error inside an experiment is caught and reported.
    """
    config = Config() if config is None else config
    if not isinstance(config, Config):
        raise TypeError(f"config: expected a fisherext.experiments.registry.Config, got {type(config).__name__}")
    experiments = EXPERIMENTS
    selected = _select(ids, experiments)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    if command is None:
        command = f"fisherext.experiments.suite.run_suite({selected!r}, {config!r})"
    results: dict[str, Result | Failure] = {}
    figure_errors: dict[str, dict[str, str]] = {}
    seeds: dict[str, str] = {}
    start = time.perf_counter()
    # At once, so that the report of an earlier run in this folder is never taken for this one's.
    report.write_report(results, out_dir, config=config, command=command, seconds=0.0)
    bar = progress_bar(None, config.progress, desc="fisherext suite", total=len(selected), unit="experiment")
    with bar:
        for exp_id in selected:
            if hasattr(bar, "set_postfix_str"):
                bar.set_postfix_str(exp_id)
            result, seeds[exp_id] = _run_one(exp_id, config, experiments)
            results[exp_id] = result
            if isinstance(result, Result):
                figure_errors[exp_id] = report.write_figures(result, out_dir)
            report.write_report(results, out_dir, config=config, command=command,
                                seconds=time.perf_counter() - start, figure_errors=figure_errors, seeds=seeds)
            bar.update(1)
            if echo is not None:
                echo(_line(exp_id, result))
    return SuiteRun(results, out_dir, time.perf_counter() - start,
                    {k: v for k, v in figure_errors.items() if v})
