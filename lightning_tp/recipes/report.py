"""What a recipe run tells a person at the end: rounded numbers, and the loss curve as a PNG.

``summary.json`` keeps the full-precision numbers; only what rank 0 prints is rounded here.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "format_bytes",
    "format_count",
    "format_duration",
    "format_loss",
    "has_matplotlib",
    "read_train_losses",
    "summary_lines",
    "write_loss_curve",
]

History = Sequence[tuple[int, float]]


def format_duration(seconds: float) -> str:
    """``4.2 s``, ``38 s``, ``3 min 49 s``, ``1 h 05 min``: rounded to what a person reads."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    if seconds < 10:
        return f"{seconds:.1f} s"
    total = round(seconds)
    if total < 60:
        return f"{total} s"
    if total < 3600:
        return f"{total // 60} min {total % 60} s"
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min"


def format_count(value: float | None) -> str:
    """``1,600`` (thousands separated, no decimals); below 10 one decimal (``2.5``); ``?`` when
    unknown."""
    if value is None or not math.isfinite(value):
        return "?"
    return f"{value:.1f}" if abs(value) < 10 else f"{value:,.0f}"


def format_bytes(value: float | None) -> str:
    """``512 B``, ``14.6 MB``, ``538 MB``, ``1.2 GB`` (powers of 1000); ``?`` when unknown."""
    if value is None or not math.isfinite(value):
        return "?"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(value) >= size:
            scaled = value / size
            return f"{scaled:.1f} {unit}" if scaled < 100 else f"{scaled:,.0f} {unit}"
    return f"{value:.0f} B"


def format_loss(value: float | None) -> str:
    """A loss to 2 decimals (``6.38``); ``?`` when unknown."""
    if value is None or not math.isfinite(value):
        return "?"
    return f"{value:.2f}"


def summary_lines(summary: dict[str, Any], *, sizes: tuple[int, int | str] | None = None,
                  loss_curve: str | None = None, out_dir: str | None = None) -> list[str]:
    """The lines rank 0 prints after a run, from a recipe summary (``run()``'s return value)."""
    processes = summary.get("world_size")
    layout = f" (dp={sizes[0]} x tp={sizes[1]})" if sizes else ""
    parts = [f"{summary.get('steps')} steps in {format_duration(summary.get('wall_time_s'))} on"
             f" {processes} process{'es' if processes != 1 else ''}{layout}"]
    history = summary.get("val_loss_history") or []
    if history:
        first, last = history[0][1], history[-1][1]
        change = f" ({(last - first) / first:+.0%})" if len(history) > 1 and first else ""
        parts.append(f"val loss {format_loss(first)} -> {format_loss(last)}{change}")
    if summary.get("tokens_per_sec") is not None:
        parts.append(f"{format_count(summary['tokens_per_sec'])} tokens/s")
    lines = ["[lightning-tp] " + "; ".join(parts)]
    counts, lora = summary.get("parameters") or {}, summary.get("lora")
    if lora and counts.get("total"):
        share = counts["trainable"] / counts["total"]
        line = (f"[lightning-tp] LoRA rank {lora['rank']}: {counts['trainable']:,} of"
                f" {counts['total']:,} parameters trained ({share:.2%})")
        if summary.get("checkpoint_bytes") and counts.get("total_bytes"):
            line += (f"; checkpoint {format_bytes(summary['checkpoint_bytes'])} (adapters and"
                     f" their optimizer state) against {format_bytes(counts['total_bytes'])} of"
                     " weights in the full model")
        lines.append(line)
    if summary.get("sample") is not None:
        temperature, top_k = summary.get("sample_temperature", 0), summary.get("sample_top_k")
        how = "greedy"
        if temperature and top_k != 1:
            how = (f"temperature {temperature:g}, top-k {top_k if top_k else 'all'}, seed"
                   f" {summary.get('sample_seed')}")
        lines.append(f"[lightning-tp] sample ({how}): {summary.get('sample_prompt')!r} ->"
                     f" {summary['sample']!r}")
    if out_dir is not None:
        wrote = [f"{out_dir}/summary.json"] + ([loss_curve] if loss_curve else [])
        lines.append(f"[lightning-tp] wrote {', '.join(wrote)}; checkpoint"
                     f" {summary.get('checkpoint')}")
    return lines


def read_train_losses(metrics_csv: str | Path | None,
                      key: str = "train/loss") -> list[tuple[int, float]]:
    """``(step, loss)`` rows of a CSVLogger ``metrics.csv`` that have ``key``; [] when there is no
    such file.

    Lightning logs the loss of the batch taken after ``step`` optimizer steps at ``step``, so these
    points sit on the same axis as the validation history (validation after ``step`` optimizer
    steps).
    """
    if metrics_csv is None or not Path(metrics_csv).is_file():
        return []
    points = []
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            value, step = row.get(key), row.get("step")
            if value not in (None, "") and step not in (None, ""):
                points.append((int(float(step)), float(value)))
    return points


def has_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def write_loss_curve(path: str | Path, train: History, val: History,
                     title: str | None = None) -> Path | None:
    """Train and validation loss against the step, as a PNG at ``path``; ``None`` (nothing
    written) when matplotlib is not installed or there is nothing to plot."""
    if not has_matplotlib() or not (train or val):
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # A bare Figure on the Agg canvas: no pyplot, no GUI backend, no global state touched.
    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        ax.plot([s for s, _ in train], [v for _, v in train], label="train loss", linewidth=1.2)
    if val:
        ax.plot([s for s, _ in val], [v for _, v in val], "o-", label="val loss", linewidth=1.8)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
