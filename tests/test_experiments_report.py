"""The suite's report writer: markdown tables and values, strict JSON, PNG figures, report.md's layout and
results.json's layout (DESIGN.md's "Machine-readable outputs")."""
import json
import os
import warnings

import matplotlib

matplotlib.use("Agg")
import matplotlib.image  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from fisherext.experiments import report  # noqa: E402
from fisherext.experiments.registry import Config, Figure, Outcome, Result, Table  # noqa: E402
from fisherext.experiments.suite import Failure  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _curve(fig):
    ax = fig.add_subplot()
    ax.plot([1e-3, 1e-2, 1e-1], [1.0, 1.01, 1.1], marker="o")
    ax.set_xscale("log")
    ax.set_xlabel("ε")


def _broken(fig):
    fig.add_subplot()
    raise RuntimeError("no data to plot")


def _result(**kw):
    fields = dict(
        id="alpha", title="Alpha study", summary="What alpha shows, unlike its seed.",
        data={"ratio": 1.0025, "curve": [0.5, float("nan"), float("inf")], "nested": {"n": 3, "t": (1, 2)}},
        outcomes=[Outcome("ratio within 1% of 1", True, 1.0025), Outcome("seed is off by 2", False, float("nan"))],
        tables=[Table("Ratios", ["ε", "ratio", "note"], [[0.001, 1.0025, "small"], [0.1, 1.1, "a|b"]])],
        figures=[Figure("alpha_curve", "KL ratio against ε", _curve)],
        seconds=1.5)
    fields.update(kw)
    return Result(**fields)


def _failure():
    return Failure("beta", "Beta study", "RuntimeError: exploded", "Traceback (most recent call last):\n  ...\n"
                   "RuntimeError: exploded\n", 0.25)


def _strict_load(path):
    def refuse(token):
        raise AssertionError(f"non-strict JSON token {token}")
    with open(path, encoding="utf-8") as f:
        return json.load(f, parse_constant=refuse)


# ---- values and tables ----------------------------------------------------------------------------

@pytest.mark.parametrize("value,text", [
    (1 / 3, "0.3333"), (12345.678, "1.235e+04"), (2.5e-7, "2.5e-07"), (0.0, "0"), (7, "7"), (True, "yes"),
    (False, "no"), (float("nan"), "nan"), (float("-inf"), "-inf"), ("x", "x"), (np.float64(0.5), "0.5"),
    (torch.tensor(3), "3"),
])
def test_format_value(value, text):
    assert report.format_value(value) == text


def test_markdown_table_aligns_numbers_escapes_bars_and_pads_rows():
    table = Table("t", ["a", "b"], [[1, "x|y"], [2.5, "two\nlines"], [3]])
    assert report.markdown_table(table) == (
        "| a | b |\n"
        "|---:|---|\n"
        "| 1 | x\\|y |\n"
        "| 2.5 | two<br>lines |\n"
        "| 3 |  |")


def test_markdown_table_widens_the_header_for_a_longer_row():
    assert report.markdown_table(Table("t", ["a"], [["p", "q"]])).splitlines()[:2] == ["| a |  |", "|---|---|"]


def test_jsonable_makes_strict_json():
    value = {"f": 0.5, "nan": float("nan"), "inf": [float("inf"), -float("inf")], "t": (1, (2, 3)), 4: "key",
             "np": np.float32(0.25), "arr": np.arange(3), "tensor": torch.tensor([1.5, 2.5]), "b": True, "n": None}
    out = report.jsonable(value)
    assert out == {"f": 0.5, "nan": None, "inf": [None, None], "t": [1, [2, 3]], "4": "key", "np": 0.25,
                   "arr": [0, 1, 2], "tensor": [1.5, 2.5], "b": True, "n": None}
    json.dumps(out, allow_nan=False)


