"""Tests for alignkit.algorithms.ppo and alignkit.models.value (REFERENCES: "PPO for language models")."""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import string

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from torch.testing import assert_close
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    PreTrainedTokenizerFast,
)

from alignkit import cli
from alignkit.algorithms import ppo as ppo_mod
from alignkit.algorithms.ppo import (
    PolicyAndValue,
    TextRewardModel,
    build_kl_controller,
    build_reference,
    build_value_model,
    last_response_index,
    make_experience,
    per_token_rewards,
    ppo_update,
    reward_prompt_texts,
    score_rollout,
    values_of,
    whitened_advantages,
)
from alignkit.algorithms.reward_model import reward_scores
from alignkit.config import DataConfig, LoraConfig, ModelConfig, PPOConfig, PPOSection, RLDataConfig
from alignkit.data.tokenize import tokenize_preference
from alignkit.models.loading import apply_lora, disable_dropout, load_tokenizer
from alignkit.models.tiny import save_tiny_models, tiny_causal_lm, tiny_config, tiny_reward_model
from alignkit.models.value import ValueModel
from alignkit.ops.kl import AdaptiveKLController
from alignkit.rewards.reward_model import RewardModelScorer, last_token_index, load_reward_model_scorer
from alignkit.rollout.engine import HFGenerateBackend, Rollout, SamplingParams, generate_rollouts, postprocess_responses
from alignkit.rollout.prompts import load_prompts, prompt_batch
from alignkit.train.logging import read_metrics

LOGGED_KEYS = [
    "objective/kl", "objective/entropy", "objective/scores", "policy/approxkl", "policy/clipfrac", "val/clipfrac",
    "val/vpred", "val/error", "returns", "scores", "response_length", "no_eos_frac", "kl_coef", "lr", "loss/policy",
    "loss/value", "time/generation", "time/scoring", "time/training", "rewards/reward_model",
]


# ---------------------------------------------------------------- fixtures
@pytest.fixture(autouse=True)
def one_thread():
    """Bit-exact CPU runs: MKL may lower its thread count under machine load (MKL_DYNAMIC), which changes
    float summation order between two otherwise identical runs; one thread removes that (and is as fast here)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny():
    policy, tok = tiny_causal_lm(seed=0)
    rm, _ = tiny_reward_model(seed=1)
    disable_dropout(policy)
    disable_dropout(rm)
    rm.requires_grad_(False).eval()
    return policy, rm, tok


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppo_tiny")
    p = save_tiny_models(root)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"count to {i}"}) + "\n" for i in range(8)), encoding="utf-8")
    return {"policy": str(p["policy"]), "reward": str(p["reward"]), "prompts": str(prompts), "root": root}


def save_tiny_encoder_reward_model(out_dir) -> str:
    """A 1-layer BERT classifier with its own lower-casing WordPiece tokenizer (single characters, "##" continuations,
    no chat template; load_tokenizer makes [SEP] its EOS): a reward model whose vocabulary differs from the
    policy's char-level ChatML one, as the quickstart's MiniLM does from SmolLM2's."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {t: i for i, t in enumerate(specials)}
    for ch in string.ascii_lowercase + string.digits + string.punctuation:
        vocab.setdefault(ch, len(vocab))
    for ch in string.ascii_lowercase + string.digits:
        vocab["##" + ch] = len(vocab)
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")
    torch.manual_seed(2)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=len(fast), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=128, num_labels=1, pad_token_id=0, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0))
    model.save_pretrained(out_dir)
    fast.save_pretrained(out_dir)
    return str(out_dir)


@pytest.fixture(scope="module")
def encoder_rm(paths):
    return save_tiny_encoder_reward_model(paths["root"] / "tiny-encoder-rm")


def overrides(paths, out, *extra: str) -> list[str]:
    return [
        f"model.name_or_path={paths['policy']}", f"ppo.reward_model={paths['reward']}",
        f"data.train={paths['prompts']}", "data.max_prompt_length=32", f"train.output_dir={out}",
        "ppo.rollout_batch_size=4", "ppo.num_minibatches=2", "ppo.micro_batch_size=1", "ppo.ppo_epochs=2",
        "ppo.num_iterations=2", "generation.max_new_tokens=6", "generation.batch_size=4", "train.lr=1e-3",
        *extra,
    ]


