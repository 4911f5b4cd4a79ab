r"""The suite's experiments: what each one is, how it is run, and what it reports.

An :class:`Experiment` names itself (``id``, the seeds it comes from, a title) and runs under a
:class:`Config` (quick or full sizes, device, seed, data root, progress) into a :class:`Result`: the
measured figures (``data``, JSON-able), tables and figures for the report, and its expected outcomes, each
an :class:`Outcome` stating a claim, whether it held, and the measured value it was judged on.
``fisherext suite`` runs the experiments of :data:`EXPERIMENTS` and writes ``report.md``, the figures and
``results.json`` (``{id: {**data, "outcomes": [{"claim", "held", "value"}], "seconds"}}``).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Config:
    """How an experiment runs: ``quick`` (small sizes, for a first look and the tests) or full, the
    ``device``, the ``seed`` every random draw derives from, ``data_root`` (where torchvision data sets
    are looked for; None: the embedded digits only) and ``progress`` (tqdm bars)."""
    quick: bool = False
    device: str = "cpu"
    seed: int = 0
    data_root: str | None = None
    progress: bool = False

    def generator(self, offset: int = 0) -> torch.Generator:
        """A CPU generator seeded with ``seed + offset`` (distinct offsets for independent draws)."""
        return torch.Generator().manual_seed(self.seed + offset)


@dataclass(frozen=True)
class Outcome:
    """An expected outcome: the ``claim`` (a sentence), whether it ``held`` in this run, and the measured
    ``value`` it was judged on (a number; the claim says what it is and what it was compared with)."""
    claim: str
    held: bool
    value: float

    def to_json(self) -> dict:
        return {"claim": self.claim, "held": bool(self.held), "value": float(self.value)}


@dataclass(frozen=True)
class Table:
    """A table of the report: a ``title``, the column ``header`` and the ``rows`` (cells already
    formatted as strings, or numbers, formatted by the report)."""
    title: str
    header: list[str]
    rows: list[list]


@dataclass(frozen=True)
class Figure:
    """A figure of the report, saved as ``<name>.png``: ``plot(fig)`` draws on an empty
    ``matplotlib.figure.Figure`` (the report creates and saves it; experiments import matplotlib only
    inside ``plot``); ``caption`` says what it shows."""
    name: str
    caption: str
    plot: Callable


@dataclass
class Result:
    """What an experiment run produced (see the module docstring); ``seconds`` is filled in by the runner."""
    id: str
    title: str
    summary: str
    data: dict
    outcomes: list[Outcome]
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {**self.data, "outcomes": [o.to_json() for o in self.outcomes], "seconds": self.seconds}


@dataclass(frozen=True)
class Experiment:
    """One experiment of the suite: ``id`` (what ``--only`` takes), the ``seeds`` it comes from (e.g.
    "000 + 004"), a ``title``, and ``run(config) -> Result``."""
    id: str
    seeds: str
    title: str
    run: Callable[[Config], Result]

    def __call__(self, config: Config) -> Result:
        return self.run(config)
