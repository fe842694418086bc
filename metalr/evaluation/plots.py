"""Report figures (matplotlib, Agg backend: no display needed). Each function writes one PNG and returns it.

A method keeps one style in every figure (from its position in the suite), so figures can be read side by
side: :func:`method_styles` gives each method its own (colour, marker, line style), for any number of methods.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from metalr.evaluation.metrics import Analysis, is_diverged

DPI = 110


def _pyplot() -> Any:
    # Imported on first use: workers import this package but never draw, and the import costs ~0.5 s.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# matplotlib's tab10 colours (hex, so no matplotlib import is needed to pick them) and ten filled markers.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
LINESTYLES: tuple[Any, ...] = ("-", "--", ":", "-.")


class Style(NamedTuple):
    """How one method is drawn."""

    color: str
    marker: str
    linestyle: Any  # a matplotlib line style: a name or an (offset, dash pattern) pair


def method_styles(methods: Sequence[str]) -> dict[str, Style]:
    """A distinct style per method: method ``i`` gets colour ``i mod 10`` and, per block of ten methods
    (``i div 10``), its own marker and line style, so no two methods share a colour with a marker or a
    line style. Past the four named line styles, each block gets a dash pattern of its own."""
    styles = {}
    for i, method in enumerate(methods):
        block, position = divmod(i, len(PALETTE))
        linestyle = LINESTYLES[block] if block < len(LINESTYLES) else (0, (block, 2))
        styles[method] = Style(PALETTE[position], MARKERS[block % len(MARKERS)], linestyle)
    return styles


def _colors(methods: Sequence[str]) -> dict[str, str]:
    return {method: style.color for method, style in method_styles(methods).items()}


def _line(style: Style, points: int = 0) -> dict[str, Any]:
    """Keyword arguments drawing a line in ``style``; a line of ``points`` points gets about 8 markers."""
    return {
        "color": style.color,
        "marker": style.marker,
        "ls": style.linestyle,
        "ms": 4,
        "markevery": max(1, points // 8) if points else None,
    }


def _legend_outside(fig: Any, axes: Sequence[Any]) -> None:
    """One legend for the whole figure, right of the panels, so it never covers a curve or a title."""
    handles: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    if handles:
        fig.legend(
            list(handles.values()),
            list(handles),
            loc="center left",
            bbox_to_anchor=(1.0, 0.5),
            fontsize=7,
            frameon=False,
        )


def _grid(count: int, max_cols: int = 3) -> tuple[int, int]:
    cols = min(max_cols, max(1, count))
    return math.ceil(count / cols), cols


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def performance_profile_plot(analysis: Analysis, path: Path, horizon: float = 1.0) -> Path:
    """rho(tau) per method over [1, r_max] (AlgoPerf's performance profile), score in the legend."""
    plt = _pyplot()
    styles = method_styles(analysis.methods)
    max_ratio = analysis.protocol.profile_max_ratio
    taus = np.linspace(1.0, max_ratio, 301)
    scores = analysis.scores(horizon)
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for method, ratios in analysis.ratios(horizon).items():
        rho = [np.mean([r <= tau for r in ratios.values()]) if ratios else np.nan for tau in taus]
        ax.step(
            taus,
            rho,
            where="post",
            **_line(styles[method], len(taus)),
            label=f"{method} (score {scores[method]:.3f})",
        )
    ax.set_xlim(1.0, max_ratio)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("tau (steps-to-target / fastest method's)")
    ax.set_ylabel("fraction of tasks within tau")
    ax.set_title(f"Performance profile ({horizon:g}x budget)")
    ax.grid(alpha=0.3)
    _legend_outside(fig, [ax])
    return _save(fig, path)


def sensitivity_plot(analysis: Analysis, path: Path) -> Path | None:
    """Final validation loss vs initial LR, one panel per task, one line per method; x = diverged runs."""
    tasks = [t for t in analysis.tasks if any(analysis.grid_runs(t, m) for m in analysis.methods)]
    if not tasks:
        return None
    plt = _pyplot()
    styles = method_styles(analysis.methods)
    colors = _colors(analysis.methods)
    rows, cols = _grid(len(tasks))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    ratio = analysis.protocol.divergence_ratio
    for ax, task in zip(axes.flat, tasks, strict=False):
        nonfinite: list[tuple[float, str]] = []
        positive = True
        for method in analysis.methods:
            curve = analysis.sensitivity_curve(task, method)
            if not curve:
                continue
            lrs = np.array([lr for lr, _ in curve])
            losses = np.array([loss for _, loss in curve])
            ok = np.isfinite(losses)
            positive &= bool((losses[ok] > 0).all())
            ax.plot(lrs[ok], losses[ok], **_line(styles[method]), label=method)
            diverged = {r.lr for r in analysis.grid_runs(task, method) if is_diverged(r, ratio)}
            for lr, loss in curve:
                if lr in diverged and math.isfinite(loss):
                    ax.scatter([lr], [loss], marker="x", color=colors[method], s=30, zorder=3)
                elif lr in diverged:
                    nonfinite.append((lr, method))
        if positive:
            ax.set_yscale("log")
        # Non-finite losses have no y; draw them on the top edge once the axis limits are final.
        top = ax.get_ylim()[1]
        for lr, method in nonfinite:
            ax.scatter([lr], [top], marker="x", color=colors[method], s=30, clip_on=False, zorder=3)
        ax.set_xscale("log")
        ax.set_title(analysis.task_labels[task], fontsize=9)
        ax.set_xlabel("initial LR")
        ax.set_ylabel("final valid loss (median)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(tasks) :]:
        ax.set_visible(False)
    _legend_outside(fig, list(axes.flat))
    fig.suptitle(
        "Sensitivity to the initial LR (x: diverged at that LR; on the top edge: NaN/inf)", fontsize=10
    )
    return _save(fig, path)


def learning_curves_plot(analysis: Analysis, task: str, path: Path, horizon: float = 1.0) -> Path:
    """Validation loss (median and range over seeds) with the LR trace under it, for one task."""
    plt = _pyplot()
    styles = method_styles(analysis.methods)
    colors = _colors(analysis.methods)
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(7.0, 5.6), sharex=True, height_ratios=(3, 2))
    positive = True
    for method in analysis.methods:
        runs = analysis.reported_runs(task, method, horizon)
        if not runs:
            continue
        length = min(len(r.valid) for r in runs)
        steps = np.array([p["step"] for p in runs[0].valid[:length]], dtype=float)
        losses = np.array([[p["loss"] for p in r.valid[:length]] for r in runs], dtype=float)
        losses = np.where(np.isfinite(losses), losses, np.nan)
        positive &= bool(np.nanmin(losses, initial=1.0) > 0)
        with np.errstate(all="ignore"), _quiet():
            median = np.nanmedian(losses, axis=0)
            ax_loss.fill_between(
                steps, np.nanmin(losses, 0), np.nanmax(losses, 0), color=colors[method], alpha=0.15
            )
        ax_loss.plot(steps, median, **_line(styles[method], len(steps)), label=method)
        trace_len = min(len(r.lr_trace) for r in runs)
        if trace_len:
            traces = np.array([r.lr_trace[:trace_len] for r in runs], dtype=float)
            with _quiet():
                ax_lr.plot(
                    np.arange(1, trace_len + 1),
                    np.nanmedian(traces, 0),
                    **_line(styles[method], trace_len),
                    lw=1.2,
                )
    target = analysis.target(task, horizon)
    if math.isfinite(target):
        ax_loss.axhline(target, color="black", ls="--", lw=0.8, label="target")
    if positive:
        ax_loss.set_yscale("log")
    ax_loss.set_ylabel("inner_valid loss")
    ax_loss.grid(alpha=0.3)
    ax_loss.set_title(f"{analysis.task_labels[task]} ({horizon:g}x budget)", fontsize=10)
    ax_lr.set_yscale("log")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    _legend_outside(fig, [ax_loss])
    return _save(fig, path)


def lr_stability_plot(analysis: Analysis, path: Path) -> Path:
    """LR / initial LR against training progress for every reported run, one panel per method."""
    plt = _pyplot()
    colors = _colors(analysis.methods)
    rows, cols = _grid(len(analysis.methods), 4)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.6 * rows), squeeze=False, sharey=True)
    for ax, method in zip(axes.flat, analysis.methods, strict=False):
        for task in analysis.tasks:
            for record in analysis.reported_runs(task, method):
                trace = np.asarray(record.lr_trace, dtype=float)
                if trace.size == 0 or not trace[0] > 0:
                    continue
                progress = np.arange(1, trace.size + 1) / record.steps
                ax.plot(progress, trace / trace[0], color=colors[method], alpha=0.35, lw=0.8)
        roughness, seed_cv = analysis.lr_stability(method)
        ax.set_title(f"{method}\n|d ln LR|/step {roughness:.2g}, seed CV {seed_cv:.2g}", fontsize=8)
        ax.set_yscale("log")
        ax.set_xlabel("progress t/T")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(analysis.methods) :]:
        ax.set_visible(False)
    axes[0][0].set_ylabel("LR / initial LR")
    fig.suptitle("LR trajectories of the reported runs (every task and seed)", fontsize=10)
    return _save(fig, path)


