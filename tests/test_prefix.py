"""Frozen-prefix reuse (ops/prefix.py): running the shared leading layers once changes no log-prob, gradient, KL
or PPO metric."""

import copy

import pytest
import torch

from alignkit import cli
from alignkit.config import LoraConfig
from alignkit.eval.policy import sequence_kl
from alignkit.models.loading import apply_lora, disable_dropout
from alignkit.models.tiny import tiny_causal_lm
from alignkit.ops.logprobs import token_logprobs
from alignkit.ops.prefix import frozen_prefix_layers, only_layers, prefix_states, shared_prefix_layers
from alignkit.rollout.engine import Rollout
from alignkit.train.logging import read_metrics
from tests.test_ppo import overrides, paths  # noqa: F401  (the tiny PPO fixture)

pytestmark = pytest.mark.usefixtures("one_thread")
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora_policy(n_layers=4, adapted=(3,)):
    model, _ = tiny_causal_lm(seed=0, num_layers=n_layers)
    disable_dropout(model)
    peft = apply_lora(model, LoraConfig(enabled=True, r=4, alpha=8, target_modules=LINEAR,
                                             layers_to_transform=list(adapted)))
    with torch.no_grad():  # B != 0: the adapters change the output
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return peft


def _batch(B=3, T=10, vocab=90, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, :4] = 0  # left padding
    mask[2, :2] = 0
    return ids, mask


def test_prefix_lengths_count_frozen_and_shared_layers():
    peft = _lora_policy(n_layers=4, adapted=(2, 3))
    assert frozen_prefix_layers(peft) == 2
    base, _ = tiny_causal_lm(seed=0, num_layers=4)
    assert frozen_prefix_layers(base) == 0  # everything trainable
    other = copy.deepcopy(base)
    with torch.no_grad():
        other.model.layers[1].mlp.up_proj.weight.add_(1e-3)
    assert shared_prefix_layers(base, copy.deepcopy(base)) == 4
    assert shared_prefix_layers(base, other) == 1
    with torch.no_grad():
        other.model.embed_tokens.weight.add_(1e-3)
    assert shared_prefix_layers(base, other) == 0


@pytest.mark.parametrize("first", [1, 6])
def test_suffix_from_prefix_states_equals_full_forward_values_and_lora_gradients(first):
    peft = _lora_policy()
    k = frozen_prefix_layers(peft)
    assert k == 3
    ids, mask = _batch()
    full, ent_full = token_logprobs(peft, ids, mask, 0.8, return_entropy=True, first_index=first)
    (full * torch.arange(full.numel()).reshape(full.shape)).sum().backward()
    grads = {n: p.grad.clone() for n, p in peft.named_parameters() if p.requires_grad}
    peft.zero_grad()
    hidden = prefix_states(peft, ids, mask, k, micro_batch_size=2)  # [B, T, d]
    assert hidden.shape == (*ids.shape, peft.config.hidden_size) and not hidden.requires_grad
    part, ent_part = token_logprobs(peft, ids, mask, 0.8, return_entropy=True, first_index=first, hidden=hidden,
                                    hidden_layers=k)
    (part * torch.arange(part.numel()).reshape(part.shape)).sum().backward()
    torch.testing.assert_close(part, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent_part, ent_full, rtol=1e-5, atol=1e-5)
    for n, p in peft.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-7, msg=n)
    with peft.disable_adapter():  # the reference shares the prefix states
        ref_full = token_logprobs(peft, ids, mask, 0.8, first_index=first)
        ref_part = token_logprobs(peft, ids, mask, 0.8, first_index=first, hidden=hidden, hidden_layers=k)
    torch.testing.assert_close(ref_part, ref_full, rtol=1e-5, atol=1e-5)
    assert (ref_full - full).abs().max() > 1e-3  # the adapters matter: the check above is not vacuous
    assert len(peft.get_base_model().model.layers) == 4  # the layer list is restored


def test_sequence_kl_with_a_shared_prefix_equals_the_plain_estimate():
    base, _ = tiny_causal_lm(seed=0, num_layers=4)
    disable_dropout(base)
    policy = copy.deepcopy(base)
    with torch.no_grad():
        policy.model.layers[3].mlp.down_proj.weight.mul_(1.5)
    assert shared_prefix_layers(policy, base) == 3
    ids, mask = _batch(B=4, T=10)
    P = 6
    rollout = Rollout(prompt_ids=ids[:, :P], prompt_mask=mask[:, :P], response_ids=ids[:, P:],
                      response_mask=torch.ones(4, 4, dtype=torch.long), has_eos=torch.zeros(4, dtype=torch.bool),
                      prompt_texts=[""] * 4, response_texts=[""] * 4, extras=[{}] * 4)
    shared = sequence_kl(policy, base, rollout, micro_batch_size=3, estimator="k1")
    plain = sequence_kl(policy, base, rollout, micro_batch_size=3, reference_ctx=torch.no_grad,  # a ctx: no reuse
                        estimator="k1")
    torch.testing.assert_close(shared, plain, rtol=1e-5, atol=1e-5)
    assert shared.abs().max() > 1e-4


