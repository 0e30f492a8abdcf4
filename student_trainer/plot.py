"""A picture of training runs from their `metrics.jsonl`: validation top-1 per epoch and images/s.

    python -m student_trainer plot runs/demo/student-plain-s0 runs/demo/student-cached-s0 --out results.png

Runs whose directory names differ only in a trailing `-s<N>` are seeds of one curve: their mean is
drawn with a band of one standard deviation, and the legend says how many seeds it holds.
"""

from __future__ import annotations

import json
import re
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from distill_core import Command, Positional

SEED_SUFFIX = re.compile(r"-s\d+$")


def read_metrics(run: str | Path) -> list[dict]:
    path = Path(run) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {run} a training run's directory?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def group_runs(runs: list[str | Path]) -> dict[str, list[Path]]:
    """{curve name: run directories}, seeds (a trailing -s<N>) grouped, in the order given."""
    groups: dict[str, list[Path]] = defaultdict(list)
    for run in runs:
        groups[SEED_SUFFIX.sub("", Path(run).name)].append(Path(run))
    return dict(groups)


def throughput(records: list[dict]) -> float | None:
    """Training images/s of a run after each epoch's first step (start-up and epoch turns excluded)."""
    images = sum(r.get("steady_images", 0) for r in records)
    seconds = sum(r.get("steady_seconds", 0.0) for r in records)
    return images / seconds if seconds else None


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def plot_runs(groups: dict[str, list[Path]], out: str | Path, title: str | None = None) -> Path:
    """Two panels: validation top-1 per epoch (mean ± std over seeds) and images/s per curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc, speed) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [2.2, 1]})
    names, rates, errors, colors = [], [], [], []
    for i, (name, runs) in enumerate(groups.items()):
        metrics = [read_metrics(r) for r in runs]
        per_epoch: dict[int, list[float]] = defaultdict(list)
        for records in metrics:
            for r in records:
                if "val_top1" in r:
                    per_epoch[r["epoch"] + 1].append(r["val_top1"])
        epochs = sorted(e for e, v in per_epoch.items() if len(v) == len(runs))  # epochs every seed evaluated
        if epochs:
            mean = [statistics.mean(per_epoch[e]) for e in epochs]
            std = [mean_std(per_epoch[e])[1] for e in epochs]
            label = f"{name} ({len(runs)} seed{'s' if len(runs) > 1 else ''}): {mean[-1]:.1f}%"
            style = ("-", "--", ":", "-.")[i % 4]  # identical curves (cached = online) stay visible
            (line,) = acc.plot(epochs, mean, style, label=label, color=f"C{i}")
            low, high = [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)]
            acc.fill_between(epochs, low, high, alpha=0.15, lw=0, color=f"C{i}")
            line.set_marker("." if len(epochs) < 30 else None)
        rate = [t for t in map(throughput, metrics) if t]
        if rate:
            names.append(name)
            colors.append(f"C{i}")
            m, s = mean_std(rate)
            rates.append(m)
            errors.append(s)
    acc.set_xlabel("epoch")
    acc.set_ylabel("validation top-1 (%)")
    acc.grid(alpha=0.3)
    acc.legend(loc="lower right", fontsize=8)
    bars = speed.bar(range(len(names)), rates, yerr=errors, capsize=4, color=colors)
    speed.bar_label(bars, labels=[f"{r:.0f}" for r in rates], fontsize=8)
    speed.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    speed.set_ylabel("training images/s")
    speed.grid(axis="y", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


class PlotConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    runs: Annotated[list[str], Positional()] = Field(description="run directories (each with a metrics.jsonl)")
    out: str = Field("results.png", description="PNG file to write")
    title: str | None = Field(None, description="title above the panels")


def run_plot(cfg: PlotConfig) -> dict:
    groups = group_runs(cfg.runs)
    path = plot_runs(groups, cfg.out, cfg.title)
    return {"out": str(path), "curves": {name: len(runs) for name, runs in groups.items()}}


COMMAND = Command(
    "plot",
    help="plot validation top-1 per epoch and images/s of runs (metrics.jsonl) into a PNG",
    description=__doc__.split("\n\n")[0],
    config=PlotConfig,
    run=run_plot,
)
