r"""The suite's outputs: ``report.md``, one PNG per figure, and ``results.json``.

``report.md`` opens with a header (the command, date, machine, torch and fisherext versions, device, seed,
quick or full sizes, total time), then a summary table of every expected outcome of every experiment
(experiment, claim, measured value, held ✓ / not held ✗), then one section per experiment: its title,
seeds and time, its summary, its tables, its figures embedded as ``![caption](<name>.png)`` with their
captions, and its expected outcomes with their values. An experiment that failed gets its error instead.

Figures are drawn by each :class:`~fisherext.experiments.registry.Figure`'s ``plot(fig)`` on a fresh
``matplotlib.figure.Figure`` (Agg canvas, 6.4 × 4.2 in at 100 dpi unless ``plot`` resizes it, constrained
layout unless ``plot`` calls ``fig.tight_layout()`` or sets another engine, e.g.
``fig.set_layout_engine(None)`` before placing axes by hand; matplotlib's global pyplot state is never
touched) and saved as ``<name>.png`` beside the report; a name that does not
start with its experiment's id gets the id as a prefix, so that figures of different experiments never
share a file. A plot that raises is reported in place of its image, never aborting the report.

``results.json`` is the layout DESIGN.md pins: an object keyed by experiment id, each value
``{**data, "outcomes": [{"claim": str, "held": bool, "value": number | null}], "seconds": number}``
(:meth:`Result.to_json`), ``{"error": str, "outcomes": [], "seconds": number}`` for a failed experiment;
non-finite floats (NaN, ±inf) are written as ``null`` so that the file is strict JSON.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import re
import warnings
from collections.abc import Mapping

import torch

from .._core.entry import entry_point
from .._version import __version__
from ..ops import build_info
from .registry import Config, Result, Table

__all__ = ["JSON_NAME", "REPORT_NAME", "figure_file", "format_value", "jsonable", "markdown_table",
           "write_figures", "write_json", "write_report"]

#: The report's file name in the output folder.
REPORT_NAME = "report.md"
#: The machine-readable results' file name in the output folder.
JSON_NAME = "results.json"
FIGURE_SIZE = (6.4, 4.2)  # inches; at FIGURE_DPI a 640 × 420 px PNG, a few tens of kB
FIGURE_DPI = 100
HELD, NOT_HELD = "✓", "✗"
# Figure names become file names: letters, digits, '_', '-', '.' only (no folders, no spaces).
_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_TRACEBACK_LINES = 25  # of a failure's traceback, the last lines shown in the report


# ---- values -------------------------------------------------------------------------------------

@entry_point
def jsonable(obj, *, where: str = "results"):
    """A copy of ``obj`` that ``json.dumps(..., allow_nan=False)`` accepts: dicts (keys made strings),
    lists and tuples (as lists), str, bool, int, None, finite floats; NaN and ±inf become None; numpy
    values and torch tensors become their ``tolist()``.

    Args:
        obj: the value to convert.
        where: how ``obj`` is named in the error message (the path of a nested value is appended).

    Raises ``TypeError`` naming the path of the first value of another type (``results['id']['key'][2]``).
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        out = {}
        for key, value in obj.items():
            if not isinstance(key, (str, int, float, bool)):
                raise TypeError(f"{where} has a key of type {type(key).__name__}, not a string")
            out[str(key)] = jsonable(value, where=f"{where}[{key!r}]")
        return out
    if isinstance(obj, (list, tuple)):
        return [jsonable(v, where=f"{where}[{i}]") for i, v in enumerate(obj)]
    if hasattr(obj, "tolist") and callable(obj.tolist):  # numpy scalars and arrays, torch tensors
        return jsonable(obj.tolist(), where=where)
    raise TypeError(f"{where} is of type {type(obj).__name__}, which results.json cannot hold "
                    f"(use numbers, strings, lists and dicts)")