def tiny_rollout(policy, tok, temperature: float = 1.0, max_new_tokens: int = 6, seed: int = 0) -> Rollout:
    """4 prompts of different lengths (left-padded), one sampled response each."""
    texts = ["hi", "hello there", "abc", "what is 2+2?"]
    prompts = [{"prompt_input_ids": tok(t, add_special_tokens=False)["input_ids"], "prompt_text": t, "extras": {}}
               for t in texts]
    batch = prompt_batch(prompts, tok.pad_token_id)
    torch.manual_seed(seed)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature)
    return generate_rollouts(HFGenerateBackend(policy, tok), tok, batch["input_ids"], batch["attention_mask"],
                             params, 1, batch["prompt_texts"], batch["extras"])


# ---------------------------------------------------------------- rewards with KL
def test_per_token_rewards_hand_computed_score_at_last_real_token():
    """raw responses [5, EOS, 7, 7] and [5, 6, 7, 8] (no EOS) -> masks [1,1,0,0] and [1,1,1,1];
    the score goes to the EOS (col 1) in row 0 and to the last token (col 3) in row 1.
    kl_t = logpi - logpref: row 0 [0.5, 0, (1 masked), 0]; row 1 [0.5, 0, 0, -0.5].
    beta = 0.1, scores [2, -1]:
      r row 0 = [-0.05, 0 + 2, 0, 0];  r row 1 = [-0.05, 0, 0, +0.05 - 1 = -0.95]."""
    raw = torch.tensor([[5, 2, 7, 7], [5, 6, 7, 8]])
    _, response_mask, has_eos = postprocess_responses(raw, eos_token_id=2, pad_token_id=0)
    assert has_eos.tolist() == [True, False]
    assert_close(last_response_index(response_mask), torch.tensor([1, 3]))
    logprobs = torch.tensor([[-1.0, -2.0, -3.0, 0.0], [-0.5, -0.5, -0.5, -0.5]])
    ref_logprobs = torch.tensor([[-1.5, -2.0, -2.0, 0.0], [-1.0, -0.5, -0.5, 0.0]])
    rewards, kl = per_token_rewards(logprobs, ref_logprobs, torch.tensor([2.0, -1.0]), response_mask, kl_coef=0.1)
    assert_close(kl, torch.tensor([[0.5, 0.0, 0.0, 0.0], [0.5, 0.0, 0.0, -0.5]]))
    assert_close(rewards, torch.tensor([[-0.05, 2.0, 0.0, 0.0], [-0.05, 0.0, 0.0, -0.95]]))


def test_rewards_zero_kl_when_policy_is_reference(tiny):
    """policy == reference (a frozen copy): every per-token reward is 0 except the score at the last token."""
    policy, rm, tok = tiny
    rollout = tiny_rollout(policy, tok)
    ref_model, ref_ctx = build_reference(policy)
    assert ref_model is not policy
    exp = make_experience(policy, ref_model, ref_ctx, ValueModel.from_reward_model(rm), RewardModelScorer(rm, tok),
                          None, rollout, PPOSection(micro_batch_size=2), kl_coef=0.5, temperature=1.0, penalty=None)
    assert_close(exp.kl, torch.zeros_like(exp.kl), atol=0.0, rtol=0.0)
    expected = torch.zeros_like(exp.rewards)
    expected[torch.arange(len(rollout)), rollout.response_lengths - 1] = exp.scores
    assert_close(exp.rewards, expected)
    assert exp.scores.abs().min() > 0  # the check above is not trivially satisfied by zero scores


