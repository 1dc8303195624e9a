"""APLOTRewardTrainer: TRL's RewardTrainer with the APLOT loss, on a tiny random model (offline).

The model is a 2-layer Llama built from a config with a hand-made word-level
tokenizer, so nothing is downloaded. The trainer's loss on a collated batch
must equal ``aplot_loss`` computed by hand from the model's rewards and the
hidden states pooled at the scored token.
"""

from __future__ import annotations

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from aplot_kernels import APLOTLoss, aplot_loss  # noqa: E402
from aplot_kernels.pooling import pool_last_token  # noqa: E402
from aplot_kernels.trl import APLOTRewardTrainer  # noqa: E402

WORDS = "the cat dog sat ran on mat rug a red blue big small is was not very and then".split()
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
OPTIONS = dict(alpha=0.8, eps=0.2, n_iters=30, backend="torch")


def tiny_tokenizer(pad_is_eos=False):
    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="</s>" if pad_is_eos else "<pad>",
    )
    return tok


def tiny_model(tok):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        num_labels=1,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    return transformers.LlamaForSequenceClassification(config)


def preference_data(with_margin):
    rows = [
        ("the cat sat on the mat", "the cat sat on the rug"),
        ("a red dog ran", "a blue dog"),
        ("the big cat is very small", "the cat"),
        ("the dog was not on the rug", "the dog was on the rug and then ran"),
        ("a small blue cat sat", "a small red cat sat"),
        ("the mat is red", "the rug is blue and big"),
    ]
    data = {"prompt": ["the"] * len(rows), "chosen": [" " + c for c, _ in rows], "rejected": [" " + r for _, r in rows]}
    if with_margin:
        data["margin"] = [0.1 * i for i in range(len(rows))]
    return datasets.Dataset.from_dict(data)


def make_trainer(
    tmp_path, *, pad_is_eos=False, with_margin=False, max_steps=3, peft_config=None, eval_dataset=None, bf16=False, **kwargs
):
    tok = tiny_tokenizer(pad_is_eos)
    args = trl.RewardConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=3,
        max_steps=max_steps,
        learning_rate=1e-2,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        dataloader_num_workers=0,
        dataset_num_proc=None,
        center_rewards_coefficient=kwargs.pop("center_rewards_coefficient", None),
        disable_tqdm=True,
        bf16=bf16,
    )
    return APLOTRewardTrainer(
        model=tiny_model(tok),
        args=args,
        train_dataset=preference_data(with_margin),
        processing_class=tok,
        peft_config=peft_config,
        eval_dataset=eval_dataset,
        **kwargs,
    )


def by_hand(trainer, batch, center=None):
    model = trainer.model
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "margin"}
        logits = model(**inputs).logits.squeeze(-1)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        hidden = base.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state
    emb = pool_last_token(hidden, inputs["attention_mask"], inputs["input_ids"], base.config.pad_token_id)
    rc, rr = logits.chunk(2)
    ec, er = emb.chunk(2)
    loss = aplot_loss(rc, rr, ec, er, batch.get("margin"), **OPTIONS)
    if center is not None:
        loss = loss + center * torch.mean((rc + rr) ** 2)
    return loss


def first_batch(trainer):
    batch = next(iter(trainer.get_train_dataloader()))
    return {k: v.to(trainer.model.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@pytest.mark.parametrize("pad_is_eos, with_margin, center", [(False, False, None), (True, True, 0.01)])
def test_loss_equals_aplot_loss_by_hand(tmp_path, pad_is_eos, with_margin, center):
    trainer = make_trainer(
        tmp_path,
        pad_is_eos=pad_is_eos,
        with_margin=with_margin,
        center_rewards_coefficient=center,
        aplot_loss=APLOTLoss(**OPTIONS),
    )
    trainer.model.eval()
    batch = first_batch(trainer)
    assert ("margin" in batch) == with_margin
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch))
    torch.testing.assert_close(loss, by_hand(trainer, batch, center))
    # Not the BT loss: APLOT's margins are positive, so its loss is larger.
    assert trainer._metrics["eval"]["aplot_margin_mean"][-1] > 0


