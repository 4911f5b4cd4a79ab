"""What every experiment's Result must satisfy, checked the same way for all of them: its expected outcomes
judged on finite values, its tables' rows as wide as their headers, and its figures drawing as the report
draws them (a constrained-layout matplotlib figure, saved as PNG, no warning)."""
import io
import math
import warnings

import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure as MplFigure  # noqa: E402

from fisherext.experiments.registry import Figure, Outcome, Result, Table  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_result(result, *, outcomes: int, figures: list[str]) -> None:
    """``result`` a Result with a summary, ``outcomes`` Outcomes with claims and finite values, well-formed
    tables, and the ``figures`` named (in order), each drawing to a PNG."""
    assert isinstance(result, Result) and result.summary
    assert len(result.outcomes) == outcomes
    for o in result.outcomes:
        assert isinstance(o, Outcome) and isinstance(o.claim, str) and o.claim
        assert isinstance(o.held, bool) and math.isfinite(o.value)
        assert o.to_json()["held"] == o.held
    for t in result.tables:
        assert isinstance(t, Table) and all(len(row) == len(t.header) for row in t.rows)
    assert [f.name for f in result.figures] == figures
    for f in result.figures:
        assert isinstance(f, Figure) and f.caption
        fig = MplFigure(layout="constrained")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # e.g. a layout that fights the report's constrained one
            warnings.filterwarnings("ignore", message="The figure layout has changed to tight")
            f.plot(fig)
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=40)
        assert buf.getvalue()[:8] == PNG_SIGNATURE and fig.axes
