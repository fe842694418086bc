"""``report.md`` and a self-contained ``report.html`` (tables + embedded PNGs), from ``results.jsonl`` alone.

The report is built once as a list of blocks (headings, paragraphs, tables, figures) and rendered twice, so
the Markdown and the HTML always say the same thing.
"""

from __future__ import annotations

import base64
import functools
import html
import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from metalr.evaluation import plots
from metalr.evaluation.metrics import Analysis, final_test, final_valid_loss, is_diverged
from metalr.evaluation.records import RunRecord
from metalr.evaluation.statistics import mean_ci
from metalr.io import atomic_write_text, read_jsonl

RESULTS = "results.jsonl"
FIGURES = "figures"


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Figure:
    path: Path
    caption: str


Block = Heading | Paragraph | Table | Figure


# ----------------------------------------------------------------------------------------------------------
# Loading


def load_records(path: str | Path) -> list[RunRecord]:
    """The records of ``results.jsonl``, first one per cell key (a duplicate or torn line changes nothing).

    Raises:
        RecordError: a record of a version this metalr cannot read (the message names the version).
    """
    records: dict[str, RunRecord] = {}
    for data in read_jsonl(path):
        if isinstance(data, dict) and "key" in data and data["key"] not in records:
            records[data["key"]] = RunRecord.from_json(data)
    return list(records.values())


# ----------------------------------------------------------------------------------------------------------
# Number formatting


def fmt(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.{digits}g}"


def fmt_ci(values: Sequence[float], confidence: float) -> str:
    mean, half = mean_ci(values, confidence)
    if math.isnan(mean):
        return "-"
    return fmt(mean) if math.isnan(half) else f"{fmt(mean)} ± {fmt(half, 2)}"


def fmt_steps(value: float) -> str:
    return "never" if math.isinf(value) else f"{value:.0f}"


def fmt_ratio(value: float) -> str:
    return "-" if math.isnan(value) else f"{fmt(value, 3)}x"


def fmt_percent(value: float) -> str:
    return "-" if math.isnan(value) else f"{100 * value:.0f}%"


# ----------------------------------------------------------------------------------------------------------
# Tables


def summary_table(analysis: Analysis) -> Table:
    """One row per method at the 1x budget: score, time-to-target, speed-ups, wins, cost.

    With tuning on there are two speed-up columns (vs the tuned reference and vs the reference at its default
    LR); with tuning off they would be the same column, so there is one.
    """
    protocol = analysis.protocol
    reference = protocol.reference
    tuned_reference = protocol.tune and analysis.tuned.get(reference, False)
    scores = analysis.scores()
    rows = []
    for method in analysis.methods:
        reported = [r for t in analysis.tasks for r in analysis.reported_runs(t, method)]
        diverged = sum(is_diverged(r, protocol.divergence_ratio) for r in reported)
        if method == reference:
            win = p_value = loss_ratio = "-"
        else:
            comparison = analysis.compare(method, reference)
            win = f"{fmt_percent(comparison.win_rate)} [{fmt_percent(comparison.ci_low)}, {fmt_percent(comparison.ci_high)}]"
            p_value = fmt(comparison.p_value, 2)
            loss_ratio = fmt_ratio(math.exp(comparison.median_log_ratio)) if comparison.pairs else "-"
        speedups = [analysis.speedup(method, "tuned")] if tuned_reference else []
        speedups.append(analysis.speedup(method, "default"))
        if not analysis.tuned.get(method, False):
            tuning = "self-tuning"
        else:
            tuning = "LR grid" if protocol.tune else "default LR"
        rows.append(
            (
                method,
                tuning,
                fmt(analysis.tuning_cost(method), 3),
                fmt(scores[method], 3),
                f"{analysis.reached(method)}/{len(analysis.tasks)}",
                *(f"{fmt_ratio(value)} ({tasks})" for value, tasks in speedups),
                loss_ratio,
                win,
                p_value,
                f"{diverged}/{len(reported)}",
            )
        )
    speedup_headers = [f"speed-up vs tuned {reference} (tasks)"] if tuned_reference else []
    speedup_headers.append(f"speed-up vs default-LR {reference} (tasks)")
    return Table(
        (
            "method",
            "tuning",
            "runs/task",
            "score",
            "reached target",
            *speedup_headers,
            f"test loss vs {reference} (median)",
            f"win rate vs {reference} [{protocol.confidence:.0%} CI]",
            "Wilcoxon p",
            "diverged",
        ),
        tuple(rows),
    )


