"""What the command line shows: progress bars, tables, epoch lines and evaluation reports.

The library returns pydantic results and plain dicts; everything rich lives here.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console, Group
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.rule import Rule
from rich.table import Table
from rich.text import Text

from ..evaluation.artifacts import (
    NO_SUBGROUPS,
    PER_CLASS_HEADER,
    SUBGROUP_HEADER,
    WARN,
    adult_line,
    fmt_ci,
    overall_line,
    per_class_cells,
    subgroup_cells,
)
from ..evaluation.external import auroc_text, separation_text
from ..evaluation.metrics import EvalReport
from ..labels import CLASSES
from ..manifest import SPLITS

# Columns when output is no terminal (CI logs, files, `covidray submit` following a job): wide
# enough that rich never wraps a line there. On a terminal, the terminal's width.
NO_WRAP_WIDTH = 10_000
RULE_WIDTH = 80  # a header rule's width where lines are not wrapped


class CliConsole(Console):
    """rich's Console whose header rules keep 80 columns when lines are not wrapped."""

    def rule(self, title: Any = "", **kwargs: Any) -> None:
        width = RULE_WIDTH if self.width >= NO_WRAP_WIDTH else None
        self.print(Rule(title, **kwargs), width=width)


console = CliConsole(stderr=True)


def width_for(stream: Any) -> int | None:
    """The console width for ``stream``: None (the terminal's own) on a terminal."""
    isatty = getattr(stream, "isatty", None)
    return None if isatty is not None and isatty() else NO_WRAP_WIDTH


def stdout_console() -> Console:
    """A console on standard output (``evaluate``'s report), unwrapped when redirected."""
    return CliConsole(width=width_for(sys.stdout))


@contextmanager
def progress_bar(description: str) -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar; yields ``update(done, total)``."""
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


# --- ingest ------------------------------------------------------------------------------------


def ingest_table(result: Any) -> Table:
    """Images per class and split of an IngestResult."""
    table = Table(title=f"{result.n_rows} images ingested ({result.layout} layout)")
    table.add_column("class")
    unsplit = any("none" in per for per in result.counts.values())
    columns = (*SPLITS, "none") if unsplit else SPLITS
    for split in columns:
        table.add_column("not split" if split == "none" else split, justify="right")
    table.add_column("total", justify="right")
    labels = [c for c in CLASSES if c in result.counts]
    labels += sorted(c for c in result.counts if c not in CLASSES)
    for label in labels:
        per = result.counts[label]
        table.add_row(label, *[str(per.get(s, 0)) for s in columns], str(sum(per.values())))
    totals = [sum(result.counts[label].get(s, 0) for label in labels) for s in columns]
    table.add_row("[bold]total", *[str(t) for t in totals], str(sum(totals)))
    return table


def print_ingest_result(result: Any) -> None:
    console.print(ingest_table(result))
    if result.error_reasons:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(result.error_reasons.items()))
        console.print(f"not ingested: {reasons} (see {result.errors_uri})")
    if result.n_duplicates:
        console.print(f"dropped {result.n_duplicates} exact duplicate file(s)")
    if result.layout == "dicomweb":
        other = ", ".join(f"{k} {v}" for k, v in sorted(result.not_retrieved.items())) or "none"
        console.print(
            f"pulled {result.n_rows} new instance(s), {result.n_skipped} held already, "
            f"{result.n_retry} to retry next time; other objects not retrieved: {other}"
        )
    console.print(f"manifest: {result.manifest_uri}")


# --- training ----------------------------------------------------------------------------------


def train_epoch_line(m: dict[str, Any], epochs: int) -> str:
    """One line for a classifier epoch's reported metrics."""
    flags = (
        " [yellow](resumed)[/yellow]" if m.get("resumed") and m["epoch"] == m["start_epoch"] else ""
    )
    return (
        f"epoch {m['epoch'] + 1:>3}/{epochs}  loss {m['train_loss']:.4f}  "
        f"val loss {m['val_loss']:.4f}  val macro-F1 {m['val_macro_f1']:.3f}  "
        f"acc {m['val_accuracy']:.3f}  COVID recall {m['val_covid_recall']:.3f}  "
        f"lr {m['lr']:.2e}  best {m['best_val_macro_f1']:.3f}@{m['best_epoch'] + 1}  "
        f"{m['epoch_s']:.0f} s{flags}"
    )


def gan_epoch_line(m: dict[str, Any], epochs: int) -> str:
    """One line for a CycleGAN epoch's reported metrics."""
    resumed = " (resumed)" if m.get("resumed") and m["epoch"] == m["start_epoch"] else ""
    return (
        f"epoch {m['epoch'] + 1:>3}/{epochs}  G {m['loss_g']:.3f} (gan {m['loss_g_gan']:.3f} "
        f"cycle {m['loss_cycle']:.3f} idt {m['loss_identity']:.3f})  D_A {m['loss_d_a']:.3f}  "
        f"D_B {m['loss_d_b']:.3f}  lr {m['lr']:.2e}  step {m['step']}/{m['total_steps']}  "
        f"{m['s_per_iter']:.2f} s/iter  {m['epoch_s']:.0f} s{resumed}"
    )


