"""The outputs of ``aplot-kernels train``: the summary over seeds, the table, ``metrics.json``, ``accuracy.png``.

``runs[method]`` is a list of per-seed results of :func:`~aplot_kernels.train.loop.train_run`, in the
order of the seeds; the first method is the baseline (Bradley-Terry) that every other method is
compared with seed by seed.
"""

from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Optional

from .stats import paired_difference, summarize

__all__ = ["metric_specs", "summarize_runs", "table", "write_json", "plot_curves", "LEVEL"]

LEVEL = 0.95
SPLIT_SHORT = {"test_id": "ID", "test_ood": "OOD"}
SPLIT_LABELS = {"test_id": "in-distribution", "test_ood": "out-of-distribution"}


def _short(split: str) -> str:
    return SPLIT_SHORT.get(split, split)


def _is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def metric_specs(runs: Dict[str, List[dict]], target_accuracy: float) -> List[dict]:
    """The reported metrics: final accuracy per split (all pairs, and hard pairs where the split has them), steps to target."""
    first = next(iter(runs.values()))[0]
    specs = []
    for split in first["final"]:
        specs.append({"key": f"{split}/accuracy", "label": f"{_short(split)} acc", "split": split, "field": "accuracy"})
        if not all(_is_missing(r["final"][split]["hard"]) for rs in runs.values() for r in rs):
            specs.append({"key": f"{split}/hard", "label": f"{_short(split)} hard", "split": split, "field": "hard"})
    if first["target_split"] is not None:
        specs.append({"key": "steps_to_target", "label": f"steps to {_short(first['target_split'])} {target_accuracy:.2f}"})
    return specs


def _value(result: dict, spec: dict):
    if spec["key"] == "steps_to_target":
        return result["steps_to_target"]
    return result["final"][spec["split"]][spec["field"]]


def summarize_runs(runs: Dict[str, List[dict]], labels: Dict[str, str], target_accuracy: float, level: float = LEVEL) -> dict:
    """Mean and spread of every metric per method, and each method's paired difference from the first (baseline)."""
    specs = metric_specs(runs, target_accuracy)
    baseline = next(iter(runs))
    summary = {
        "baseline": baseline,
        "seeds": [r["seed"] for r in runs[baseline]],
        "level": level,
        "interval": f"{level:.0%} paired t-interval (Student's t, n - 1 degrees of freedom)",
        "metrics": [{"key": s["key"], "label": s["label"]} for s in specs],
        "methods": {},
        "differences": {},
    }
    for method, results in runs.items():
        summary["methods"][method] = {"label": labels.get(method, method)}
        for spec in specs:
            summary["methods"][method][spec["key"]] = summarize([_value(r, spec) for r in results])
        if method != baseline:
            summary["differences"][method] = {
                spec["key"]: paired_difference(
                    [_value(r, spec) for r in runs[baseline]], [_value(r, spec) for r in results], level
                )
                for spec in specs
            }
    return summary


def _fmt(value: Optional[float], steps: bool, signed: bool = False) -> str:
    if value is None:
        return "-"
    text = f"{value:+.0f}" if steps and signed else f"{value:.0f}" if steps else f"{value:+.3f}" if signed else f"{value:.3f}"
    return text


def _cell_stats(stats: dict, steps: bool, n_seeds: int) -> str:
    if stats["mean"] is None:
        return "not reached" if steps else "-"
    text = _fmt(stats["mean"], steps) + (f" +- {_fmt(stats['sd'], steps)}" if stats["sd"] is not None else "")
    return text + (f" ({stats['n']}/{n_seeds} reached)" if steps and stats["n"] < n_seeds else "")


def _cell_diff(diff: dict, steps: bool, n_seeds: int) -> str:
    if diff["mean"] is None:
        return "-"
    text = _fmt(diff["mean"], steps, True)
    if diff["lo"] is not None:
        text += f" [{_fmt(diff['lo'], steps, True)}, {_fmt(diff['hi'], steps, True)}]"
    return text + (f" ({diff['n']}/{n_seeds} seeds)" if diff["n"] < n_seeds else "")