def test_missing_eos_penalty_subtracted_from_rows_without_eos(tiny):
    """Row 0 ends with EOS (id 2), row 1 does not. penalty 1.5: scores = raw - [0, 1.5]; mode 'set': [raw0, -1.5].
    raw is the reward model's score of prompt + response read at the last real token (the EOS in row 0)."""
    _, rm, tok = tiny
    scorer = RewardModelScorer(rm, tok)
    prompt_ids = torch.tensor([[0, 40, 41], [42, 43, 44]])
    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    response_ids, response_mask, has_eos = postprocess_responses(torch.tensor([[50, 2, 51], [52, 53, 54]]), 2, 0)
    rollout = Rollout(prompt_ids, prompt_mask, response_ids, response_mask, has_eos, ["a", "b"], ["x", "y"], [{}, {}])
    scores, raw, parts = score_rollout(scorer, None, rollout, penalty=1.5)
    assert_close(raw, scorer.score_ids(rollout.input_ids, rollout.attention_mask))
    assert_close(scores, raw - torch.tensor([0.0, 1.5]))
    assert_close(parts["rewards/reward_model"], raw)
    set_scores, _, _ = score_rollout(scorer, None, rollout, penalty=1.5, mode="set")
    assert_close(set_scores, torch.stack([raw[0], torch.tensor(-1.5)]))
    unpenalised, _, _ = score_rollout(scorer, None, rollout, penalty=None)
    assert_close(unpenalised, raw)


def test_gae_returns_before_whitening_hand_computed():
    """r = [0, 1], V = [0.5, 0.5], gamma 1, lam 0.95 (third column is padding):
    t=1: delta = 1 + 0 - 0.5 = 0.5, A1 = 0.5;  t=0: delta = 0 + 0.5 - 0.5 = 0, A0 = 0.95 * 0.5 = 0.475.
    returns = A + V = [0.975, 1.0] (before whitening). Whitened A: mean 0.4875, unbiased std 0.0125*sqrt(2)
    -> [-1/sqrt(2), 1/sqrt(2)]; padding stays 0."""
    rewards = torch.tensor([[0.0, 1.0, 5.0]])
    values = torch.tensor([[0.5, 0.5, 3.0]])
    mask = torch.tensor([[1, 1, 0]])
    advantages, returns = whitened_advantages(rewards, values, mask, gamma=1.0, lam=0.95, whiten_rewards=False)
    assert_close(returns, torch.tensor([[0.975, 1.0, 0.0]]))
    s = 1 / math.sqrt(2)
    assert_close(advantages, torch.tensor([[-s, s, 0.0]]), atol=1e-4, rtol=0)


def test_adaptive_kl_controller_from_config():
    """Ziegler: e = clip(KL/target - 1, -0.2, 0.2); beta <- beta (1 + e n / horizon).
    beta 0.1, target 2, horizon 10, n 4: KL 3 -> e 0.2 -> beta 0.1 * 1.08 = 0.108; KL 2 -> unchanged."""
    ctl = build_kl_controller(PPOSection(kl_coef=0.1, adaptive_kl=True, kl_target=2.0, kl_horizon=10))
    assert isinstance(ctl, AdaptiveKLController)
    ctl.update(3.0, n_steps=4)
    assert_close(torch.tensor(ctl.value), torch.tensor(0.108))
    ctl.update(2.0, n_steps=4)
    assert_close(torch.tensor(ctl.value), torch.tensor(0.108))
    fixed = build_kl_controller(PPOSection(kl_coef=0.1))
    fixed.update(100.0, n_steps=4)
    assert fixed.value == 0.1


