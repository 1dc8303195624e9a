"""The committed results of the default ``aplot-kernels train`` run agree with themselves and with the README.

``docs/results/train/metrics.json`` holds every seed; its summary, ``table.md`` and the README's table
must all be what the report code computes from those seeds.
"""

from __future__ import annotations

import json
import os

import pytest

from aplot_kernels.train.report import summarize_runs, table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "docs", "results", "train")


@pytest.fixture(scope="module")
def metrics():
    path = os.path.join(RESULTS, "metrics.json")
    if not os.path.isfile(path):
        pytest.skip("no committed results (not a source checkout)")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def test_committed_summary_is_computed_from_the_seeds(metrics):
    labels = {key: m["label"] for key, m in metrics["methods"].items()}
    summary = summarize_runs(metrics["runs"], labels, metrics["config"]["target_accuracy"])
    assert summary["seeds"] == metrics["seeds"] and len(metrics["seeds"]) >= 3
    for method, stats in summary["methods"].items():
        for key, value in stats.items():
            if key != "label":
                assert value == pytest.approx(metrics["summary"]["methods"][method][key], nan_ok=True), (method, key)
    for method, diffs in summary["differences"].items():
        for key, value in diffs.items():
            assert value == pytest.approx(metrics["summary"]["differences"][method][key], nan_ok=True), (method, key)
    similarities = {m["aplot"]["similarity"] for m in metrics["methods"].values() if m["aplot"]}
    assert similarities == {"unit", "cosine"}


def test_table_and_readme_show_the_committed_run(metrics):
    labels = {key: m["label"] for key, m in metrics["methods"].items()}
    text = table(summarize_runs(metrics["runs"], labels, metrics["config"]["target_accuracy"]))
    with open(os.path.join(RESULTS, "table.md"), encoding="utf-8") as f:
        assert f.read().strip() == text.strip()
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    rows = [line for line in text.splitlines() if line.startswith("|")]
    assert all(row in readme for row in rows)
