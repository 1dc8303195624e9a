"""Pooling at the scored token, head capture through wrappers, pair layouts.

The reference is the model itself: applying the score head to the pooled
hidden state must give exactly the logits a ``*ForSequenceClassification``
model returns, for left and right padding and when the pad token is the EOS
token.
"""

from __future__ import annotations

import pytest
import torch

from aplot_kernels.pooling import (
    capture_head_input,
    find_score_head,
    join_pairs,
    last_token_index,
    pad_token_id_of,
    pool_last_token,
    split_pairs,
)

transformers = pytest.importorskip("transformers")

PAD, EOS, VOCAB = 0, 2, 40


def tiny_llama(pad_token_id=PAD, eos_token_id=EOS):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        num_labels=1,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=1,
    )
    return transformers.LlamaForSequenceClassification(config).eval()


def batch(lengths, *, side, pad, eos=None, seq_len=None):
    """Random token ids (never PAD or EOS) padded on ``side``; ``eos`` appended to each sequence when given."""
    gen = torch.Generator().manual_seed(1)
    seqs = []
    for n in lengths:
        body = torch.randint(3, VOCAB, (n,), generator=gen)
        seqs.append(torch.cat([body, torch.tensor([eos])]) if eos is not None else body)
    seq_len = seq_len or max(len(s) for s in seqs)
    ids = torch.full((len(seqs), seq_len), pad)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        where = slice(0, len(s)) if side == "right" else slice(seq_len - len(s), seq_len)
        ids[i, where], mask[i, where] = s, 1
    return ids, mask


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_score_of_pooled_state_equals_model_logits(side, pad_is_eos):
    pad = EOS if pad_is_eos else PAD
    model = tiny_llama(pad_token_id=pad)
    ids, mask = batch([5, 3, 7, 1], side=side, pad=pad, eos=EOS)
    with torch.no_grad(), capture_head_input(model) as head_input:
        logits = model(input_ids=ids, attention_mask=mask).logits
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    pooled = pool_last_token(hidden, mask, ids, pad)
    torch.testing.assert_close(model.score(pooled), logits, rtol=0, atol=0)
    torch.testing.assert_close(head_input.pooled(ids, mask, pad_token_id_of(model)), pooled, rtol=0, atol=0)
    if pad_is_eos:
        # The trailing EOS counts as padding: the scored token is the one before it.
        assert (last_token_index(mask, ids, pad) == last_token_index(mask) - 1).all()


def test_attention_mask_rule_is_rightmost_attended_position():
    ids, mask = batch([4, 2, 6], side="left", pad=PAD)
    assert last_token_index(mask).tolist() == [5, 5, 5]
    ids, mask = batch([4, 2, 6], side="right", pad=PAD)
    assert last_token_index(mask).tolist() == [3, 1, 5]
    hidden = torch.randn(3, 6, 8)
    pooled = pool_last_token(hidden, attention_mask=mask)
    torch.testing.assert_close(pooled, hidden[torch.arange(3), torch.tensor([3, 1, 5])])
    torch.testing.assert_close(pool_last_token(hidden), hidden[:, -1])


def test_head_found_through_peft_wrapper():
    peft = pytest.importorskip("peft")
    model = tiny_llama()
    wrapped = peft.get_peft_model(
        model, peft.LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    ).eval()
    head = find_score_head(wrapped)
    assert hasattr(head, "original_module")  # PEFT's modules_to_save copy of `score`
    ids, mask = batch([5, 3], side="right", pad=PAD, eos=EOS)
    with torch.no_grad(), capture_head_input(wrapped) as head_input:
        logits = wrapped(input_ids=ids, attention_mask=mask).logits
    pooled = head_input.pooled(ids, mask, pad_token_id_of(wrapped))
    torch.testing.assert_close(head(pooled), logits)  # a matmul over [B, H] vs [B, T, H]: rounding only


def test_pre_pooled_head_input_is_used_as_is():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_labels=1,
    )
    model = transformers.BertForSequenceClassification(config).eval()
    ids, mask = batch([5, 3], side="right", pad=PAD)
    with torch.no_grad(), capture_head_input(model) as head_input:
        logits = model(input_ids=ids, attention_mask=mask).logits
    pooled = head_input.pooled(ids, mask, 0)
    assert pooled.shape == (2, 16)
    torch.testing.assert_close(model.classifier(pooled), logits, rtol=0, atol=0)


def test_missing_head_is_a_clear_error():
    with pytest.raises(ValueError, match="score head"):
        find_score_head(torch.nn.Sequential(torch.nn.Linear(2, 2)))


@pytest.mark.parametrize("layout", ["stacked", "interleaved"])
def test_layouts_round_trip(layout):
    chosen, rejected = torch.arange(3.0), 10 + torch.arange(3.0)
    joined = join_pairs(chosen, rejected, layout)
    expected = [0.0, 1.0, 2.0, 10.0, 11.0, 12.0] if layout == "stacked" else [0.0, 10.0, 1.0, 11.0, 2.0, 12.0]
    assert joined.tolist() == expected
    c, r = split_pairs(joined, layout)
    assert c.tolist() == chosen.tolist() and r.tolist() == rejected.tolist()


def test_layout_errors():
    with pytest.raises(ValueError, match="layout"):
        split_pairs(torch.zeros(4), "zipped")
    with pytest.raises(ValueError, match="even"):
        split_pairs(torch.zeros(3))
    with pytest.raises(ValueError, match="hidden_states"):
        pool_last_token(torch.zeros(2, 3))


@pytest.mark.parametrize("by", ["input_ids", "attention_mask"])
def test_row_of_padding_only_is_named(by):
    ids, mask = batch([4, 2, 6], side="right", pad=PAD)
    hidden = torch.randn(3, 6, 8)
    ids[1], mask[1] = PAD, 0
    with pytest.raises(ValueError, match=by):
        if by == "input_ids":
            pool_last_token(hidden, input_ids=ids, pad_token_id=PAD)
        else:
            pool_last_token(hidden, attention_mask=mask)
    # The other rows alone are fine.
    keep = torch.tensor([0, 2])
    pooled = pool_last_token(hidden[keep], input_ids=ids[keep], pad_token_id=PAD)
    torch.testing.assert_close(pooled, hidden[keep, torch.tensor([3, 5])])