def test_train_steps_and_metrics(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=3, eval_dataset=preference_data(False), **OPTIONS)
    result = trainer.train()
    assert result.global_step == 3
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and all(torch.isfinite(torch.tensor(e["loss"])) for e in logged)
    for key in ("accuracy", "margin", "aplot_margin_mean", "aplot_margin_min", "aplot_margin_max"):
        assert key in logged[-1], key
    evaluated = trainer.evaluate()
    assert evaluated["eval_aplot_margin_min"] <= evaluated["eval_aplot_margin_mean"] <= evaluated["eval_aplot_margin_max"]
    assert 0.0 <= evaluated["eval_accuracy"] <= 1.0


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_mixed_precision_training(tmp_path, backend):
    """``bf16=True``: mixed-precision steps run with the loss on the reference and on the extension, and
    stay finite. (Accelerate autocasts the model's forward and hands the loss float32 outputs; a loss
    called inside an autocast region is tested in test_loss.py.)"""
    from aplot_kernels import backends

    if backend == "native" and not backends.native_status(torch.device("cpu"))[0]:
        pytest.skip("the native extension is unavailable")
    trainer = make_trainer(tmp_path, max_steps=2, bf16=True, **{**OPTIONS, "backend": backend})
    assert trainer.train().global_step == 2
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and all(torch.isfinite(torch.tensor([e["loss"], e["aplot_margin_mean"]])).all() for e in logged)


def test_peft_lora(tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    trainer = make_trainer(tmp_path, max_steps=2, peft_config=config, aplot_loss=APLOTLoss(**OPTIONS))
    trainer.model.eval()
    batch = first_batch(trainer)
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch))
    torch.testing.assert_close(loss, by_hand(trainer, batch))
    trainer.model.train()
    assert trainer.train().global_step == 2


def test_options_are_exclusive(tmp_path):
    with pytest.raises(ValueError, match="either"):
        make_trainer(tmp_path, aplot_loss=APLOTLoss(), alpha=0.5)
    with pytest.raises(ValueError, match="reduction"):
        make_trainer(tmp_path, aplot_loss=APLOTLoss(reduction="sum"))


def config_trainer(tmp_path, rows=6, **fields):
    from aplot_kernels.trl import APLOTRewardConfig

    tok = tiny_tokenizer()
    args = APLOTRewardConfig(
        output_dir=str(tmp_path),
        learning_rate=1e-2,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        dataloader_num_workers=0,
        dataset_num_proc=None,
        disable_tqdm=True,
        **fields,
    )
    data = preference_data(False).select(range(rows))
    return APLOTRewardTrainer(model=tiny_model(tok), args=args, train_dataset=data, processing_class=tok)


def test_config_fields_reach_the_loss(tmp_path):
    trainer = config_trainer(
        tmp_path,
        aplot_alpha=0.7,
        aplot_temperature=0.5,
        aplot_similarity="cosine",
        aplot_eps=0.3,
        aplot_n_iters=17,
        aplot_scale=2.0,
        aplot_detach=False,
        aplot_backend="torch",
        aplot_gather=True,
        aplot_bank=True,
        gradient_accumulation_steps=3,
    )
    loss = trainer.aplot_loss
    got = (
        loss.alpha,
        loss.temperature,
        loss.similarity,
        loss.eps,
        loss.n_iters,
        loss.scale,
        loss.detach,
        loss.backend,
        loss.gather_across_devices,
        loss.bank_size,
    )
    assert got == (0.7, 0.5, "cosine", 0.3, 17, 2.0, False, "torch", True, 2)
    with pytest.raises(ValueError, match="aplot_"):
        APLOTRewardTrainer(
            model=trainer.model,
            args=trainer.args,
            train_dataset=trainer.train_dataset,
            processing_class=trainer.processing_class,
            alpha=0.5,
        )


@pytest.mark.parametrize(
    "field, value, error",
    [
        ("aplot_alpha", 1.5, ValueError),
        ("aplot_detach", "no", TypeError),
        ("aplot_n_iters", 10.5, TypeError),
        ("aplot_backend", "cuda", ValueError),
        ("aplot_similarity", "dot", ValueError),
    ],
)
def test_config_fields_are_checked(tmp_path, field, value, error):
    from aplot_kernels.trl import APLOTRewardConfig

    with pytest.raises(error, match=field):
        APLOTRewardConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", **{field: value})
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        APLOTRewardConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", aplot_bank=True)


def test_bank_holds_only_the_current_optimizer_step(tmp_path):
    """6 rows, micro-batches of 2, 2 accumulation steps: optimizer steps of micro-batches [0, 1], [2] (the
    epoch's short last step), [0, 1], [2]. Each training call finds in the bank exactly the earlier
    micro-steps of its own optimizer step."""
    trainer = config_trainer(
        tmp_path,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=4,
        aplot_bank=True,
        aplot_backend="torch",
        aplot_n_iters=20,
    )
    held = []
    trainer.aplot_loss.register_forward_pre_hook(lambda module, _: held.append(len(module.bank)) if module.training else None)
    assert trainer.train().global_step == 4
    assert held == [0, 1, 0, 0, 1, 0]