def table(summary: dict) -> str:
    """A Markdown table: ``mean +- sd`` per method, and under each non-baseline method its paired difference."""
    seeds = summary["seeds"]
    baseline_label = summary["methods"][summary["baseline"]]["label"]
    level = summary.get("level", LEVEL)
    header = [f"method (rows '- {baseline_label}': paired difference, mean [{level:.0%} t-interval])"]
    header += [m["label"] for m in summary["metrics"]]
    rows = []
    for method, stats in summary["methods"].items():
        rows.append(
            [stats["label"]]
            + [_cell_stats(stats[m["key"]], m["key"] == "steps_to_target", len(seeds)) for m in summary["metrics"]]
        )
        if method in summary["differences"]:
            diffs = summary["differences"][method]
            rows.append(
                [f"{stats['label']} - {baseline_label}"]
                + [_cell_diff(diffs[m["key"]], m["key"] == "steps_to_target", len(seeds)) for m in summary["metrics"]]
            )
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    seeds_text = ", ".join(map(str, seeds))
    intro = (
        f"Final pairwise accuracy and steps to the target accuracy, mean +- sd over {len(seeds)} seeds ({seeds_text}); "
        f"rows '- {baseline_label}': the paired difference (a seed gives both losses the same initial weights and "
        f"batch order), mean [{summary['interval']}]."
    )
    separator = "|" + "|".join(("-" * (w + 1) + ":") if i else ("-" * (w + 2)) for i, w in enumerate(widths)) + "|"
    return "\n".join([intro, "", line(header), separator] + [line(r) for r in rows])


def write_json(path: str, payload: dict) -> None:
    def clean(value):
        if isinstance(value, float) and math.isnan(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    with open(path, "w", encoding="utf-8") as f:
        json.dump(clean(payload), f, indent=2)
        f.write("\n")


def _stack(results: List[dict], key: str):
    import numpy as np

    return np.array([[np.nan if _is_missing(v) else v for v in r["curves"][key]] for r in results], dtype=float)


def plot_curves(
    path: str, runs: Dict[str, List[dict]], labels: Dict[str, str], target_accuracy: float, title: str, level: float = LEVEL
) -> None:
    """Top row: accuracy against step per split, the mean over seeds with a min-max band (hard pairs dashed).
    Bottom row: each method's paired difference from the baseline with its t-interval band, so that
    methods whose curves coincide above stay distinguishable."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from .stats import t_quantile

    baseline = next(iter(runs))
    splits = list(runs[baseline][0]["final"])
    steps = runs[baseline][0]["curves"]["step"]
    fig, axes = plt.subplots(2, len(splits), figsize=(5.6 * len(splits), 7.6), squeeze=False, sharex=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for col, split in enumerate(splits):
        top, bottom = axes[0][col], axes[1][col]
        for i, (method, results) in enumerate(runs.items()):
            colour, label = colours[i % len(colours)], labels.get(method, method)
            # The baseline is drawn wide underneath so that a method on top of it leaves it visible.
            width = 3.2 if method == baseline else 1.4
            acc = _stack(results, f"{split}/accuracy")
            top.plot(steps, acc.mean(0), color=colour, linewidth=width, label=f"{label}", zorder=2 if method == baseline else 3)
            top.fill_between(steps, acc.min(0), acc.max(0), color=colour, alpha=0.15, linewidth=0)
            hard = _stack(results, f"{split}/hard")
            if not np.isnan(hard).all():
                top.plot(steps, hard.mean(0), color=colour, linewidth=width * 0.6, linestyle="--", label=f"{label}, hard pairs")
            if method == baseline:
                continue
            diff = acc - _stack(runs[baseline], f"{split}/accuracy")
            mean = diff.mean(0)
            bottom.plot(steps, mean, color=colour, linewidth=1.6, label=f"{label} - {labels.get(baseline, baseline)}")
            if diff.shape[0] >= 2:
                half = t_quantile(level, diff.shape[0] - 1) * diff.std(0, ddof=1) / math.sqrt(diff.shape[0])
                bottom.fill_between(steps, mean - half, mean + half, color=colour, alpha=0.2, linewidth=0)
            hard_diff = hard - _stack(runs[baseline], f"{split}/hard")
            if not np.isnan(hard_diff).all():
                bottom.plot(
                    steps,
                    hard_diff.mean(0),
                    color=colour,
                    linewidth=1.0,
                    linestyle="--",
                    label=f"{label} - {labels.get(baseline, baseline)}, hard pairs",
                )
        top.axhline(target_accuracy, color="grey", linewidth=0.8, linestyle=":")
        top.set_title(
            f"{SPLIT_LABELS.get(split, split)}: accuracy, mean and min-max over {len(runs[baseline])} seeds", fontsize=9
        )
        top.set_ylabel("pairwise accuracy")
        top.set_ylim(0.0, 1.02)
        top.grid(alpha=0.3)
        top.legend(loc="lower right", fontsize=7)
        bottom.axhline(0.0, color="black", linewidth=0.8)
        bottom.set_title(f"{SPLIT_LABELS.get(split, split)}: paired difference, mean and {level:.0%} t-interval", fontsize=9)
        bottom.set_xlabel("training step")
        bottom.set_ylabel("accuracy difference")
        bottom.grid(alpha=0.3)
        if bottom.get_legend_handles_labels()[0]:
            bottom.legend(loc="best", fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
