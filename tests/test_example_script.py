"""examples/train_reward_model.py, run offline as a user would: a tiny GPT-2 (pad == eos) built from a
config and saved to a folder, a local JSON-lines preference file, APLOT options from a YAML config
and the command line, a few optimizer steps."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
yaml = pytest.importorskip("yaml")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "the cat dog sat ran on mat rug a red blue big small is was not very and then".split()


def load_example():
    spec = importlib.util.spec_from_file_location("train_reward_model", os.path.join(ROOT, "examples", "train_reward_model.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def save_tiny_model(folder) -> None:
    vocab = {token: i for i, token in enumerate(["</s>", "<unk>"] + WORDS)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="</s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="</s>",
    )
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=len(tok),
        n_embd=16,
        n_layer=2,
        n_head=2,
        n_positions=64,
        num_labels=1,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    transformers.GPT2ForSequenceClassification(config).save_pretrained(folder)
    tok.save_pretrained(folder)


def write_preferences(path, rows=10) -> None:
    gen = torch.Generator().manual_seed(2)
    with open(path, "w") as handle:
        for _ in range(rows):
            pick = lambda k: " ".join(WORDS[i] for i in torch.randint(len(WORDS), (k,), generator=gen))  # noqa: E731
            handle.write(json.dumps({"prompt": pick(2), "chosen": " " + pick(5), "rejected": " " + pick(3)}) + "\n")


def test_example_trains_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model_dir, data, out = tmp_path / "model", tmp_path / "prefs.jsonl", tmp_path / "out"
    save_tiny_model(model_dir)
    write_preferences(data)
    config = tmp_path / "rm.yaml"
    config.write_text(
        yaml.safe_dump(
            dict(
                aplot_eps=0.2,
                aplot_n_iters=20,
                aplot_backend="torch",
                aplot_bank=True,
                gradient_accumulation_steps=2,
                per_device_train_batch_size=2,
                max_steps=2,
                learning_rate=1e-3,
                use_cpu=True,
                bf16=False,
                report_to="none",
                save_strategy="no",
                logging_steps=1,
                disable_tqdm=True,
                dataloader_num_workers=0,
            )
        )
    )
    trainer = load_example().run(
        [
            "--config",
            str(config),
            "--model_name_or_path",
            str(model_dir),
            "--dataset_name",
            str(data),
            "--output_dir",
            str(out),
            "--aplot_alpha",
            "0.8",
            "--aplot_detach",
            "false",
        ]
    )
    assert trainer.state.global_step == 2
    loss = trainer.aplot_loss
    assert (loss.alpha, loss.eps, loss.n_iters, loss.backend, loss.detach) == (0.8, 0.2, 20, "torch", False)
    assert loss.bank_size == 1  # gradient_accumulation_steps - 1
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2 and all(e["aplot_margin_mean"] > 0 for e in logged)
    assert os.path.isfile(out / "config.json")
    # The saved reward model loads and scores.
    saved = transformers.AutoModelForSequenceClassification.from_pretrained(out)
    assert saved.config.pad_token_id == saved.config.eos_token_id


def test_unknown_local_file_type_is_named(tmp_path):
    path = tmp_path / "prefs.txt"
    path.write_text("x")
    with pytest.raises(ValueError, match="dataset_name"):
        load_example().load_preferences(str(path))