# ---------------------------------------------------------------- value model
def test_value_model_init_equals_reward_model_score_at_last_token(tiny, tmp_path):
    """V at each row's last real token == the reward model's score (pads on both sides); the value model is
    a trainable copy (the reward model stays frozen), response values are V at the position before each token,
    and save_pretrained writes a loadable sequence-classification checkpoint."""
    _, rm, tok = tiny
    value_model = ValueModel.from_reward_model(rm)
    ids = torch.tensor([[0, 0, 40, 41, 42, 2], [43, 44, 45, 46, 0, 0], [47, 48, 49, 50, 51, 52]])
    mask = (ids != 0).long()
    values = value_model(ids, mask)  # [B, T]
    assert values.shape == (3, 6) and values.dtype == torch.float32
    scores = RewardModelScorer(rm, tok).score_ids(ids, mask)
    rows = torch.arange(3)
    assert_close(values[rows, last_token_index(mask)], scores)
    assert all(p.requires_grad for p in value_model.parameters())
    assert not any(p.requires_grad for p in rm.parameters())
    assert value_model.head.weight.data_ptr() != rm.score.weight.data_ptr()

    rollout = Rollout(ids[:, :3], mask[:, :3], ids[:, 3:], mask[:, 3:], torch.tensor([True, False, False]),
                      ["", "", ""], ["", "", ""], [{}, {}, {}])
    assert_close(values_of(value_model, rollout), values[:, 2:5] * mask[:, 3:])

    value_model.save_pretrained(tmp_path / "vm")
    reloaded = ValueModel(AutoModelForSequenceClassification.from_pretrained(tmp_path / "vm"))
    assert_close(reloaded(ids, mask), values)


def test_value_model_rejects_models_without_a_one_output_score_head(tiny):
    policy, _, tok = tiny
    with pytest.raises(ValueError, match="linear score head named one of"):
        ValueModel(policy)  # a causal LM: lm_head, no score head
    two_labels = AutoModelForSequenceClassification.from_config(tiny_config(len(tok), num_labels=2))
    with pytest.raises(ValueError, match="one output.*has 2"):
        ValueModel(two_labels)
    with pytest.raises(ValueError, match="base_model_prefix"):
        ValueModel(torch.nn.Linear(2, 1))


# ---------------------------------------------------------------- PPO update
def run_ppo_update(tiny, temperature, lr, penalty, max_grad_norm, amp=contextlib.nullcontext):
    """One PPO update (2 epochs x 2 minibatches) on a fresh copy of the tiny policy; experience made under ``amp``."""
    policy0, rm, tok = tiny
    policy = copy.deepcopy(policy0)
    rollout = tiny_rollout(policy, tok, temperature=temperature)
    ref_model, ref_ctx = build_reference(policy)
    value_model = ValueModel.from_reward_model(rm)
    section = PPOSection(rollout_batch_size=4, num_minibatches=2, micro_batch_size=2, ppo_epochs=2)
    with amp():
        exp = make_experience(policy, ref_model, ref_ctx, value_model, RewardModelScorer(rm, tok), None, rollout,
                              section, kl_coef=0.05, temperature=temperature, penalty=penalty)
    models = PolicyAndValue(policy, value_model)
    optimizer = torch.optim.AdamW(models.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    torch.manual_seed(0)
    return ppo_update(models, optimizer, scheduler, exp, section, temperature=temperature,
                      max_grad_norm=max_grad_norm, amp=amp)


def test_first_minibatch_ratio_is_one_and_approxkl_zero(tiny):
    """Log-probs recomputed with logits / temperature (0.7) under the same padding, dropout off: the first
    minibatch of the first epoch sees pi == pi_old (ratio 1, approxkl 0); later minibatches do not."""
    stats = run_ppo_update(tiny, temperature=0.7, lr=1e-2, penalty=1.0, max_grad_norm=1.0)
    assert len(stats) == 4  # 2 epochs x 2 minibatches
    first = stats[0]
    assert first["policy/ratio_min"] == first["policy/ratio_max"] == 1.0  # exactly, on CPU
    assert first["policy/approxkl"] == 0.0
    assert first["policy/clipfrac"] == 0.0 and first["val/clipfrac"] == 0.0
    assert stats[-1]["policy/approxkl"] > 1e-8  # the policy moved: the check above can fail


def test_mixed_precision_updates_see_the_new_weights(tiny):
    """Under bf16 autocast each micro-batch forward must use the weights after the previous optimizer step.
    One autocast context around the whole update would serve torch.autocast's cached bf16 copies of the old
    weights: every minibatch would see ratio == 1 exactly, however far the policy moved."""
    amp = functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16)
    stats = run_ppo_update(tiny, temperature=1.0, lr=5e-2, penalty=None, max_grad_norm=None, amp=amp)
    assert all(s["policy/approxkl"] > 1e-6 for s in stats[2:])  # second epoch: the policy has moved
    assert any(s["policy/ratio_min"] != s["policy/ratio_max"] for s in stats[1:])