def test_exact_sequence_kl_sums_the_full_next_token_kl_over_response_tokens():
    """sequence_kl(estimator='exact') == sum over unmasked response tokens of KL(pi(.|prefix) || pref(.|prefix)),
    computed here from both models' whole logits; the same with and without the shared prefix; 0 against itself."""
    base, _ = tiny_causal_lm(seed=0, num_layers=4)
    disable_dropout(base)
    policy = copy.deepcopy(base)
    with torch.no_grad():
        policy.model.layers[3].mlp.down_proj.weight.mul_(1.5)
    ids, mask = _batch(B=4, T=10)
    P = 6
    resp_mask = torch.ones(4, 4, dtype=torch.long)
    resp_mask[1, 2:] = 0  # a response that ended early: its padding must not count
    rollout = Rollout(prompt_ids=ids[:, :P], prompt_mask=mask[:, :P], response_ids=ids[:, P:],
                      response_mask=resp_mask, has_eos=torch.zeros(4, dtype=torch.bool),
                      prompt_texts=[""] * 4, response_texts=[""] * 4, extras=[{}] * 4)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        lp = torch.log_softmax(policy(input_ids=ids, attention_mask=mask, position_ids=pos).logits / 0.7, -1)
        lq = torch.log_softmax(base(input_ids=ids, attention_mask=mask, position_ids=pos).logits / 0.7, -1)
    per_token = (lp.exp() * (lp - lq)).sum(-1)[:, P - 1:-1]  # [B, R]: prefixes predicting the response tokens
    expected = (per_token * resp_mask).sum(-1)
    exact = sequence_kl(policy, base, rollout, temperature=0.7, micro_batch_size=3)
    torch.testing.assert_close(exact, expected, rtol=1e-5, atol=1e-6)
    no_reuse = sequence_kl(policy, base, rollout, temperature=0.7, micro_batch_size=3, reference_ctx=torch.no_grad)
    torch.testing.assert_close(no_reuse, expected, rtol=1e-5, atol=1e-6)
    assert (exact > 0).all()
    torch.testing.assert_close(sequence_kl(base, base, rollout), torch.zeros(4))
    with pytest.raises(ValueError, match="KL estimator must be 'exact' or 'k1', got 'k9'"):
        sequence_kl(policy, base, rollout, estimator="k9")


def test_unsupported_model_is_refused_with_a_clear_message():
    model = torch.nn.Linear(2, 2)
    assert frozen_prefix_layers(model) == 0 and shared_prefix_layers(model, model) == 0
    with pytest.raises(ValueError, match="frozen-prefix reuse supports the model types"):
        with only_layers(model, 1):
            pass
    peft = _lora_policy()
    ids, mask = _batch()
    with pytest.raises(ValueError, match="padding_free and a precomputed frozen prefix"):
        token_logprobs(peft, ids, mask, hidden=prefix_states(peft, ids, mask, 2), hidden_layers=2, padding_free=True)


def test_ppo_with_lora_on_the_last_layer_logs_the_same_metrics_with_and_without_reuse(paths, tmp_path):  # noqa: F811
    """A 2-iteration LoRA PPO run (adapters on the tiny model's last layer) with the frozen prefix reused and
    without: every logged loss, ratio and KL agrees."""
    runs = {}
    for reuse in (True, False):
        out = tmp_path / f"reuse_{reuse}"
        assert cli.main(["ppo", *overrides(paths, out, "model.lora.enabled=true", "model.lora.r=4",
                                           "model.lora.alpha=8", "model.lora.layers_to_transform=[1]",
                                           "model.lora.target_modules=[q_proj,v_proj,up_proj]",
                                           "train.lr=1e-2", f"train.reuse_frozen_prefix={str(reuse).lower()}")]) == 0
        runs[reuse] = [r for r in read_metrics(out / "metrics.jsonl") if "objective/kl" in r]
        said = "the first 1 decoder layers are frozen and shared" in (out / "log.txt").read_text(encoding="utf-8")
        assert said == reuse
    assert len(runs[True]) == 2
    keys = ("objective/kl", "objective/scores", "loss/policy", "loss/value", "policy/approxkl", "policy/ratio_max")
    for a, b in zip(runs[True], runs[False], strict=True):
        for key in keys:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    assert runs[True][1]["objective/kl"] != 0.0
