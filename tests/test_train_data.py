"""The built-in preference data: deterministic, documented splits, hard and easy pairs; TRL-format files."""

from __future__ import annotations

import csv
import json

import pytest

from aplot_kernels.train import data


def small(seed=0):
    return data.generate(seed=seed, n_train=120, n_test=40, n_ood=40)


def test_deterministic_for_a_seed():
    assert small(0) == small(0)
    assert small(0)["train"] != small(1)["train"]


def test_documented_splits_domains_and_kinds():
    splits = small()
    assert tuple(splits) == data.SPLITS
    assert [len(splits[s]) for s in data.SPLITS] == [120, 40, 40]
    for name, pairs in splits.items():
        domains = data.OOD_DOMAINS if name == "test_ood" else data.ID_DOMAINS
        assert {p["domain"] for p in pairs} == set(domains), name
        assert {p["kind"] for p in pairs} == {"hard", "easy"}, name
        for p in pairs:
            assert set(p) == {"prompt", "chosen", "rejected", "kind", "domain"}
            assert p["chosen"] != p["rejected"] and p["prompt"].endswith("?")
    # In-distribution test pairs never repeat a training pair.
    key = lambda p: (p["prompt"], p["chosen"], p["rejected"])  # noqa: E731
    assert not set(map(key, splits["train"])) & set(map(key, splits["test_id"]))


def test_hard_pairs_are_near_misses_and_easy_pairs_are_not():
    for pair in small()["train"]:
        chosen, rejected = pair["chosen"].rstrip(".").split(), pair["rejected"].rstrip(".").split()
        changed = sum(a != b for a, b in zip(chosen, rejected)) + abs(len(chosen) - len(rejected))
        if pair["kind"] == "hard" and pair["domain"] != "preference":
            # One detail: a word, or a two-word time such as "9 am".
            assert len(chosen) == len(rejected) and 1 <= changed <= 2, pair
        if pair["kind"] == "easy":
            assert changed >= 2, pair


def test_hard_fraction():
    assert all(p["kind"] == "easy" for p in data.generate(n_train=30, n_test=5, n_ood=5, hard_fraction=0.0)["train"])
    with pytest.raises(ValueError, match="hard_fraction"):
        data.generate(hard_fraction=1.5)
    with pytest.raises(ValueError, match="n_train"):
        data.generate(n_train=0)


@pytest.mark.parametrize("ext", ["jsonl", "json", "csv"])
def test_trl_format_files(tmp_path, ext):
    rows = [{"prompt": "Q?", "chosen": f"good {i}", "rejected": f"bad {i}", "margin": 0.5 * i} for i in range(4)]
    path = tmp_path / f"pairs.{ext}"
    if ext == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif ext == "json":
        path.write_text(json.dumps(rows))
    else:
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    pairs = data.load_preference_file(str(path))
    assert [p["chosen"] for p in pairs] == [r["chosen"] for r in rows]
    assert [p["margin"] for p in pairs] == [r["margin"] for r in rows]
    train, held = data.split_holdout(pairs, 0.25, seed=0)
    assert len(held) == 1 and len(train) == 3 and held[0] not in train


def test_conversational_rows_and_bad_files(tmp_path):
    path = tmp_path / "chat.jsonl"
    row = {
        "chosen": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}],
        "rejected": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Go away."}],
    }
    path.write_text(json.dumps(row) + "\n")
    (pair,) = data.load_preference_file(str(path))
    assert pair["chosen"] == "Hi?\nHello." and pair["prompt"] == "" and "margin" not in pair
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(ValueError, match="chosen"):
        data.load_preference_file(str(bad))
    with pytest.raises(ValueError, match="jsonl"):
        data.load_preference_file(str(tmp_path / "pairs.txt") if (tmp_path / "pairs.txt").write_text("x") else "")