@entry_point
def format_value(value) -> str:
    """A table cell or measured value as text: floats with 4 significant digits (``0.3333``,
    ``1.235e+04``), ints in full, booleans as yes / no, other values by ``str``."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.4g}"
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # a numpy or torch scalar
        return format_value(value.item())
    return str(value)


def _cell(value) -> str:
    # A cell must stay on one line and not end the column early.
    return format_value(value).replace("|", r"\|").replace("\r", "").replace("\n", "<br>")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@entry_point
def markdown_table(table: Table) -> str:
    """A :class:`Table` as a GitHub-flavoured markdown table (its title is not included): cells by
    :func:`format_value`, columns of numbers right-aligned; rows shorter than the header are padded with
    empty cells, and the header with empty titles when a row is longer."""
    width = max([len(table.header)] + [len(row) for row in table.rows])
    header = list(table.header) + [""] * (width - len(table.header))
    rows = [list(row) + [""] * (width - len(row)) for row in table.rows]
    numeric = [bool(rows) and all(_is_number(row[c]) for row in rows) for c in range(width)]
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |",
             "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


# ---- figures ------------------------------------------------------------------------------------

@entry_point
def figure_file(result: Result, name: str) -> str:
    """The PNG file name of ``result``'s figure ``name``: ``<name>.png``, prefixed with ``<id>_`` when the
    name does not start with the experiment's id."""
    stem = name if name.startswith(result.id) else f"{result.id}_{name}"
    return f"{stem}.png"


def _draw(figure, path: str) -> None:
    # A Figure of its own (not pyplot): no global state, no GUI backend, nothing left open afterwards.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as MplFigure

    # Constrained layout from the start (colorbars and legends placed with it in mind); a plot that wants
    # another calls fig.tight_layout() or fig.set_layout_engine(...) itself.
    fig = MplFigure(figsize=FIGURE_SIZE, dpi=FIGURE_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    with warnings.catch_warnings():
        # tight_layout() on this figure replaces the constrained layout, as asked: nothing to warn about.
        warnings.filterwarnings("ignore", message="The figure layout has changed to tight")
        figure.plot(fig)
    fig.savefig(path, format="png", dpi=FIGURE_DPI)


@entry_point
def write_figures(result: Result, out_dir: str | os.PathLike) -> dict[str, str]:
    """Draws and saves every figure of ``result`` as a PNG in ``out_dir`` (file names by
    :func:`figure_file`).

    Returns:
        The figures that could not be drawn or saved, name → ``"TypeName: message"`` (empty when all
        were written). A failed figure leaves no file behind (an older file of that name is removed), and
        does not stop the others.
    """
    errors: dict[str, str] = {}
    seen: set[str] = set()
    for figure in result.figures:
        name = str(getattr(figure, "name", ""))
        try:
            if not _SAFE_NAME.fullmatch(name):
                raise ValueError(f"figure name {name!r}: use letters, digits, '_', '-' and '.' only")
            if name in seen:
                raise ValueError(f"figure name {name!r} is used twice by {result.id!r}")
            seen.add(name)
            path = os.path.join(os.fspath(out_dir), figure_file(result, name))
            try:
                _draw(figure, path)
            except BaseException:
                if os.path.exists(path):
                    os.remove(path)
                raise
        except Exception as err:  # noqa: BLE001 (a broken plot must not abort the report)
            errors[name] = f"{type(err).__name__}: {err}"
    return errors


# ---- report.md ----------------------------------------------------------------------------------

def _code(text: str) -> str:
    # A code span holding any text: a fence of more backticks than the text's longest run.
    run = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * (run + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _device_line(device: str) -> str:
    if str(device).startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index
        return f"{device} ({torch.cuda.get_device_name(index if index is not None else 0)})"
    return str(device)


def _header(results, config: Config, command: str, seconds: float) -> list[str]:
    info = build_info()
    done = [r for r in results.values() if isinstance(r, Result)]
    outcomes = [o for r in done for o in r.outcomes]
    held = sum(bool(o.held) for o in outcomes)
    failed = len(results) - len(done)
    rows = [
        ["command", _code(command)],
        ["date", datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")],
        ["machine", f"{platform.platform()}; {_cpu_name()}; {os.cpu_count()} CPU cores, "
                    f"torch threads {torch.get_num_threads()}"],
        ["torch", f"{torch.__version__}"],
        ["fisherext", f"{__version__} (CUDA kernels compiled: {'yes' if info.get('cuda_compiled') else 'no'})"],
        ["device", _device_line(config.device)],
        ["seed", str(config.seed)],
        ["sizes", "quick (small sizes for a first look: the expected outcomes are set for the full sizes, and "
                  "some need them)" if config.quick else "full"],
        ["data root", config.data_root or "none (embedded digits only)"],
        ["total time", f"{seconds:.1f} s"],
        ["experiments", f"{len(results)} run, {failed} failed"],
        ["expected outcomes", f"{held} of {len(outcomes)} held"],
    ]
    return ["# fisherext suite report", "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows] + [""]


def _summary(results) -> list[str]:
    lines = ["## Summary", "", "| experiment | claim | value | held |", "|---|---|---:|---|"]
    for exp_id, r in results.items():
        if isinstance(r, Result):
            for o in r.outcomes:
                lines.append(f"| {exp_id} | {_cell(o.claim)} | {_cell(o.value)} | "
                             f"{HELD if o.held else NOT_HELD} |")
            if not r.outcomes:
                lines.append(f"| {exp_id} | *(no expected outcome stated)* | | |")
        else:
            lines.append(f"| {exp_id} | *the experiment failed:* {_cell(r.error)} | | {NOT_HELD} failed |")
    return lines + [""]


def _section(number: int, exp_id: str, r, seeds: str, figure_errors: Mapping[str, str]) -> list[str]:
    lines = [f"## {number}. {_cell(r.title)} (`{exp_id}`)", ""]
    seeds_text = f"Seeds: {seeds}. " if seeds else ""
    if not isinstance(r, Result):
        details = "\n".join(r.details.rstrip().splitlines()[-_TRACEBACK_LINES:])
        fence = "`" * max(3, 1 + max((len(m) for m in re.findall(r"`+", details)), default=0))
        return lines + [f"{seeds_text}**Failed** after {r.seconds:.1f} s: {_cell(r.error)}", "",
                        fence, details, fence, ""]
    lines += [f"{seeds_text}Time: {r.seconds:.1f} s.", "", str(r.summary).strip(), ""]
    for table in r.tables:
        lines += [f"### {_cell(table.title)}", "", markdown_table(table), ""]
    for figure in r.figures:
        caption = " ".join(str(figure.caption).split())
        if figure.name in figure_errors:
            lines += [f"*Figure {figure.name} could not be drawn: {_cell(figure_errors[figure.name])}* "
                      f"({caption})", ""]
        else:
            alt = caption.replace("[", "(").replace("]", ")")
            lines += [f"![{alt}]({figure_file(r, figure.name)})", "", f"*{caption}*", ""]
    lines += ["**Expected outcomes**", ""]
    lines += [f"- {HELD + ' held' if o.held else NOT_HELD + ' not held'}: {_cell(o.claim)} "
              f"(measured: {_cell(o.value)})" for o in r.outcomes] or ["- none stated"]
    return lines + [""]


def _write_atomically(path: str, text: str) -> None:
    # Written beside and then renamed over the target: readers (and an interrupted run) never see half a
    # file. open() rather than mkstemp, so that the file gets the usual permissions (umask), not 0600.
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


@entry_point
def write_json(results: Mapping, out_dir: str | os.PathLike) -> str:
    """Writes ``results.json`` (the layout in the module docstring) for ``results`` (id → Result or
    Failure, anything with ``to_json()``) into ``out_dir``; returns its path."""
    payload = {exp_id: jsonable(r.to_json(), where=f"results[{exp_id!r}]") for exp_id, r in results.items()}
    path = os.path.join(os.fspath(out_dir), JSON_NAME)
    _write_atomically(path, json.dumps(payload, indent=2, allow_nan=False, ensure_ascii=False) + "\n")
    return path


@entry_point
def write_report(results: Mapping, out_dir: str | os.PathLike, *, config: Config, command: str,
                 seconds: float, figure_errors: Mapping[str, Mapping[str, str]] | None = None,
                 seeds: Mapping[str, str] | None = None) -> str:
    """Writes ``report.md`` and ``results.json`` into ``out_dir`` (the figures are written by
    :func:`write_figures`); returns the path of ``report.md``.

    Args:
        results: id → :class:`Result` (with ``seconds`` set) or a failure (``title``, ``error``,
            ``details``, ``seconds``, ``to_json()``; see ``fisherext.experiments.suite.Failure``), in
            report order.
        out_dir: an existing folder.
        config: the :class:`Config` of the run (device, seed, sizes for the header).
        command: the command line shown in the header.
        seconds: the total time of the run.
        figure_errors: id → {figure name: error} of figures :func:`write_figures` could not write (shown
            in place of the image).
        seeds: id → the seeds each experiment comes from (``Experiment.seeds``), shown in its section.
    """
    figure_errors = figure_errors or {}
    lines = _header(results, config, command, seconds) + _summary(results)
    for number, (exp_id, r) in enumerate(results.items(), 1):
        seed_text = (seeds or {}).get(exp_id) or ""
        lines += _section(number, exp_id, r, seed_text, figure_errors.get(exp_id, {}))
    write_json(results, out_dir)
    path = os.path.join(os.fspath(out_dir), REPORT_NAME)
    _write_atomically(path, "\n".join(lines).rstrip() + "\n")
    return path