def test_jsonable_names_the_path_of_a_bad_value():
    with pytest.raises(TypeError, match=r"^results\['alpha'\]\['model'\] is of type Linear, which results"):
        report.jsonable({"model": torch.nn.Linear(1, 1)}, where="results['alpha']")
    with pytest.raises(TypeError, match=r"^results\[1\] has a key of type tuple, not a string"):
        report.jsonable([0, {(1, 2): 3}])


# ---- figures --------------------------------------------------------------------------------------

def test_figures_are_small_valid_pngs_that_matplotlib_reads_back(tmp_path):
    result = _result(figures=[Figure("alpha_curve", "c", _curve), Figure("scatter", "no id prefix", _curve)])
    assert report.write_figures(result, tmp_path) == {}
    assert sorted(os.listdir(tmp_path)) == ["alpha_curve.png", "alpha_scatter.png"]
    for name in os.listdir(tmp_path):
        path = tmp_path / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        assert path.stat().st_size < 100_000
        pixels = matplotlib.image.imread(path)
        assert pixels.shape == (420, 640, 4)  # 6.4 × 4.2 inches at 100 dpi
        assert pixels[..., :3].min() < 0.5  # something was drawn on the white page


def _tight_and_resized(fig):
    fig.set_size_inches(8, 3)
    for ax in fig.subplots(1, 2):
        ax.plot([0, 1], [1, 0])
    fig.tight_layout()


def _by_hand(fig):
    fig.set_layout_engine(None)
    fig.subplots_adjust(left=0.3)
    fig.add_subplot().plot([0, 1])


