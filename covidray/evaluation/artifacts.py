"""An EvalReport as files next to a model: a confusion-matrix PNG and a markdown summary; and
the one-line summaries the command line shows too.

Every rendering shows the subgroup breakdowns and the flagged list next to the overall
figures; see covidray.evaluation.metrics for why accuracy on a confounded split is never shown
alone.
"""

from __future__ import annotations

import os
from typing import IO

from .metrics import EvalReport, SubgroupMetrics

WARN = "⚠"
NO_SUBGROUPS = (
    "No subgroup columns were given: accuracy on a confounded split can reflect the source "
    "or age of the images, not the disease."
)


def fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def overall_line(report: EvalReport) -> str:
    return (
        f"accuracy {report.accuracy:.3f} · macro-F1 {report.macro_f1:.3f} · "
        f"COVID sensitivity {report.covid_recall:.3f} · "
        f"COVID specificity {report.covid_specificity:.3f} · ECE {report.ece:.3f} · n={report.n}"
    )


def adult_line(adult: SubgroupMetrics | None) -> str:
    if adult is None:
        return "Adult only: no rows with age_group = adult"
    return (
        f"Adult only (n={adult.n}): accuracy {adult.accuracy:.3f} · "
        f"COVID sensitivity {fmt(adult.covid_recall)} · "
        f"COVID specificity {fmt(adult.covid_specificity)}"
        + (f"  {WARN} {adult.flag_reason}" if adult.flagged else "")
    )


def confusion_png(
    report: EvalReport, path_or_buffer: str | os.PathLike[str] | IO[bytes], *, title: str = ""
) -> None:
    """Write a confusion-matrix heatmap as PNG: counts in cells, colour = row fraction.

    Uses a bare matplotlib Figure with the Agg canvas, so no pyplot and no global backend.
    """
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cm = np.asarray(report.confusion, dtype=np.int64)
    totals = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, totals, out=np.zeros(cm.shape, dtype=float), where=totals > 0)
    k = len(report.classes)

    fig = Figure(figsize=(1.3 * k + 2.2, 1.2 * k + 1.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    ax.set_xticks(range(k), labels=report.classes)
    ax.set_yticks(range(k), labels=report.classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(k):
        for j in range(k):
            ax.text(
                j,
                i,
                str(cm[i, j]),
                ha="center",
                va="center",
                color="white" if frac[i, j] > 0.5 else "black",
            )
    heading = title or "Confusion matrix"
    ax.set_title(f"{heading}\nn={report.n}, accuracy {report.accuracy:.3f}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path_or_buffer, format="png")


def _md_cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def per_class_table_markdown(report: EvalReport) -> str:
    """Markdown: overall line, per-class and confusion tables, subgroup tables, adult, flags."""
    out = [f"**Overall**: {overall_line(report)}", ""]
    out.append(
        _md_table(
            ["class", "precision", "recall", "F1", "support"],
            [
                [name, fmt(m.precision), fmt(m.recall), fmt(m.f1), str(m.support)]
                for name, m in report.per_class.items()
            ],
        )
    )
    out += ["", "**Confusion matrix** (rows true, columns predicted)", ""]
    out.append(
        _md_table(
            ["true \\ predicted", *report.classes],
            [
                [name, *(str(v) for v in row)]
                for name, row in zip(report.classes, report.confusion, strict=True)
            ],
        )
    )
    out += ["", "### Subgroups", ""]
    if not report.subgroups:
        out += [f"{WARN} {NO_SUBGROUPS}", ""]
    for column, values in report.subgroups.items():
        out += [f"**By {column}**", ""]
        out.append(
            _md_table(
                [column, "n", "accuracy", "COVID recall", "COVID specificity"],
                [
                    [
                        f"{WARN} {value}" if m.flagged else value,
                        str(m.n),
                        fmt(m.accuracy),
                        fmt(m.covid_recall),
                        fmt(m.covid_specificity),
                    ]
                    for value, m in values.items()
                ],
            )
        )
        out.append("")
    out += [f"**{adult_line(report.adult)}**", ""]
    if report.flagged:
        out += [f"**{WARN} Flagged subgroups**", ""]
        out += [f"- {_md_cell(line)}" for line in report.flagged]
    else:
        out.append("No subgroup flagged.")
    return "\n".join(out) + "\n"