def wins_table(analysis: Analysis) -> Table:
    """Win rate (final test loss, paired by task and seed) of each method (row) against each other (column)."""
    rows = []
    for method in analysis.methods:
        cells = [method]
        for baseline in analysis.methods:
            if baseline == method:
                cells.append("-")
                continue
            comparison = analysis.compare(method, baseline)
            cells.append(
                f"{fmt_percent(comparison.win_rate)} [{fmt_percent(comparison.ci_low)}, "
                f"{fmt_percent(comparison.ci_high)}] p={fmt(comparison.p_value, 2)}"
            )
        rows.append(tuple(cells))
    return Table(("method \\ vs", *analysis.methods), tuple(rows))


def per_task_table(analysis: Analysis) -> Table:
    """Per task and method: LR used, final losses and accuracy (mean ± CI over seeds), time-to-target, wins."""
    confidence = analysis.protocol.confidence
    reference = analysis.protocol.reference
    rows = []
    for task in analysis.tasks:
        target = analysis.target(task)
        for i, method in enumerate(analysis.methods):
            runs, tuned_lr = analysis.reported(task, method)
            if not runs:
                continue
            lr = (
                f"{fmt(tuned_lr, 3)} (tuned)"
                if tuned_lr is not None
                else f"{fmt(runs[0].lr, 3)} (default)"
            )
            steps, seconds = analysis.median_time_to_target(runs)
            accuracy = [final_test(r, "accuracy") for r in runs]
            if method == reference:
                wins = "-"
            else:
                ours, theirs = analysis.paired_losses_on(task, method, reference)
                wins = f"{sum(a < b for a, b in zip(ours, theirs, strict=True))}/{len(ours)}"
            rows.append(
                (
                    f"{analysis.task_labels[task]} (target {fmt(target)})" if i == 0 else "",
                    method,
                    lr,
                    fmt_ci([final_valid_loss(r) for r in runs], confidence),
                    fmt_ci([final_test(r) for r in runs], confidence),
                    "-" if all(math.isnan(a) for a in accuracy) else fmt_ci(accuracy, confidence),
                    fmt_steps(steps),
                    fmt(seconds, 3),
                    wins,
                )
            )
    return Table(
        (
            "task",
            "method",
            "initial LR",
            "final valid loss",
            "final test loss",
            "test accuracy",
            "steps to target",
            "seconds to target",
            f"wins vs {reference}",
        ),
        tuple(rows),
    )


def sensitivity_table(analysis: Analysis) -> Table:
    rows = []
    for method in analysis.methods:
        diverged, total = analysis.diverged_runs(method, "grid")
        if not total:
            continue
        rows.append((method, fmt(analysis.sensitivity_spread(method), 3), f"{diverged}/{total}"))
    return Table(
        ("method", "loss spread max/min over the grid (median over tasks)", "diverged grid runs"), tuple(rows)
    )


def horizon_table(analysis: Analysis) -> Table:
    """Per method: score, tasks reaching the target and final loss relative to the reference, per budget."""
    horizons = sorted(analysis.horizons)
    scores = {h: analysis.scores(h) for h in horizons}
    rows = []
    for method in analysis.methods:
        rows.append(
            (
                method,
                *(fmt(scores[h][method], 3) for h in horizons),
                *(f"{analysis.reached(method, h)}/{len(analysis.tasks)}" for h in horizons),
                *(fmt_ratio(analysis.horizon_loss_ratio(method, h)) for h in horizons),
            )
        )
    reference = analysis.protocol.reference
    return Table(
        (
            "method",
            *(f"score {h:g}x" for h in horizons),
            *(f"reached {h:g}x" for h in horizons),
            *(f"valid loss / {reference}'s {h:g}x" for h in horizons),
        ),
        tuple(rows),
    )


def stability_table(analysis: Analysis) -> Table:
    rows = []
    for method in analysis.methods:
        roughness, seed_cv = analysis.lr_stability(method)
        rows.append((method, fmt(roughness, 3), fmt(seed_cv, 3)))
    return Table(("method", "mean abs change of ln LR per step", "across-seed CV of the LR"), tuple(rows))


def resources_table(analysis: Analysis) -> Table:
    """Time and memory per method; the memory columns say what they measure (per run or per worker)."""
    reference = analysis.resources(analysis.protocol.reference).seconds_per_1k_steps
    rows = []
    for method in analysis.methods:
        resources = analysis.resources(method)
        overhead = resources.seconds_per_1k_steps / reference if reference and reference > 0 else math.nan
        rows.append(
            (
                method,
                fmt(resources.seconds_per_1k_steps, 3),
                fmt_ratio(overhead),
                fmt(resources.optimizer_state_mb, 3),
                fmt(resources.rss_growth_mb, 3),
                fmt(resources.peak_rss_mb, 4),
                fmt(resources.peak_cuda_mb, 4),
                str(analysis.runs_of(method)),
            )
        )
    return Table(
        (
            "method",
            "training s / 1000 steps",
            f"time vs {analysis.protocol.reference}",
            "optimizer state MB (per run)",
            "peak RSS growth MB (per run)",
            "worker peak RSS MB (incl. imports, data)",
            "peak CUDA MB",
            "runs",
        ),
        tuple(rows),
    )


