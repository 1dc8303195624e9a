"""The outputs of ``aplot-kernels train``: the printed table, ``metrics.json`` and ``accuracy.png``."""

from __future__ import annotations

import json
import math
import os
from typing import Dict

__all__ = ["table", "write_json", "plot_curves"]

LABELS = {"bt": "BT", "aplot": "APLOT"}
SPLIT_LABELS = {"test_id": "in-distribution", "test_ood": "out-of-distribution"}


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.3f}"


def table(results: Dict[str, dict], target_accuracy: float) -> str:
    """A plain-text table: final and best accuracies per split, hard-pair accuracy, steps to the target."""
    splits = []
    for result in results.values():
        splits = [s for s in result["final"]]
        break
    header = ["method"]
    for split in splits:
        short = "ID" if split == "test_id" else "OOD" if split == "test_ood" else split
        header += [f"{short} acc", f"{short} hard", f"{short} best"]
    target_split = next(iter(results.values()))["target_split"] if results else None
    short_target = "ID" if target_split == "test_id" else target_split
    header += [f"steps to {short_target} {target_accuracy:.2f}", "train s"]
    rows = [header]
    for method, result in results.items():
        row = [LABELS.get(method, method)]
        for split in splits:
            row += [_fmt(result["final"][split]["accuracy"]), _fmt(result["final"][split]["hard"]), _fmt(result["best"][split])]
        steps = result["steps_to_target"]
        row += ["not reached" if steps is None else str(steps), f"{result['train_seconds']:.1f}"]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


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


def plot_curves(path: str, results: Dict[str, dict], target_accuracy: float, title: str) -> None:
    """Accuracy against training step, one panel per evaluation split (all pairs solid, hard pairs dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = list(next(iter(results.values()))["final"])
    fig, axes = plt.subplots(1, len(splits), figsize=(5.5 * len(splits), 4.2), squeeze=False)
    colours = {"bt": "tab:blue", "aplot": "tab:orange"}
    for ax, split in zip(axes[0], splits):
        for method, result in results.items():
            curves = result["curves"]
            colour = colours.get(method)
            label = LABELS.get(method, method)
            ax.plot(curves["step"], curves[f"{split}/accuracy"], color=colour, label=f"{label} (all pairs)")
            hard = curves.get(f"{split}/hard")
            if hard and not all(math.isnan(v) for v in hard):
                ax.plot(curves["step"], hard, color=colour, linestyle="--", label=f"{label} (hard pairs)")
        ax.axhline(target_accuracy, color="grey", linewidth=0.8, linestyle=":")
        ax.set_title(SPLIT_LABELS.get(split, split))
        ax.set_xlabel("training step")
        ax.set_ylabel("pairwise accuracy")
        ax.set_ylim(0.0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