def test_a_plot_may_resize_and_choose_its_layout_without_warnings(tmp_path):
    figures = [Figure("alpha_tight", "t", _tight_and_resized), Figure("alpha_hand", "h", _by_hand)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert report.write_figures(_result(figures=figures), tmp_path) == {}
    assert matplotlib.image.imread(tmp_path / "alpha_tight.png").shape == (300, 800, 4)
    assert matplotlib.image.imread(tmp_path / "alpha_hand.png").shape == (420, 640, 4)


def test_a_broken_figure_is_reported_and_leaves_no_file_while_the_others_are_written(tmp_path):
    (tmp_path / "alpha_broken.png").write_bytes(b"stale")
    figures = [Figure("alpha_broken", "b", _broken), Figure("alpha_curve", "c", _curve),
               Figure("alpha/escape", "bad name", _curve), Figure("alpha_curve", "twice", _curve)]
    errors = report.write_figures(_result(figures=figures), tmp_path)
    assert errors == {
        "alpha_broken": "RuntimeError: no data to plot",
        "alpha/escape": "ValueError: figure name 'alpha/escape': use letters, digits, '_', '-' and '.' only",
        "alpha_curve": "ValueError: figure name 'alpha_curve' is used twice by 'alpha'",
    }
    assert sorted(os.listdir(tmp_path)) == ["alpha_curve.png"]


# ---- report.md and results.json ------------------------------------------------------------------

def _write(tmp_path, results=None, **kw):
    results = {"alpha": _result(), "beta": _failure()} if results is None else results
    report.write_figures(results["alpha"], tmp_path)
    args = dict(config=Config(quick=True, seed=7), command="fisherext suite --quick --seed 7", seconds=12.34,
                seeds={"alpha": "000 + 004", "beta": "003"})
    args.update(kw)
    path = report.write_report(results, tmp_path, **args)
    assert path == os.path.join(tmp_path, "report.md")
    return (tmp_path / "report.md").read_text(encoding="utf-8")


def test_report_header_names_the_run(tmp_path):
    text = _write(tmp_path)
    head = text.split("## Summary")[0]
    assert text.startswith("# fisherext suite report\n")
    for row in ("| command | `fisherext suite --quick --seed 7` |", f"| torch | {torch.__version__} |",
                "| device | cpu |", "| seed | 7 |", "| sizes | quick (small sizes for a first look: the expected outcomes are set for the full sizes, and some need them) |", "| total time | 12.3 s |",
                "| experiments | 2 run, 1 failed |", "| expected outcomes | 1 of 2 held |"):
        assert row in head.splitlines(), row
    assert "| date | 20" in head and "| machine | " in head


def test_report_summary_lists_every_outcome_and_the_failure(tmp_path):
    summary = _write(tmp_path).split("## Summary")[1].split("\n## ")[0].strip().splitlines()
    assert summary == [
        "| experiment | claim | value | held |",
        "|---|---|---:|---|",
        "| alpha | ratio within 1% of 1 | 1.002 | ✓ |",
        "| alpha | seed is off by 2 | nan | ✗ |",
        "| beta | *the experiment failed:* RuntimeError: exploded | | ✗ failed |",
    ]


def test_report_section_shows_title_seeds_summary_tables_figures_then_outcomes(tmp_path):
    text = _write(tmp_path)
    section = text.split("## 1. Alpha study (`alpha`)\n")[1].split("\n## 2.")[0]
    order = ["Seeds: 000 + 004. Time: 1.5 s.", "What alpha shows, unlike its seed.", "### Ratios",
             "| ε | ratio | note |", "|---:|---:|---|", "| 0.001 | 1.002 | small |", "| 0.1 | 1.1 | a\\|b |",
             "![KL ratio against ε](alpha_curve.png)", "*KL ratio against ε*", "**Expected outcomes**",
             "- ✓ held: ratio within 1% of 1 (measured: 1.002)", "- ✗ not held: seed is off by 2 (measured: nan)"]
    lines = section.splitlines()
    assert [lines.index(line) for line in order] == sorted(lines.index(line) for line in order)
    # every embedded image is a file next to the report
    for line in lines:
        if line.startswith("!["):
            assert (tmp_path / line.split("](")[1].rstrip(")")).is_file()


def test_report_shows_a_failure_with_its_traceback(tmp_path):
    section = _write(tmp_path).split("## 2. Beta study (`beta`)\n")[1]
    assert "Seeds: 003. **Failed** after 0.2 s: RuntimeError: exploded" in section
    assert "```\nTraceback (most recent call last):\n  ...\nRuntimeError: exploded\n```" in section


def test_report_shows_a_figure_error_in_place_of_the_image(tmp_path):
    text = _write(tmp_path, figure_errors={"alpha": {"alpha_curve": "RuntimeError: boom"}})
    assert "![" not in text
    assert "*Figure alpha_curve could not be drawn: RuntimeError: boom* (KL ratio against ε)" in text


def test_results_json_has_the_pinned_layout(tmp_path):
    _write(tmp_path)
    data = _strict_load(tmp_path / "results.json")
    assert list(data) == ["alpha", "beta"]
    alpha = data["alpha"]
    assert set(alpha) == {"ratio", "curve", "nested", "outcomes", "seconds"}
    assert alpha["curve"] == [0.5, None, None] and alpha["nested"] == {"n": 3, "t": [1, 2]}
    assert alpha["outcomes"] == [{"claim": "ratio within 1% of 1", "held": True, "value": 1.0025},
                                 {"claim": "seed is off by 2", "held": False, "value": None}]
    assert alpha["seconds"] == 1.5
    assert data["beta"] == {"error": "RuntimeError: exploded", "outcomes": [], "seconds": 0.25}
    for entry in data.values():
        for outcome in entry["outcomes"]:
            assert set(outcome) == {"claim", "held", "value"} and isinstance(outcome["held"], bool)


def test_rewriting_replaces_the_files_and_leaves_no_temporary_ones(tmp_path):
    _write(tmp_path)
    _write(tmp_path, results={"alpha": _result(outcomes=[])})
    assert sorted(os.listdir(tmp_path)) == ["alpha_curve.png", "report.md", "results.json"]
    assert list(_strict_load(tmp_path / "results.json")) == ["alpha"]
    assert "| alpha | *(no expected outcome stated)* | | |" in (tmp_path / "report.md").read_text(encoding="utf-8")