# ----------------------------------------------------------------------------------------------------------
# The document


def _protocol_text(analysis: Analysis) -> str:
    protocol = analysis.protocol
    tasks = ", ".join(analysis.task_labels[t] for t in analysis.tasks)
    if protocol.tune:
        tuning = (
            f"tuned methods run over a {protocol.lr_grid_points}-point initial-LR grid x {protocol.seeds} seeds and "
            "report the grid point with the lowest median final `inner_valid` loss; self-tuning methods run once per "
            "seed at the task's default LR"
        )
    else:
        tuning = f"tuning off: every method runs at the task's default LR, {protocol.seeds} seeds"
    target = (
        f"the median final `inner_valid` loss of {protocol.reference}'s reported runs"
        if protocol.target == "reference"
        else "the best median final `inner_valid` loss among the tuned baselines"
    )
    return (
        f"Suite `{protocol.suite}` ({protocol.split}), {len(analysis.tasks)} tasks: {tasks}. {tuning[0].upper()}{tuning[1:]}. "
        f"Target per task: {target}. Losses and accuracy of the reported runs are on `test`; nothing selects on "
        f"`test`. {len(analysis.records)} runs."
    )


DEFINITIONS = (
    "Definitions. *score*: AlgoPerf-style integral of the performance profile rho(tau) over [1, r_max] / (r_max - 1), "
    "with the ratio of a method's median steps-to-target to the fastest method's on each task (1 = fastest "
    "everywhere, 0 = never within r_max). *speed-up*: geometric mean over the tasks both reach of the reference's "
    "steps-to-target / the method's. *win rate*: fraction of (task, seed) pairs with lower final test loss (ties "
    "count one half), with a percentile-bootstrap CI; *Wilcoxon p*: two-sided signed-rank test of the paired "
    "log test-loss ratios. *runs/task*: training runs that produced the reported result (the tuning cost). "
    "*diverged*: NaN/inf loss or final validation loss above the initial one. Mean ± half-width of the Student-t CI "
    "over seeds."
)


def build_document(analysis: Analysis, figures_dir: Path) -> list[Block]:
    """Every section of the report, figures drawn into ``figures_dir``."""
    protocol = analysis.protocol
    blocks: list[Block] = [Heading(protocol.name, 1), Paragraph(_protocol_text(analysis))]
    blocks += [Heading("Summary (1x budget)"), summary_table(analysis), Paragraph(DEFINITIONS)]
    blocks += [Heading("Win rates (row vs column, final test loss)"), wins_table(analysis)]
    blocks += [Heading("Per task"), per_task_table(analysis)]

    figure_specs: list[tuple[str, str, Callable[[Path], Path | None]]] = [
        ("Performance profile", "profile.png", lambda p: plots.performance_profile_plot(analysis, p)),
    ]
    blocks += [Heading("Performance profile")]
    blocks += _figures(figures_dir, figure_specs)

    sensitivity = sensitivity_table(analysis)
    if sensitivity.rows:
        blocks += [Heading("Sensitivity to the initial LR"), sensitivity]
        blocks += _figures(
            figures_dir,
            [
                (
                    "Final validation loss vs initial LR",
                    "sensitivity.png",
                    lambda p: plots.sensitivity_plot(analysis, p),
                )
            ],
        )
    if len(analysis.horizons) > 1:
        blocks += [Heading("Horizon transfer"), horizon_table(analysis)]
        blocks += _figures(
            figures_dir, [("Horizon transfer", "horizons.png", lambda p: plots.horizon_plot(analysis, p))]
        )

    blocks += [Heading("Learning curves (median and range over seeds; LR trace below)")]
    blocks += _figures(
        figures_dir,
        [
            (
                analysis.task_labels[task],
                f"curves-{i:02d}.png",
                functools.partial(plots.learning_curves_plot, analysis, task),
            )
            for i, task in enumerate(analysis.tasks)
        ],
    )
    blocks += [Heading("LR stability"), stability_table(analysis)]
    blocks += _figures(
        figures_dir, [("LR trajectories", "lr-stability.png", lambda p: plots.lr_stability_plot(analysis, p))]
    )
    blocks += [Heading("Resources"), resources_table(analysis)]
    blocks += _figures(
        figures_dir, [("Resources", "resources.png", lambda p: plots.resources_plot(analysis, p))]
    )
    return blocks


