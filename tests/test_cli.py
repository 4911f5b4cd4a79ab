"""The command line ``fisherext suite``: in-process with a registry of fake experiments (fast), and through
``python -m fisherext`` for the entry point itself; the report it writes, its messages, its exit status."""
import json
import os
import subprocess
import sys

import matplotlib

matplotlib.use("Agg")
import pytest  # noqa: E402
import torch  # noqa: E402

from fisherext import cli  # noqa: E402
from fisherext.experiments import suite  # noqa: E402
from fisherext.experiments.data import DataUnavailable  # noqa: E402
from fisherext.experiments.registry import Config, Experiment, Figure, Outcome, Result  # noqa: E402

SEVEN = ["gaussian", "kl_fisher", "adversarial", "influence", "ewc", "sharpness", "curvature"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _plot(fig):
    fig.add_subplot().plot([0, 1, 2], [2, 1, 0])


class Fake:
    def __init__(self, exp_id, behaviour):
        self.id, self.behaviour, self.configs = exp_id, behaviour, []

    def __call__(self, config):
        self.configs.append(config)
        if self.behaviour == "raise":
            raise RuntimeError("the model diverged")
        if self.behaviour == "data":
            raise DataUnavailable("data: mnist is not under '/data' (put torchvision's copy there)")
        outcomes = [Outcome(f"{self.id} claim", self.behaviour != "unheld", 0.5)]
        return Result(self.id, f"The {self.id} study", "It shows a thing.", {"value": 0.5}, outcomes,
                      figures=[Figure(f"{self.id}_plot", "a plot", _plot)])


@pytest.fixture
def fakes(monkeypatch):
    def install(**behaviours):
        made = {i: Fake(i, b) for i, b in behaviours.items()}
        monkeypatch.setattr(suite, "EXPERIMENTS", {i: Experiment(i, "001", f"The {i} study", f)
                                                   for i, f in made.items()})
        return made
    return install


def _main(capsys, *argv):
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_suite_writes_the_report_and_says_where(fakes, tmp_path, capsys):
    fakes(alpha="ok", beta="ok")
    out_dir = tmp_path / "report"
    status, out, err = _main(capsys, "suite", "--out", str(out_dir), "--no-progress")
    assert status == 0, err
    assert f"report: {out_dir / 'report.md'}" in out
    assert "2 of 2 expected outcomes held; 0 of 2 experiments failed" in out
    assert sorted(p.name for p in out_dir.iterdir()) == ["alpha_plot.png", "beta_plot.png", "report.md",
                                                         "results.json"]
    text = (out_dir / "report.md").read_text(encoding="utf-8")
    assert f"| command | `fisherext suite --out {out_dir} --no-progress` |" in text
    assert "![a plot](alpha_plot.png)" in text
    assert list(json.loads((out_dir / "results.json").read_text())) == ["alpha", "beta"]
    assert "alpha: 1 of 1 expected outcomes held" in err  # one line per finished experiment


def test_flags_reach_the_config(fakes, tmp_path, capsys):
    made = fakes(alpha="ok", beta="ok")
    status, _, err = _main(capsys, "suite", "--only", "beta", "--quick", "--seed", "3", "--data-root",
                           str(tmp_path), "--out", str(tmp_path / "o"), "--no-progress")
    assert status == 0, err
    assert made["alpha"].configs == []
    assert made["beta"].configs == [Config(quick=True, device="cpu", seed=3, data_root=str(tmp_path),
                                           progress=False)]


def test_progress_is_on_by_default(fakes, tmp_path, capsys):
    made = fakes(alpha="ok")
    status, _, err = _main(capsys, "suite", "--out", str(tmp_path))
    assert status == 0 and made["alpha"].configs[0].progress
    assert "fisherext suite" in err and "1/1" in err


def test_outcomes_that_do_not_hold_are_listed_but_are_not_errors(fakes, tmp_path, capsys):
    fakes(alpha="unheld")
    status, out, _ = _main(capsys, "suite", "--out", str(tmp_path), "--no-progress")
    assert status == 0
    assert "0 of 1 expected outcomes held" in out and "  not held: alpha: alpha claim (measured 0.5)" in out


def test_a_failing_experiment_gives_status_1_and_the_others_are_reported(fakes, tmp_path, capsys):
    made = fakes(alpha="ok", beta="raise", gamma="ok")
    status, out, err = _main(capsys, "suite", "--out", str(tmp_path), "--no-progress")
    assert status == 1
    assert made["gamma"].configs
    assert "fisherext suite: beta failed: RuntimeError: the model diverged" in err
    assert "2 of 2 expected outcomes held; 1 of 3 experiments failed" in out
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["beta"]["error"] == "RuntimeError: the model diverged"
    assert data["gamma"]["outcomes"] == [{"claim": "gamma claim", "held": True, "value": 0.5}]
    assert "## 3. The gamma study (`gamma`)" in (tmp_path / "report.md").read_text(encoding="utf-8")


def test_missing_data_gives_status_2_with_the_message(fakes, tmp_path, capsys):
    fakes(alpha="data", beta="ok")
    status, _, err = _main(capsys, "suite", "--out", str(tmp_path), "--no-progress")
    assert status == 2
    assert ("fisherext suite: alpha failed: DataUnavailable: data: mnist is not under '/data' "
            "(put torchvision's copy there)") in err
    assert "beta" in json.loads((tmp_path / "results.json").read_text())


def test_an_unknown_experiment_is_refused_with_the_known_ones(fakes, tmp_path, capsys):
    made = fakes(alpha="ok", beta="ok")
    status, _, err = _main(capsys, "suite", "--only", "alpha", "nope", "--out", str(tmp_path / "o"))
    assert status == 2
    assert "fisherext suite: error: unknown experiment 'nope' for --only; the experiments are: alpha, beta" in err
    assert made["alpha"].configs == [] and not (tmp_path / "o").exists()


def test_an_unwritable_out_is_refused(fakes, tmp_path, capsys):
    made = fakes(alpha="ok")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    status, _, err = _main(capsys, "suite", "--out", str(blocker / "report"))
    assert status == 2
    assert f"fisherext suite: error: --out '{blocker / 'report'}': cannot write there (Not a directory)" in err
    status, _, err = _main(capsys, "suite", "--out", str(blocker))
    assert status == 2 and "cannot write there (File exists)" in err
    assert made["alpha"].configs == []


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_out_is_refused(fakes, tmp_path, capsys):
    fakes(alpha="ok")
    tmp_path.chmod(0o500)
    try:
        status, _, err = _main(capsys, "suite", "--out", str(tmp_path))
    finally:
        tmp_path.chmod(0o700)
    assert status == 2 and "cannot write there (Permission denied)" in err


def test_cuda_without_a_cuda_device_is_refused(fakes, tmp_path, capsys, monkeypatch):
    made = fakes(alpha="ok")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    status, _, err = _main(capsys, "suite", "--device", "cuda", "--out", str(tmp_path))
    assert status == 2
    assert "fisherext suite: error: --device cuda: no CUDA device is available here" in err
    assert made["alpha"].configs == []


@pytest.mark.parametrize("argv,message", [
    (["suite", "--seed", "-1"], "--seed -1: must be a non-negative integer"),
    (["suite", "--seed", "x"], "argument --seed: invalid int value: 'x'"),
    (["suite", "--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    (["suite", "--data-root", "/nonexistent/fx"], "--data-root '/nonexistent/fx': not a folder"),
    (["suite", "--only"], "argument --only: expected at least one argument"),
    ([], "the following arguments are required: COMMAND"),
])
def test_usage_errors_give_status_2(fakes, capsys, argv, message):
    fakes(alpha="ok")
    status, _, err = _main(capsys, *argv)
    assert status == 2 and message in err


def test_list_shows_ids_seeds_and_titles_and_runs_nothing(fakes, capsys):
    made = fakes(alpha="ok", beta="ok")
    status, out, _ = _main(capsys, "suite", "--list")
    assert status == 0
    assert out.splitlines() == ["alpha  The alpha study (seed 001)", "beta   The beta study (seed 001)"]
    assert made["alpha"].configs == []


def _python_m(*argv, cwd):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "fisherext", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_python_m_fisherext_is_the_command_line(tmp_path):
    done = _python_m("suite", "--help", cwd=tmp_path)
    assert done.returncode == 0 and "--only ID" in done.stdout and "--data-root DIR" in done.stdout
    done = _python_m("suite", "--only", "nope", "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert done.returncode == 2
    assert f"unknown experiment 'nope' for --only; the experiments are: {', '.join(SEVEN)}" in done.stderr
    assert not (tmp_path / "o").exists()