# ---------------------------------------------------------------- end to end
def test_cli_ppo_end_to_end_with_adaptive_kl(paths, tmp_path):
    """`alignkit ppo` on tiny models: model/, value_model/, summary.json, one metrics line per iteration with
    the logged keys (incl. an extra reward component), eval/ metrics, the adaptive KL coefficient following
    Ziegler's update between lines, and the LR schedule spanning num_iterations * ppo_epochs * num_minibatches."""
    out = tmp_path / "run"
    rc = cli.main(["ppo", *overrides(paths, out, "ppo.num_iterations=3", "ppo.adaptive_kl=true", "ppo.kl_target=0.5",
                                     "ppo.kl_horizon=20", "ppo.kl_coef=0.2", f"data.eval={paths['prompts']}",
                                     "data.eval_limit=2", "reward.components=[{type: length, target_length: 3}]")])
    assert rc == 0
    AutoModelForCausalLM.from_pretrained(out / "model")
    ValueModel(AutoModelForSequenceClassification.from_pretrained(out / "value_model"))
    records = read_metrics(out / "metrics.jsonl")
    train_records = [r for r in records if "objective/kl" in r]
    assert [r["step"] for r in train_records] == [1, 2, 3]
    for r in train_records:
        assert set(LOGGED_KEYS) <= set(r), set(LOGGED_KEYS) - set(r)
        assert all(math.isfinite(v) for v in r.values())
        # score = reward model + extra component (weight 1), before the missing-EOS penalty
        assert_close(torch.tensor(r["scores"]), torch.tensor(r["rewards/reward_model"] + r["rewards/length"]))
    for prev, nxt in zip(train_records, train_records[1:]):
        e = min(max(prev["objective/kl"] / 0.5 - 1.0, -0.2), 0.2)
        assert_close(torch.tensor(nxt["kl_coef"]), torch.tensor(prev["kl_coef"] * (1 + e * 4 / 20)))
    assert train_records[0]["kl_coef"] == 0.2 and train_records[1]["kl_coef"] != 0.2
    # linear schedule over 3 iterations x 2 epochs x 2 minibatches = 12 updates; 4 per iteration
    assert_close(torch.tensor([r["lr"] for r in train_records]), torch.tensor([1e-3 * 8 / 12, 1e-3 * 4 / 12, 0.0]))
    eval_record = [r for r in records if "eval/scores" in r]
    assert len(eval_record) == 1 and {"eval/kl", "eval/response_length"} <= set(eval_record[0])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics"]["objective/scores"] == train_records[-1]["objective/scores"]