def resources_plot(analysis: Analysis, path: Path) -> Path:
    """Per method: training seconds per 1000 steps, optimizer state, and the memory a run added at its peak
    (CUDA when the runs used a GPU, else RSS growth). Per-run numbers: the worker's baseline is left out."""
    plt = _pyplot()
    colors = _colors(analysis.methods)
    resources = {m: analysis.resources(m) for m in analysis.methods}
    use_cuda = any(r.peak_cuda_mb > 0 for r in resources.values())
    memory_key, memory_label = (
        ("peak_cuda_mb", "peak CUDA memory (MB)") if use_cuda else ("rss_growth_mb", "peak RSS growth in a run (MB)")
    )
    panels = (
        ("seconds_per_1k_steps", "training seconds / 1000 steps"),
        ("optimizer_state_mb", "optimizer state (MB)"),
        (memory_key, memory_label),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(13.0, 3.4))
    x = np.arange(len(analysis.methods))
    bar_colors = [colors[m] for m in analysis.methods]
    for ax, (key, label) in zip(axes, panels, strict=True):
        ax.bar(x, [getattr(resources[m], key) for m in analysis.methods], color=bar_colors)
        ax.set_ylabel(label)
        ax.set_xticks(x, analysis.methods, rotation=30, ha="right", fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("Resources (median over the reported runs)", fontsize=10)
    return _save(fig, path)


def horizon_plot(analysis: Analysis, path: Path) -> Path | None:
    """Final validation loss relative to the reference at every horizon (geometric mean over tasks)."""
    if len(analysis.horizons) < 2:
        return None
    plt = _pyplot()
    styles = method_styles(analysis.methods)
    horizons = sorted(analysis.horizons)
    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    for method in analysis.methods:
        ratios = [analysis.horizon_loss_ratio(method, h) for h in horizons]
        ax.plot(horizons, ratios, **_line(styles[method]), label=method)
    ax.axhline(1.0, color="black", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xticks(horizons, [f"{h:g}x" for h in horizons])
    ax.set_xlabel("step budget (x the 1x budget)")
    ax.set_ylabel(f"final valid loss / {analysis.protocol.reference}'s")
    ax.grid(alpha=0.3)
    ax.set_title("Horizon transfer", fontsize=10)
    _legend_outside(fig, [ax])
    return _save(fig, path)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence numpy's all-NaN slice warnings (a diverged seed leaves NaN columns; the median is still right)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield
