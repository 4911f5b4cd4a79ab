"""The command line: ``fisherext suite`` (also ``python -m fisherext suite``).

::

    fisherext suite [--only ID ...] [--quick] [--out DIR] [--device cpu|cuda] [--data-root DIR]
                    [--seed N] [--no-progress] [--list]

runs the experiments of the suite (all of them, or those of ``--only``) and writes ``DIR/report.md``, the
PNG figures and ``DIR/results.json`` (default DIR: ``./fisherext-report``); see
:mod:`fisherext.experiments.suite` and :mod:`fisherext.experiments.report`. It prints one line per finished
experiment, then where the report is and how many expected outcomes held.

Exit status: 0 when every experiment ran (expected outcomes that did not hold are results, listed in the
report and on the terminal), 1 when an experiment failed (the others still run and are reported), 2 for a
usage error, reported before anything runs: an unknown experiment id (the message lists the known ones), an
output folder that cannot be written, ``--device cuda`` without a CUDA device, a ``--data-root`` that is
not a folder; and 2 when an experiment asked for a data set that is not on the machine (its message says
where it was looked for).
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile

import torch

from .experiments import report, suite
from .experiments.registry import Config

__all__ = ["main"]

PROG = "fisherext"
DEFAULT_OUT = "fisherext-report"


def _parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The parser of the command line and that of ``suite`` (whose errors read "fisherext suite: error: ...")."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="fisherext: Fisher information and curvature for PyTorch models.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    run = commands.add_parser(
        "suite", help="run the experiment suite and write its report",
        description="Run the experiments (on scikit-learn's embedded digits unless told otherwise) and write "
                    "DIR/report.md, its PNG figures and DIR/results.json.",
        epilog="Exit status: 0 all experiments ran, 1 an experiment failed, 2 a usage error or missing data.")
    run.add_argument("--only", nargs="+", metavar="ID", help="run only these experiments (see --list)")
    run.add_argument("--quick", action="store_true", help="small sizes: a first look in a few minutes on CPU")
    run.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                     help=f"folder for report.md, the figures and results.json (default: ./{DEFAULT_OUT})")
    run.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where models run (default: cpu)")
    run.add_argument("--data-root", metavar="DIR",
                     help="folder holding torchvision's MNIST / CIFAR-10 files (never downloaded); "
                          "without it only the embedded digits are used")
    run.add_argument("--seed", type=int, default=0, metavar="N",
                     help="seed of every random draw (default: 0); a seed gives the same results")
    run.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    run.add_argument("--list", action="store_true", help="list the experiments and exit")
    return parser, run


def _writable_folder(path: str) -> str | None:
    """None when ``path`` is (or can be created as) a folder a file can be written into, else why not."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        return err.strerror or str(err)
    return None


def _list(out) -> int:
    experiments = suite.EXPERIMENTS
    width = max((len(i) for i in experiments), default=0)
    for exp_id in experiments:
        try:
            experiment = experiments[exp_id]
            word = "seeds" if "+" in experiment.seeds or "," in experiment.seeds else "seed"
            text = f"{experiment.title} ({word} {experiment.seeds})" if experiment.seeds else experiment.title
        except Exception as err:  # noqa: BLE001 (a broken module is listed, not fatal)
            text = f"(cannot be loaded: {type(err).__name__}: {err})"
        print(f"{exp_id:<{width}}  {text}", file=out)
    return 0


def _echo(line: str) -> None:
    # tqdm.write prints above an active bar instead of through it.
    from tqdm.auto import tqdm

    tqdm.write(line, file=sys.stderr)


def _suite(args, parser: argparse.ArgumentParser, command: str) -> int:
    if args.list:
        return _list(sys.stdout)
    known = list(suite.EXPERIMENTS)
    for exp_id in args.only or []:
        if exp_id not in suite.EXPERIMENTS:
            parser.error(f"unknown experiment {exp_id!r} for --only; the experiments are: {', '.join(known)}")
    if args.seed < 0:
        parser.error(f"--seed {args.seed}: must be a non-negative integer")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here"
                     + ("" if torch.version.cuda else f" (torch {torch.__version__} is a CPU-only build)")
                     + "; run on --device cpu")
    if args.data_root is not None and not os.path.isdir(args.data_root):
        parser.error(f"--data-root {args.data_root!r}: not a folder")
    why = _writable_folder(args.out)
    if why is not None:
        parser.error(f"--out {args.out!r}: cannot write there ({why})")

    config = Config(quick=args.quick, device=args.device, seed=args.seed, data_root=args.data_root,
                    progress=args.progress)
    run = suite.run_suite(args.only, config, args.out, command=command, echo=_echo)

    held = [(i, o) for i, o in run.outcomes if o.held]
    not_held = [(i, o) for i, o in run.outcomes if not o.held]
    print(f"report: {run.report_path} (and {report.JSON_NAME}, figures beside it)")
    print(f"{len(held)} of {len(run.outcomes)} expected outcomes held; "
          f"{len(run.failures)} of {len(run.results)} experiments failed; {run.seconds:.1f} s")
    for exp_id, outcome in not_held:
        print(f"  not held: {exp_id}: {outcome.claim} (measured {report.format_value(outcome.value)})")
    for failure in run.failures:
        print(f"{PROG} suite: {failure.id} failed: {failure.error}", file=sys.stderr)
    for exp_id, errors in run.figure_errors.items():
        for name, error in errors.items():
            print(f"{PROG} suite: {exp_id}: figure {name} could not be drawn: {error}", file=sys.stderr)
    return run.status


def main(argv: list[str] | None = None) -> int:
    """Runs the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status (see the module
    docstring). ``fisherext`` (the console script) and ``python -m fisherext`` call it."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser, suite_parser = _parser()
    try:
        args = parser.parse_args(argv)
        command = " ".join([PROG] + [shlex.quote(a) for a in argv])
        return _suite(args, suite_parser, command)
    except SystemExit as exit_:  # argparse's usage errors (status 2) and --help (0)
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)


if __name__ == "__main__":
    sys.exit(main())