def epoch_printer(
    epochs: int, line: Callable[[dict[str, Any], int], str]
) -> Callable[[dict[str, Any]], None]:
    """An ``on_epoch`` callback printing ``line(metrics, epochs)`` (and worker failures)."""

    def show(m: dict[str, Any]) -> None:
        if m.get("event") == "failure":
            errors = escape(str(m["errors"]))  # worker errors may hold "[/path]" and the like
            console.print(f"[red]worker failure[/red] {errors}: restarting from checkpoint")
        else:
            console.print(line(m, epochs), highlight=False)

    return show


def print_train_reports(result: Any) -> None:
    """One line per evaluated split of a TrainResult: accuracy, macro-F1, COVID recall, adult."""
    for split, m in result.reports.items():
        adult = m.get("adult")
        adult_acc = (
            f" · adult accuracy {fmt_ci(adult['accuracy'], adult.get('accuracy_ci'))}"
            if adult
            else ""
        )
        console.print(
            f"[bold]{split}[/bold]: accuracy {fmt_ci(m['accuracy'], m.get('accuracy_ci'))} · "
            f"macro-F1 {m['macro_f1']:.3f} · COVID recall "
            f"{fmt_ci(m['covid_recall'], m.get('covid_recall_ci'))}{adult_acc}",
            highlight=False,
        )


# --- evaluation --------------------------------------------------------------------------------


def render_text(report: EvalReport, title: str = "") -> Group:
    """A rich renderable: overall line, per-class, confusion and subgroup tables, flags."""
    parts: list = []
    if title:
        parts.append(Text(title, style="bold"))
    parts.append(Text(overall_line(report)))
    if report.outputs is not None:
        parts.append(Text(outputs_line(report)))
    if report.separation is not None:
        parts.append(Text(separation_text(report.separation)))

    per_class = Table(title="Per class")
    for col in PER_CLASS_HEADER:
        per_class.add_column(col, justify="left" if col == "class" else "right")
    for name, m in report.per_class.items():
        per_class.add_row(*per_class_cells(name, m))
    parts.append(per_class)

    confusion = Table(title="Confusion matrix (rows true, columns predicted)")
    confusion.add_column("true \\ predicted")
    for name in report.classes:
        confusion.add_column(name, justify="right")
    for name, row in zip(report.classes, report.confusion, strict=True):
        confusion.add_row(name, *(str(v) for v in row))
    parts.append(confusion)

    if not report.subgroups:
        parts.append(Text(f"{WARN} {NO_SUBGROUPS}", style="yellow"))
    for column, values in report.subgroups.items():
        table = Table(title=f"By {column}")
        table.add_column(column)
        for col in SUBGROUP_HEADER:
            table.add_column(col, justify="right")
        for value, m in values.items():
            table.add_row(
                f"{WARN} {value}" if m.flagged else value,
                *subgroup_cells(m),
                style="red" if m.flagged else None,
            )
        parts.append(table)

    parts.append(Text(adult_line(report.adult)))
    if report.flagged:
        flags = Text(f"{WARN} Flagged subgroups:\n", style="bold red")
        flags.append("\n".join(f"  - {line}" for line in report.flagged), style="red")
        parts.append(flags)
    else:
        parts.append(Text("No subgroup flagged.", style="green"))
    return Group(*parts)


def _rate(k: float, n: int) -> str:
    """``0.870 (0.79–0.93)``: a rate with its Wilson 95 % interval, or n/a."""
    from ..evaluation.intervals import wilson

    if n <= 0:
        return "n/a"
    lo_hi = wilson(round(k), n)
    return f"{k / n:.3f} ({lo_hi[0]:.2f}–{lo_hi[1]:.2f})"


def _rates(r: EvalReport) -> dict[str, str]:
    cm = r.confusion
    pos = r.classes.index("covid")
    covid = sum(cm[pos])
    others = r.n - covid
    true_negatives = sum(
        cm[i][j] for i in range(len(cm)) for j in range(len(cm)) if i != pos and j != pos
    )
    out = r.outputs
    return {
        "accuracy": _rate(r.accuracy * r.n, r.n),
        "macro-F1": f"{r.macro_f1:.3f}",
        "COVID recall": _rate(cm[pos][pos], covid),
        "COVID specificity": _rate(true_negatives, others),
        "ECE": f"{r.ece:.3f}" + (f" (was {out.ece_uncalibrated:.3f})" if out else ""),
        "gate false rejections": "n/a"
        if out is None or out.false_rejection_rate is None
        else _rate(out.n_rejected, r.n),
        "adult accuracy": "n/a"
        if r.adult is None
        else _rate(r.adult.accuracy * r.adult.n, r.adult.n),
        "AUROC COVID vs adult non-COVID": "n/a"
        if r.separation is None
        else auroc_text(r.separation.all),
    }