def _figures(directory: Path, specs: Sequence[tuple[str, str, Callable[[Path], Path | None]]]) -> list[Block]:
    out: list[Block] = []
    for caption, name, draw in specs:
        path = draw(directory / name)
        if path is not None:
            out.append(Figure(path, caption))
    return out


# ----------------------------------------------------------------------------------------------------------
# Rendering


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def table_markdown(table: Table) -> str:
    lines = ["| " + " | ".join(_md_cell(h) for h in table.header) + " |", "|" + "---|" * len(table.header)]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in table.rows]
    return "\n".join(lines)


def render_markdown(blocks: Sequence[Block], root: Path) -> str:
    parts = []
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"{'#' * block.level} {block.text}")
        elif isinstance(block, Paragraph):
            parts.append(block.text)
        elif isinstance(block, Table):
            parts.append(table_markdown(block))
        else:
            parts.append(f"![{block.caption}]({block.path.relative_to(root).as_posix()})")
    return "\n\n".join(parts) + "\n"


_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:1em 0;font-size:13px}"
    "th,td{border:1px solid #ccc;padding:3px 7px;text-align:left}th{background:#f3f3f3}"
    "img{max-width:100%;display:block;margin:0.5em 0}figcaption{font-size:12px;color:#555}"
)


def _inline_markdown(text: str) -> str:
    """The little inline Markdown the report uses (`code` and *emphasis*), as HTML."""
    escaped = html.escape(text)
    out = []
    for i, part in enumerate(escaped.split("`")):
        if i % 2:
            out.append(f"<code>{part}</code>")
        else:
            pieces = part.split("*")
            out.append("".join(f"<em>{p}</em>" if j % 2 else p for j, p in enumerate(pieces)))
    return "".join(out)


def render_html(blocks: Sequence[Block]) -> str:
    """A single HTML file: no external CSS, scripts or images (PNGs are embedded as data URIs)."""
    title = next((b.text for b in blocks if isinstance(b, Heading)), "metalr evaluation")
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style></head><body>",
    ]
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"<h{block.level}>{html.escape(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            parts.append(f"<p>{_inline_markdown(block.text)}</p>")
        elif isinstance(block, Table):
            head = "".join(f"<th>{html.escape(h)}</th>" for h in block.header)
            body = "".join(
                "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in block.rows
            )
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        else:
            data = base64.b64encode(block.path.read_bytes()).decode("ascii")
            parts.append(
                f"<figure><img alt='{html.escape(block.caption)}' src='data:image/png;base64,{data}'>"
                f"<figcaption>{html.escape(block.caption)}</figcaption></figure>"
            )
    parts.append("</body></html>")
    return "\n".join(parts)


def summary_text(analysis: Analysis) -> str:
    """What the CLI prints: the summary table and the per-task table, as Markdown."""
    return "\n\n".join(
        [
            f"{analysis.protocol.name}: {len(analysis.tasks)} held-out tasks, {len(analysis.records)} runs",
            table_markdown(summary_table(analysis)),
            table_markdown(per_task_table(analysis)),
        ]
    )


def render_report(out_dir: str | Path, planned: Collection[str] | None = None) -> str:
    """Re-render ``report.md``, ``report.html`` and the figures from ``out_dir/results.jsonl`` alone.

    Args:
        out_dir: the evaluation directory.
        planned: the cell keys to report (an evaluation's plan); records outside it stay in the file but
            not in the report, which says how many. ``None`` reports every record.

    Returns:
        The summary (Markdown tables) for printing.

    Raises:
        FileNotFoundError: ``out_dir`` has no results (or only torn ones) in ``planned``.
    """
    out_dir = Path(out_dir)
    every = load_records(out_dir / RESULTS)
    records = every if planned is None else [r for r in every if r.key in planned]
    if not records:
        raise FileNotFoundError(f"{out_dir / RESULTS} holds no finished runs of this evaluation")
    analysis = Analysis(records)
    blocks = build_document(analysis, out_dir / FIGURES)
    note = ""
    if left_out := len(every) - len(records):
        note = f"{left_out} records in {RESULTS} are outside this evaluation's plan and not reported."
        blocks.insert(1, Paragraph(note))
    atomic_write_text(out_dir / "report.md", render_markdown(blocks, out_dir))
    atomic_write_text(out_dir / "report.html", render_html(blocks))
    return f"{note}\n\n{summary_text(analysis)}" if note else summary_text(analysis)
