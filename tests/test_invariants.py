"""Model-level invariants from DESIGN.md: log-prob gathering, concatenated forward, LoRA-disabled
reference, precomputed reference, padding invariance."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from alignkit.algorithms.dpo import concatenated_logps, make_dpo_step, precompute_reference_logps
from alignkit.config import DPOConfig, LoraConfig
from alignkit.data.collate import collate_preference
from alignkit.models.loading import apply_lora, reference_context
from alignkit.models.reference import Reference
from alignkit.models.tiny import tiny_causal_lm
from alignkit.ops.logprobs import gather_logprobs, sequence_logprobs, token_logprobs


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    model, tok = tiny_causal_lm(seed=0)
    for p in model.parameters():  # larger weights: non-trivial distributions
        p.data.normal_(0, 0.3)
    return model.eval(), tok


def _pref_examples(tok):
    def ids(s):
        return tok(s, add_special_tokens=False)["input_ids"]

    rows = []
    for prompt, chosen, rejected in [("hi ", "good day", "bad"), ("q: 2+2? ", "4", "five, I think")]:
        p, c, r = ids(prompt), ids(chosen) + [tok.eos_token_id], ids(rejected) + [tok.eos_token_id]
        rows.append({"chosen_input_ids": p + c, "chosen_response_mask": [0] * len(p) + [1] * len(c),
                     "rejected_input_ids": p + r, "rejected_response_mask": [0] * len(p) + [1] * len(r),
                     "group": len(rows), "margin": 0.0})
    return rows


def test_gathered_logprobs_equal_negative_cross_entropy():
    torch.manual_seed(1)
    logits = torch.randn(3, 5, 11)
    labels = torch.randint(0, 11, (3, 5))
    ce = F.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1), reduction="none").view(3, 5)
    assert_close(gather_logprobs(logits, labels, chunk_size=2), -ce)
    # temperature: log_softmax(logits / T)
    assert_close(gather_logprobs(logits, labels, temperature=0.7),
                 torch.log_softmax(logits / 0.7, -1).gather(-1, labels[..., None]).squeeze(-1))


def test_concatenated_forward_equals_two_forwards(lm):
    model, tok = lm
    ex = _pref_examples(tok)
    batch = collate_preference(ex, tok.pad_token_id)
    chosen, rejected = concatenated_logps(model, batch, average=False)
    for i, e in enumerate(ex):
        for key, got in (("chosen", chosen[i]), ("rejected", rejected[i])):
            ids = torch.tensor([e[f"{key}_input_ids"]])
            mask = torch.tensor([e[f"{key}_response_mask"]])
            alone = sequence_logprobs(model, ids, torch.ones_like(ids), mask)
            assert_close(got, alone[0], atol=1e-5, rtol=1e-5)


def test_left_padding_does_not_change_real_token_logprobs(lm):
    model, tok = lm
    ids = torch.tensor([[5, 17, 23, 9, 40, 2]])
    pad = tok.pad_token_id
    padded = torch.tensor([[pad, pad, pad, 5, 17, 23, 9, 40, 2]])
    att = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    alone = token_logprobs(model, ids, torch.ones_like(ids))
    with_pad = token_logprobs(model, padded, att)
    assert_close(with_pad[:, 4:], alone[:, 1:], atol=1e-5, rtol=1e-5)


def test_lora_with_adapters_disabled_reproduces_base_logits(lm):
    model, tok = lm
    base = copy.deepcopy(model)
    peft_model = apply_lora(copy.deepcopy(model), LoraConfig(enabled=True, r=4, alpha=8))
    for n, p in peft_model.named_parameters():  # make the adapter non-trivial
        if "lora_B" in n:
            p.data.normal_(0, 0.5)
    ids = torch.tensor([[1, 7, 8, 9, 2]])
    with torch.no_grad():
        ref = base(input_ids=ids).logits
        adapted = peft_model(input_ids=ids).logits
        with reference_context(peft_model):
            disabled = peft_model(input_ids=ids).logits
    assert_close(disabled, ref)
    assert not torch.allclose(adapted, ref)


def test_precomputed_reference_equals_on_the_fly(lm):
    model, tok = lm
    ex = _pref_examples(tok)
    policy = copy.deepcopy(model).train()
    with torch.no_grad():  # policy drifts away from the reference
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    cfg = DPOConfig()
    on_the_fly_step, _ = make_dpo_step(cfg, Reference.of_policy(policy, ref_model=model))  # a frozen reference
    batch = collate_preference(ex, tok.pad_token_id)
    expected = on_the_fly_step(policy, batch)

    pre = copy.deepcopy(ex)
    precompute_reference_logps(Reference("frozen", model), pre, tok.pad_token_id, batch_size=1)
    from alignkit.algorithms.dpo import collate_with_ref

    batch_pre = collate_with_ref(pre, tok.pad_token_id)
    assert "ref_chosen_logps" in batch_pre
    step, _ = make_dpo_step(cfg, Reference.precomputed(None))
    got = step(policy, batch_pre)
    assert_close(got.loss, expected.loss, atol=1e-5, rtol=1e-5)
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert got.metrics[k] == pytest.approx(expected.metrics[k], abs=1e-5)


def test_dpo_step_at_policy_equal_reference_is_log2(lm):
    model, tok = lm
    step, _ = make_dpo_step(DPOConfig(), Reference("frozen", model))
    out = step(model, collate_preference(_pref_examples(tok), tok.pad_token_id))
    assert_close(out.loss, torch.tensor(0.6931471805599453), atol=1e-6, rtol=0)
    assert out.metrics["rewards/margins"] == pytest.approx(0.0, abs=1e-6)


def test_skipping_prompt_logits_gives_identical_response_logprobs(lm):
    model, tok = lm
    ids = torch.tensor([[5, 17, 23, 9, 40, 2, 0], [6, 7, 8, 9, 10, 11, 2]])
    att = torch.tensor([[1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1]])
    full = token_logprobs(model, ids, att)
    for first in (2, 4, 6):
        part = token_logprobs(model, ids, att, first_index=first)
        assert_close(part[:, first:], full[:, first:], atol=1e-6, rtol=1e-6)
        assert torch.all(part[:, :first] == 0)
    resp = torch.tensor([[0, 0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 1, 1, 1]])
    assert_close(sequence_logprobs(model, ids, att, resp), (full * resp).sum(-1), atol=1e-6, rtol=1e-6)