def outputs_line(report: EvalReport) -> str:
    """Calibration and the input gate in one line."""
    out = report.outputs
    cal = out.calibration
    ece = f"ECE {out.ece_uncalibrated:.3f} → {report.ece:.3f}"
    if out.ece_interval:
        ece += f" (95 % {out.ece_interval[0]:.3f}–{out.ece_interval[1]:.3f})"
    if out.ece_if_calibrated:
        ece += (
            f"; a calibrated model shows {out.ece_if_calibrated[0]:.3f} "
            f"(up to {out.ece_if_calibrated[1]:.3f}) on as many films"
        )
    gate = (
        "no input gate"
        if out.false_rejection_rate is None
        else f"input gate refused {out.n_rejected}/{report.n} (false rejections "
        f"{_rate(out.n_rejected, report.n)})"
        + "".join(f"; {k} {v}" for k, v in out.rejections_by_reason.items())
    )
    line = (
        f"Calibration: {cal['method']} T = {cal['temperature']:.2f}, {ece}, "
        f"{out.labels_changed_by_calibration} label(s) changed · {gate}"
    )
    if out.n_rejected:
        line += "\nRefused in-scope films by " + "; by ".join(
            f"{column}: " + ", ".join(f"{v} {k}/{n}" for v, (k, n) in values.items())
            for column, values in out.false_rejections_by.items()
            if column in ("label", "source", "age_group")
        )
    return line


def compare_text(reports: dict[str, EvalReport], title: str = "") -> Group:
    """Several models on the same rows, side by side: the headline rates with Wilson intervals,
    then each subgroup's accuracy per model."""
    names = [f"model {i + 1}" for i in range(len(reports))]
    parts: list = [Text(f"{len(reports)} models on {title}", style="bold")]
    for name, uri in zip(names, reports, strict=True):
        parts.append(Text(f"  {name}: {uri}"))
    head = Table(title="Overall (95 % Wilson intervals)")
    head.add_column("")
    for name in names:
        head.add_column(name, justify="right")
    rates = [_rates(r) for r in reports.values()]
    for key in rates[0]:
        head.add_row(key, *(r[key] for r in rates))
    parts.append(head)
    first = next(iter(reports.values()))
    for column, values in first.subgroups.items():
        table = Table(title=f"Accuracy by {column}")
        table.add_column(column)
        for name in names:
            table.add_column(name, justify="right")
        for value in values:
            cells = []
            for r in reports.values():
                m = r.subgroups.get(column, {}).get(value)
                cells.append("n/a" if m is None else _rate(m.accuracy * m.n, m.n))
            table.add_row(value, *cells)
        parts.append(table)
    return Group(*parts)


# --- scoring -----------------------------------------------------------------------------------


def score_table(result: Any) -> Table:
    """A run's counts and throughput (a ScoreResult)."""
    from ..score.results import predictions_root

    table = Table(
        title=f"model {result.model_version} (scoring {result.scoring_version}), "
        f"run_date={result.run_date}"
    )
    table.add_column("")
    table.add_column("", justify="right")
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(result.error_reasons.items()))
    gated = ", ".join(f"{k} {v}" for k, v in sorted(result.gate_reasons.items()))
    for name, value in (
        ("inputs", result.n_inputs),
        ("scored", result.n_scored),
        (
            "out of scope (input gate)",
            f"{result.n_out_of_scope}" + (f" ({gated})" if gated else ""),
        ),
        ("skipped (already scored)", result.n_skipped),
        ("errors", f"{result.n_errors}" + (f" ({reasons})" if reasons else "")),
        ("  of which retried next run", result.n_retry),
        ("files written", result.n_files),
        ("scoring actors", f"{result.workers} × {result.threads} thread(s) on {result.device}"),
        ("img/s (first read → last write)", f"{result.img_per_s:.1f}"),
        ("scoring time", f"{result.elapsed_s:.1f} s"),
        ("startup (Ray, model load)", f"{result.startup_s:.1f} s"),
        ("wall time", f"{result.wall_s:.1f} s"),
    ):
        table.add_row(name, str(value))
    if result.stage_s:  # where the time went (ScoreResult.stage_s)
        stages = ", ".join(f"{k} {v:.2f}" for k, v in result.stage_s.items())
        table.add_row("seconds by stage (summed over batches)", stages)
    if result.actor_busy is not None:
        table.add_row("scoring actors busy (model + encode)", f"{result.actor_busy:.0%}")
    for line in result.drift:  # covidray.drift: this run beside the validation split
        kind = "refused" if line.kind == "refused" else "class"
        ref = "–" if line.reference is None else f"{line.reference:.1%}"
        share = "–" if line.share is None else f"{line.share:.1%}"
        flag = "  [bold red]shifted[/bold red]" if line.shifted else ""
        table.add_row(f"{kind}: {escape(line.key)}", f"{share} (validation {ref}){flag}")
    table.add_row("output", predictions_root(result.out))
    return table


# --- Ray jobs ----------------------------------------------------------------------------------


def jobs_table(rows: list[dict[str, str]]) -> Table:
    """``covidray jobs list``: one row per job (runtime.jobs.job_row)."""
    table = Table(title="Ray jobs")
    for name in rows[0] if rows else ("id", "status", "command"):
        table.add_column(name)
    for row in rows:
        table.add_row(*(escape(v) for v in row.values()))
    return table