def test_resume_after_kill_equals_uninterrupted(paths, tmp_path, monkeypatch):
    """4 iterations, checkpoint every 2. Killed in iteration 4 (iteration 3 logged, not checkpointed), resumed:
    same final policy and value weights, and the same metrics (iteration 3's stale line replaced)."""
    extra = ("ppo.num_iterations=4", "ppo.save_every=2", "ppo.adaptive_kl=true", "ppo.kl_target=0.5")
    full = tmp_path / "full"
    assert cli.main(["ppo", *overrides(paths, full, *extra)]) == 0

    class Killed(Exception):
        pass

    calls = {"n": 0}
    real_generate = ppo_mod.generate_rollouts

    def dying_generate(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise Killed("simulated kill")
        return real_generate(*args, **kwargs)

    killed = tmp_path / "killed"
    monkeypatch.setattr(ppo_mod, "generate_rollouts", dying_generate)
    with pytest.raises(Killed):
        cli.main(["ppo", *overrides(paths, killed, *extra)])
    monkeypatch.setattr(ppo_mod, "generate_rollouts", real_generate)
    state = json.loads((killed / "checkpoints" / "step-00000002" / "state.json").read_text())
    assert state["loop_state"]["iteration"] == 2 and {"kl_ctl", "sampler"} <= set(state["extra_state"])
    assert [r["step"] for r in read_metrics(killed / "metrics.jsonl")] == [1, 2, 3]
    assert not (killed / "model").exists()

    assert cli.main(["ppo", *overrides(paths, killed, *extra), "--resume"]) == 0
    for name in ("model", "value_model"):
        a, b = load_file(str(full / name / "model.safetensors")), load_file(str(killed / name / "model.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}/{k}"

    def strip(records):
        return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in records]

    assert strip(read_metrics(killed / "metrics.jsonl")) == strip(read_metrics(full / "metrics.jsonl"))


def test_lora_policy_uses_adapter_disabled_reference(paths, tiny, tmp_path, monkeypatch):
    """Under LoRA the reference is the policy itself with adapters disabled: no frozen copy is ever made."""
    policy0, _, _ = tiny
    peft_policy = apply_lora(copy.deepcopy(policy0), LoraConfig(enabled=True, r=4, alpha=8))
    ref_model, _ = build_reference(peft_policy)
    assert ref_model is peft_policy

    def no_copy(model):
        raise AssertionError("copy_frozen called under LoRA")

    monkeypatch.setattr(ppo_mod, "copy_frozen", no_copy)
    out = tmp_path / "lora"
    assert cli.main(["ppo", *overrides(paths, out, "model.lora.enabled=true", "model.lora.r=4",
                                       "model.lora.alpha=8", "train.lr=1e-2")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out / "model")
    base = AutoModelForCausalLM.from_pretrained(paths["policy"])
    assert not torch.equal(merged.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)
    ckpt = load_file(str(out / "checkpoints" / "step-00000002" / "weights.safetensors"))
    policy_keys = [k for k in ckpt if k.startswith("policy.")]
    assert policy_keys and all("lora_" in k for k in policy_keys)  # adapters only, no frozen base weights
    records = read_metrics(out / "metrics.jsonl")
    assert records[0]["objective/kl"] == 0.0  # adapters start at B = 0: policy == reference


# ---------------------------------------------------------------- errors
def test_config_errors_are_reported(paths, tmp_path, capsys):
    out = tmp_path / "bad"
    assert cli.main(["ppo", *overrides(paths, out, "ppo.reward_model=")]) == 1
    assert "ppo.reward_model is not set" in capsys.readouterr().err
    assert cli.main(["ppo", *overrides(paths, out, "ppo.rollout_batch_size=3")]) == 1
    assert "must be divisible by ppo.num_minibatches (2)" in capsys.readouterr().err
    assert cli.main(["ppo", *overrides(paths, out, "ppo.reward_model=", "reward.components=[{type: format, pattern: x}]")]) == 1
    assert (f"ppo.value_model is not set: without ppo.reward_model the value model needs a backbone, e.g. "
            f"ppo.value_model={paths['policy']} ppo.value_layers=4") in capsys.readouterr().err
    assert not out.exists()  # nothing written for an invalid config


def test_reward_model_with_another_tokenizer_needs_a_value_model(paths, encoder_rm, tmp_path, capsys):
    """The error names both tokenizers and suggests the policy as the value backbone; nothing is written.
    A value backbone with yet another tokenizer is refused too (it would read the policy's ids)."""
    out = tmp_path / "run"
    assert cli.main(["ppo", *overrides(paths, out, f"ppo.reward_model={encoder_rm}")]) == 1
    err = capsys.readouterr().err
    assert f"ppo.reward_model '{encoder_rm}' has a different tokenizer ({encoder_rm} (TokenizersBackend, 109 tokens))" in err
    assert f"than the policy ({paths['policy']} (" in err
    assert f"e.g. ppo.value_model={paths['policy']} ppo.value_layers=4" in err
    assert cli.main(["ppo", *overrides(paths, out, f"ppo.reward_model={encoder_rm}",
                                       f"ppo.value_model={encoder_rm}")]) == 1
    assert f"ppo.value_model '{encoder_rm}' has a different tokenizer" in capsys.readouterr().err
    assert not out.exists()


# ---------------------------------------------------------------- reward model with another tokenizer
def test_text_reward_model_sees_the_format_it_was_trained_on(paths, encoder_rm):
    """`alignkit rm` trained the encoder on {"prompt": user text, "chosen", "rejected"} tokenised by
    tokenize_preference: render_prompt without a chat template = "count to 3\n\n", then "One, two" + "[SEP]".
    At PPO time the policy's prompt is ChatML markup; TextRewardModel maps it back to "count to 3\n\n" and the
    reward model gets exactly the training ids, so its PPO score equals the training-time score (reward_scores).
    Scores [s0, s1] with row 1 lacking EOS and penalty 1: [s0, s1 - 1]."""
    tok = load_tokenizer(paths["policy"])
    scorer = load_reward_model_scorer(encoder_rm)
    texts = reward_prompt_texts(RLDataConfig(train=paths["prompts"]), tok, scorer.tokenizer)
    chatml = [f"<|im_start|>user\ncount to {i}<|im_end|>\n<|im_start|>assistant\n" for i in (3, 5)]
    assert len(texts) == 8 and [texts[t] for t in chatml] == ["count to 3\n\n", "count to 5\n\n"]
    prompts = load_prompts(RLDataConfig(train=paths["prompts"]), tok, 6)
    assert {p["prompt_text"] for p in prompts} == set(texts)  # every policy prompt has its rendering
    assert scorer.render(texts[chatml[0]], "One, two") == "count to 3\n\nOne, two[SEP]"

    records = [{"prompt": [{"role": "user", "content": f"count to {i}"}], "chosen": c, "rejected": "no"}
               for i, c in ((3, "One, two"), (5, "three!"))]
    pairs, _ = tokenize_preference(records, scorer.tokenizer, DataConfig(max_length=64))
    trained = [torch.tensor([p["chosen_input_ids"]]) for p in pairs]
    expected = torch.cat([reward_scores(scorer.model, ids, torch.ones_like(ids)) for ids in trained])  # [2]
    ids, mask = scorer.tokenize([texts[t] for t in chatml], ["One, two", "three!"])
    assert [row[m.bool()].tolist() for row, m in zip(ids, mask)] == [t[0].tolist() for t in trained]

    prompt_ids = torch.tensor([[5, 6], [7, 8]])
    response_ids, response_mask, has_eos = postprocess_responses(torch.tensor([[9, 2], [9, 9]]), 2, 0)
    rollout = Rollout(prompt_ids, torch.ones_like(prompt_ids), response_ids, response_mask, has_eos, chatml,
                      ["One, two", "three!"], [{}, {}])
    scores, raw, parts = score_rollout(TextRewardModel(scorer, texts), None, rollout, penalty=1.0)
    assert_close(raw, expected)
    assert_close(parts["rewards/reward_model"], expected)
    assert_close(scores, expected - torch.tensor([0.0, 1.0]))
    assert not torch.allclose(raw, scorer(chatml, ["One, two", "three!"]))  # the ChatML text scores differently
    unknown = Rollout(prompt_ids[:1], torch.ones_like(prompt_ids[:1]), response_ids[:1], response_mask[:1],
                      has_eos[:1], ["other"], ["x"], [{}])
    with pytest.raises(ValueError, match="no reward-model rendering of prompt 'other'"):
        score_rollout(TextRewardModel(scorer, texts), None, unknown, penalty=None)


def test_value_model_from_a_backbone_cut_to_its_first_layers(paths):
    """ppo.value_model=<policy> value_layers=1: the policy's embeddings and first layer under a fresh reward-style
    head N(0, 1/sqrt(d + 1)) = N(0, 1/sqrt(33) ~ 0.174) (transformers' default would be N(0, 0.02)).
    value_layers alone: the reward model's checkpoint cut to 1 layer, keeping its trained head."""
    tok = load_tokenizer(paths["policy"])
    torch.manual_seed(0)
    value_model = ValueModel.from_pretrained(ModelConfig(name_or_path=paths["policy"], num_hidden_layers=1), tok)
    policy = AutoModelForCausalLM.from_pretrained(paths["policy"])
    assert value_model.config.num_hidden_layers == 1 and len(value_model.backbone.layers) == 1
    assert_close(value_model.backbone.embed_tokens.weight, policy.model.embed_tokens.weight)
    assert_close(value_model.backbone.layers[0].mlp.up_proj.weight, policy.model.layers[0].mlp.up_proj.weight)
    assert 0.1 < float(value_model.head.weight.detach().std()) < 0.26
    assert all(p.requires_grad for p in value_model.parameters()) and value_model.training
    ids = torch.tensor([[40, 41, 42]])
    assert value_model(ids, torch.ones_like(ids)).shape == (1, 3)
    with pytest.raises(ValueError, match="without LoRA"):
        ValueModel.from_pretrained(ModelConfig(name_or_path=paths["policy"], lora=LoraConfig(enabled=True)), tok)
    with pytest.raises(ValueError, match="3 layers asked for, but .* has only 2"):
        ValueModel.from_pretrained(ModelConfig(name_or_path=paths["policy"], num_hidden_layers=3), tok)

    cut_rm = build_value_model(PPOConfig(ppo=PPOSection(reward_model=paths["reward"], value_layers=1)), tok, None)
    rm = AutoModelForSequenceClassification.from_pretrained(paths["reward"])
    assert len(cut_rm.backbone.layers) == 1
    assert_close(cut_rm.head.weight, rm.score.weight)


def test_cli_ppo_with_reward_model_of_another_tokenizer(paths, encoder_rm, tmp_path, monkeypatch):
    """`alignkit ppo` with the encoder reward model, ppo.value_model=<tiny policy>, value_layers=1: runs, logs every
    key, the reward model only ever sees its own prompt format, and the saved critic has 1 layer + the policy's
    tokenizer."""
    seen: list[str] = []
    real_call = RewardModelScorer.__call__

    def recording_call(self, prompts, completions, extras=None):
        seen.extend(prompts)
        return real_call(self, prompts, completions, extras)

    monkeypatch.setattr(RewardModelScorer, "__call__", recording_call)
    out = tmp_path / "run"
    assert cli.main(["ppo", *overrides(paths, out, f"ppo.reward_model={encoder_rm}", f"ppo.value_model={paths['policy']}",
                                       "ppo.value_layers=1", f"data.eval={paths['prompts']}", "data.eval_limit=2",
                                       "reward.missing_eos_penalty=2.0")]) == 0
    records = read_metrics(out / "metrics.jsonl")
    train_records = [r for r in records if "objective/kl" in r]
    assert [r["step"] for r in train_records] == [1, 2]
    for r in train_records:
        assert set(LOGGED_KEYS) <= set(r), set(LOGGED_KEYS) - set(r)
        assert all(math.isfinite(v) for v in r.values())
        # penalty 2 on the rows without EOS: scores after the penalty = before - 2 * no_eos_frac
        assert_close(torch.tensor(r["objective/scores"]), torch.tensor(r["scores"] - 2.0 * r["no_eos_frac"]))
    assert any("eval/scores" in r for r in records)
    assert len(seen) == 2 * 4 + 2 and set(seen) <= {f"count to {i}\n\n" for i in range(8)}  # train + eval rows
    saved = AutoModelForSequenceClassification.from_pretrained(out / "value_model")
    assert saved.config.num_hidden_layers == 1
    assert load_tokenizer(str(out / "value_model")).get_vocab() == load_tokenizer(paths["policy"]).get_vocab()


def test_cli_ppo_without_reward_model_scores_with_components_only(paths, tmp_path):
    """ppo.reward_model empty + reward.components: the score is the combined reward alone (no reward_model part)."""
    out = tmp_path / "run"
    assert cli.main(["ppo", *overrides(paths, out, "ppo.reward_model=", f"ppo.value_model={paths['policy']}",
                                       "reward.components=[{type: length, target_length: 3}]")]) == 0
    for r in read_metrics(out / "metrics.jsonl"):
        assert "rewards/reward_model" not in r and math.isfinite(r["loss/value"])
        assert_close(torch.tensor(r["scores"]), torch.tensor(r["rewards/length"]))
