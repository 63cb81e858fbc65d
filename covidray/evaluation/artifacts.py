"""An EvalReport as files next to a model: a confusion-matrix PNG and a markdown summary; and
the one-line summaries the command line shows too.

Every rendering shows the subgroup breakdowns and the flagged list next to the overall
figures; see covidray.evaluation.metrics for why accuracy on a confounded split is never shown
alone. Every rate is shown with its Wilson 95 % interval, ``0.913 [0.73, 0.98]``, and every
subgroup rate with its denominator.
"""

from __future__ import annotations

import io
import os
from typing import IO

import numpy as np

from .metrics import ClassMetrics, EvalReport, Interval, SubgroupMetrics

WARN = "⚠"
NO_SUBGROUPS = (
    "No subgroup columns were given: accuracy on a confounded split can reflect the source "
    "or age of the images, not the disease."
)


def fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def fmt_ci(value: float | None, ci: Interval | None) -> str:
    """A rate with its Wilson 95 % interval: ``0.913 [0.73, 0.98]`` (``n/a`` if undefined)."""
    if value is None:
        return "n/a"
    return f"{value:.3f}" if ci is None else f"{value:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]"


CI_NOTE = "[ ]: Wilson 95% interval"


def overall_line(report: EvalReport) -> str:
    return (
        f"accuracy {fmt_ci(report.accuracy, report.accuracy_ci)} · "
        f"macro-F1 {report.macro_f1:.3f} · "
        f"COVID sensitivity {fmt_ci(report.covid_recall, report.covid_recall_ci)} "
        f"(n={report.n_covid}) · "
        f"COVID specificity {fmt_ci(report.covid_specificity, report.covid_specificity_ci)} "
        f"(n={report.n_non_covid}) · ECE {report.ece:.3f} · n={report.n}  ({CI_NOTE})"
    )


def adult_line(adult: SubgroupMetrics | None) -> str:
    if adult is None:
        return "Adult only: no rows with age_group = adult"
    return (
        f"Adult only (n={adult.n}): accuracy {fmt_ci(adult.accuracy, adult.accuracy_ci)} · "
        f"COVID sensitivity {fmt_ci(adult.covid_recall, adult.covid_recall_ci)} "
        f"(n={adult.n_covid}) · "
        f"COVID specificity {fmt_ci(adult.covid_specificity, adult.covid_specificity_ci)} "
        f"(n={adult.n_non_covid})" + (f"  {WARN} {adult.flag_reason}" if adult.flagged else "")
    )


SUBGROUP_HEADER = [
    "n",
    "accuracy",
    "COVID n",
    "COVID sensitivity",
    "non-COVID n",
    "COVID specificity",
]


def subgroup_cells(m: SubgroupMetrics) -> list[str]:
    """The cells of a subgroup row under :data:`SUBGROUP_HEADER`."""
    return [
        str(m.n),
        fmt_ci(m.accuracy, m.accuracy_ci),
        str(m.n_covid),
        fmt_ci(m.covid_recall, m.covid_recall_ci),
        str(m.n_non_covid),
        fmt_ci(m.covid_specificity, m.covid_specificity_ci),
    ]


PER_CLASS_HEADER = ["class", "precision", "recall", "F1", "support"]


def per_class_cells(name: str, m: ClassMetrics) -> list[str]:
    return [
        name,
        fmt_ci(m.precision, m.precision_ci),
        fmt_ci(m.recall, m.recall_ci),
        fmt(m.f1),
        str(m.support),
    ]


def confusion_png(
    report: EvalReport, path_or_buffer: str | os.PathLike[str] | IO[bytes], *, title: str = ""
) -> None:
    """Write a confusion-matrix heatmap as PNG: counts in cells, colour = row fraction.

    Uses a bare matplotlib Figure with the Agg canvas, so no pyplot and no global backend.
    """
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
            PER_CLASS_HEADER,
            [per_class_cells(name, m) for name, m in report.per_class.items()],
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
                [column, *SUBGROUP_HEADER],
                [
                    [f"{WARN} {value}" if m.flagged else value, *subgroup_cells(m)]
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


def reliability_png(
    before: np.ndarray, after: np.ndarray, labels: np.ndarray, *, n_bins: int = 15, title: str = ""
) -> bytes:
    """A reliability diagram (accuracy against top-class confidence, 15 equal-width bins, the
    bins' counts as bar widths) of uncalibrated and calibrated probabilities, as PNG bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .metrics import expected_calibration_error

    fig = Figure(figsize=(5.2, 4.4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], ":", color="grey", lw=1, label="perfect calibration")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    for probs, name, color in ((before, "before", "#c0392b"), (after, "after", "#1e8449")):
        conf = probs.max(axis=1)
        correct = probs.argmax(axis=1) == labels
        bins = np.clip(np.digitize(conf, edges, right=True) - 1, 0, n_bins - 1)
        xs, ys = [], []
        for b in range(n_bins):
            mask = bins == b
            if mask.any():
                xs.append(float(conf[mask].mean()))
                ys.append(float(correct[mask].mean()))
        ece = expected_calibration_error(probs, labels, n_bins)
        ax.plot(xs, ys, "o-", color=color, label=f"{name} (ECE {ece:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence of the predicted class")
    ax.set_ylabel("accuracy")
    ax.set_title(title or "Reliability", fontsize=10)
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
