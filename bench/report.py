"""The markdown report of a benchmark run: a header (machine, torch, threads, date, command), one table
per model, the influence, applications and kernel tables, the notes and the numbered errors."""
from __future__ import annotations

from .matrix import TITLES
from .models import MODELS


def _ms(seconds):
    return f"{seconds * 1e3:.3g}" if seconds < 1 else f"{seconds * 1e3:,.0f}"


def _mb(n):
    return "—" if n is None else f"{n / 1e6:.1f}"


def _ratio(x):
    return "—" if x is None else (f"{x:.2f}×" if x < 10 else f"{x:.0f}×")


class Footnotes:
    """Errors numbered in order of appearance; a row's cell shows its number."""

    def __init__(self):
        self.lines: list[str] = []

    def cell(self, row: dict) -> str:
        error = row["error"]
        if error.startswith("not installed"):
            return "not installed"
        self.lines.append(f"{len(self.lines) + 1}. `{row['workload']}` {row['impl']}: {error}")
        return f"error [{len(self.lines)}]"


def _cells(row: dict, notes: Footnotes) -> tuple[str, str, str]:
    """(median ms, peak MB, rel err) of a row; a failed row shows its footnote in the first or last."""
    if row["median_s"] is None:
        return notes.cell(row), "—", "—"
    rel = "—" if row["rel_err"] is None else f"{row['rel_err']:.1e}"
    if row["error"]:
        rel = notes.cell(row)
    return _ms(row["median_s"]), _mb(row["peak_mem_bytes"]), rel


def _table(header: list[str], lines: list[list[str]], text_columns: int = 2) -> list[str]:
    """A markdown table: its first ``text_columns`` columns and a last one named "note" left-aligned."""
    align = ["---" if i < text_columns or name == "note" else "---:" for i, name in enumerate(header)]
    return ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |",
            *("| " + " | ".join(line) + " |" for line in lines)]


def model_tables(rows: list[dict], notes: Footnotes) -> list[str]:
    out = []
    for model in dict.fromkeys(r["model"] for r in rows if r["group"] == "models"):
        mine = [r for r in rows if r["model"] == model]
        spec = MODELS[model]
        first_N = mine[0]["N"]
        P = next((r["P"] for r in mine if r.get("P")), None)
        grad = next((r["median_s"] for r in mine if r["quantity"] == "gradient" and r["N"] == first_N
                     and r["median_s"] is not None), None)
        facts = [f"N = {first_N}"] + ([f"P = {P:,}"] if P else []) + ([f"one gradient {_ms(grad)} ms"] if grad else [])
        out += ["", f"### {model}: {spec.description} ({', '.join(facts)})", ""]
        lines, last = [], None
        for r in mine:
            label = r["quantity"] + ("" if r["N"] == first_N else f" (N={r['N']})")
            median, peak, rel = _cells(r, notes)
            speedup = "—" if r["impl"] == r["baseline"] else _ratio(r.get("speedup_vs_baseline"))
            lines.append([label if r["workload"] != last else "", r["impl"], median, peak, rel,
                          _ratio(r.get("ratio_to_gradient")), speedup])
            last = r["workload"]
        out += _table(["quantity", "impl", "median ms", "peak extra MB", "rel err", "× gradient", "vs loop"], lines)
    return out


def group_table(rows: list[dict], group: str, notes: Footnotes, per_gradient: bool = False) -> list[str]:
    """The table of one group; ``per_gradient`` adds the × gradient column (workloads on a model)."""
    mine = [r for r in rows if r["group"] == group]
    if not mine:
        return []
    lines, last = [], None
    for r in mine:
        median, peak, rel = _cells(r, notes)
        speedup = "—" if r["impl"] == r["baseline"] else _ratio(r.get("speedup_vs_baseline"))
        ratio = [_ratio(r.get("ratio_to_gradient"))] if per_gradient else []
        lines.append([f"`{r['workload']}`" if r["workload"] != last else "", r["impl"], median, peak, rel, *ratio,
                      speedup, r.get("note", "")])
        last = r["workload"]
    baseline = "baseline" if group == "kernels" else "loop"
    return ["", f"## {group.capitalize()}", ""] + _table(
        ["workload", "impl", "median ms", "peak extra MB", "rel err", *(["× gradient"] if per_gradient else []),
         f"vs {baseline}", "note"], lines)


NOTES = [
    "Quantities: " + "; ".join(f"`{q}` {t}" for q, t in TITLES.items()) + "; `influence` CG influence functions "
    "(bench/influence.py). Definitions, normalizations (Fisher = mean over samples) and the seed-style loops: "
    "bench/loops.py; the matrix of models × quantities and why a cell is left out: bench/matrix.py.",
    "rel err = max |result − reference| / max |reference|, in float64, against a float64 reference: the "
    "autograd-loop run in float64 on the same inputs (fd_quad: the exact vᵀF_nv; influence: a dense float64 "
    "solve; kernels: the twin in float64). K-FAC factors are compared as A/‖A‖, G/‖G‖ and ‖A‖‖G‖ "
    "(only G ⊗ A is defined).",
    "× gradient = median / median of one plain gradient of the mean loss of the same model and batch, "
    "measured in the same run; vs loop = autograd-loop median / median (kernels: twin / op, perturb_restore: "
    "loop / op).",
    "hvp and ggn: one column V [P, 1]. In hvp, ggn and torch.func's quad_true (forward mode) the loops and "
    "torch.func run attention by the math kernel (torch's fused kernels have neither second derivatives nor "
    "forward mode).",
    "Peak extra memory: what one call adds to the process's resident set at its peak (VmHWM, CPU) or to the "
    "allocated CUDA memory, its output included.",
    "Applications (bench/applications.py): `sgd_step` one SGD-with-momentum training step (forward, backward, "
    "step), `sam_step` one FisherSAM step (γ = 0.05, η = 1; two gradients), `pgd` a 10-step L2 PGD attack "
    "(ε = 1) on every input; their loops are hand-written per parameter tensor (sam_step) and seed 004's "
    "one image at a time (pgd).",
]


def markdown(rows: list[dict], header: list[str], extra_notes: list[str]) -> str:
    notes = Footnotes()
    body = []
    if any(r["group"] == "models" for r in rows):
        body += ["", "## Models × quantities"] + model_tables(rows, notes)
    body += (group_table(rows, "influence", notes) + group_table(rows, "applications", notes, per_gradient=True)
             + group_table(rows, "kernels", notes))
    out = ["# Benchmark results", "", *header, *body, "", "## Notes", "", *(f"- {n}" for n in NOTES + extra_notes)]
    if notes.lines:
        out += ["", "## Errors", "", *notes.lines]
    return "\n".join(out) + "\n"
