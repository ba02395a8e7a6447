"""Tests for alignkit.algorithms.ppo and alignkit.models.value (REFERENCES: "PPO for language models")."""

from __future__ import annotations

import copy
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
from alignkit.algorithms.ppo import (
    Experience,
    build_kl_controller,
    build_value_model,
    ppo_update,
    reward_section,
    values_of,
    whitened_advantages,
)
from alignkit.algorithms.reward_model import reward_scores
from alignkit.config import DataConfig, LoraConfig, ModelConfig, PPOConfig, PPOSection, RLDataConfig, load_config
from alignkit.data.tokenize import tokenize_preference
from alignkit.models.loading import apply_lora, disable_dropout, load_tokenizer
from alignkit.models import reference as reference_mod
from alignkit.models.reference import Reference
from alignkit.models.tiny import save_tiny_models, tiny_causal_lm, tiny_config, tiny_reward_model
from alignkit.models.value import ValueModel
from alignkit.online.rollout import sample_and_score
from alignkit.online import run as run_mod
from alignkit.online.run import OnlineRun
from alignkit.ops.advantages import kl_penalized_rewards
from alignkit.ops.kl import AdaptiveKLController
from alignkit.ops.stats import last_index
from alignkit.rewards.base import RewardSpecError
from alignkit.rewards.combine import build_reward
from alignkit.rewards.reward_model import RewardModelScorer, load_reward_model_scorer
from alignkit.rollout.engine import Rollout, SamplingParams, postprocess_responses
from alignkit.rollout.prompts import load_prompts
from alignkit.train.logging import read_metrics

LOGGED_KEYS = [
    "objective/kl", "objective/entropy", "objective/scores", "policy/approxkl", "policy/clipfrac", "val/clipfrac",
    "val/vpred", "val/error", "returns", "scores", "response_length", "no_eos_frac", "kl_coef", "lr", "loss/policy",
    "loss/value", "policy/grad_norm", "val/grad_norm", "time/generation", "time/scoring", "time/training",
    "rewards/reward_model",
]


# ---------------------------------------------------------------- fixtures
pytestmark = pytest.mark.usefixtures("one_thread")


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
    varied = root / "varied.jsonl"  # prompts of different lengths: the batch pads them on the left
    varied.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in ("hi", "hello there", "abc", "what is 2+2?")),
                      encoding="utf-8")
    return {"policy": str(p["policy"]), "reward": str(p["reward"]), "prompts": str(prompts), "varied": str(varied),
            "root": root}


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


def start_ppo_run(paths, out, *extra: str) -> OnlineRun:
    """The harness exactly as ``ppo.train`` starts it (reference, reward section, value model), on the
    ``varied`` prompts: a real run directory, real models, nothing trained yet."""
    cfg = load_config(PPOConfig, None, overrides(paths, out, f"data.train={paths['varied']}", *extra))
    ppo = cfg.ppo
    return OnlineRun.start(
        cfg, "ppo", False, total_steps=ppo.num_iterations * ppo.ppo_epochs * ppo.num_minibatches, reference=True,
        reward=reward_section(cfg), value_fn=lambda tok, rms: build_value_model(cfg, tok, rms), value_lr=ppo.value_lr,
    )


class FixedBackend:
    """A generation backend that returns the same raw tokens [B, R] whatever it is asked (rows may run past
    their EOS, as a real engine's do)."""

    def __init__(self, raw: torch.Tensor) -> None:
        self.raw = raw

    def generate(self, prompt_ids, prompt_mask, params, row_seeds=None):
        return self.raw

    def update_weights(self, model) -> None:
        pass


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
    assert_close(last_index(response_mask), torch.tensor([1, 3]))
    logprobs = torch.tensor([[-1.0, -2.0, -3.0, 0.0], [-0.5, -0.5, -0.5, -0.5]])
    ref_logprobs = torch.tensor([[-1.5, -2.0, -2.0, 0.0], [-1.0, -0.5, -0.5, 0.0]])
    rewards, kl = kl_penalized_rewards(logprobs, ref_logprobs, torch.tensor([2.0, -1.0]), response_mask, kl_coef=0.1)
    assert_close(kl, torch.tensor([[0.5, 0.0, 0.0, 0.0], [0.5, 0.0, 0.0, -0.5]]))
    assert_close(rewards, torch.tensor([[-0.05, 2.0, 0.0, 0.0], [-0.05, 0.0, 0.0, -0.95]]))


def test_rewards_zero_kl_when_policy_is_reference(paths, tmp_path):
    """Full fine-tuning: the reference is a frozen copy of the initial policy, so in the first experience every
    per-token reward is 0 except the score at the last token (k1 exactly 0, not merely small)."""
    run = start_ppo_run(paths, tmp_path / "run")
    assert run.reference.kind == "frozen" and run.reference.model is not run.policy
    batch = run.sample(*run.next_prompts(4))
    exp = Experience(run, batch, kl_coef=0.5)
    rollout = exp.rollout
    assert len(set(rollout.prompt_mask.sum(1).tolist())) > 1  # prompts of different lengths (left padding)
    assert_close(exp.kl, torch.zeros_like(exp.kl), atol=0.0, rtol=0.0)
    expected = torch.zeros_like(exp.rewards)
    expected[torch.arange(len(rollout)), rollout.response_lengths - 1] = exp.scores
    assert_close(exp.rewards, expected)
    assert_close(exp.scores.cpu(), batch.rewards)  # the scores after the missing-EOS penalty
    assert exp.scores.abs().min() > 0  # the check above is not trivially satisfied by zero scores


def test_missing_eos_penalty_subtracted_from_rows_without_eos(paths, tmp_path):
    """The reward model is the ``model`` component of ``reward_section``; ppo.missing_eos_penalty applies unless
    reward.missing_eos_penalty is set. Row 0 ends with EOS (id 2), row 1 does not. penalty 1.5:
    rewards = scores - [0, 1.5]; mode 'set': [s0, -1.5]; no penalty: rewards = scores. ``scores`` (the raw,
    logged score) is the reward model's part; row 0's equals the reward model run on the rollout's own token
    ids, read at the last real token (the EOS)."""
    cfg = load_config(PPOConfig, None, overrides(paths, tmp_path, "ppo.missing_eos_penalty=1.5"))
    section = reward_section(cfg)
    assert [(c.type, c.path, c.name) for c in section.components] == [("model", paths["reward"], "reward_model")]
    assert section.missing_eos_penalty == 1.5
    own = load_config(PPOConfig, None, overrides(paths, tmp_path, "ppo.missing_eos_penalty=1.5",
                                                 "reward.missing_eos_penalty=0.5"))
    assert reward_section(own).missing_eos_penalty == 0.5  # the reward section's own setting wins
    tok = load_tokenizer(paths["policy"])
    reward_models: dict = {}
    reward = build_reward(section, tok, reward_models)
    prompts = load_prompts(RLDataConfig(train=paths["prompts"]), tok, 6)[:2]
    backend = FixedBackend(torch.tensor([[50, 2, 51], [52, 53, 54]]))

    def score(reward_cfg):
        return sample_and_score(backend, tok, prompts, [0, 1], 1, SamplingParams(max_new_tokens=3), reward,
                                reward_cfg, torch.device("cpu"))

    scored = score(section)
    rollout = scored.rollout
    assert rollout.has_eos.tolist() == [True, False] and rollout.response_mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    on_ids = reward_models[paths["reward"]].score_ids(rollout.input_ids, rollout.attention_mask)
    assert_close(scored.scores[0], on_ids[0])
    assert_close(scored.parts["rewards/reward_model"], scored.scores)
    assert_close(scored.rewards, scored.scores - torch.tensor([0.0, 1.5]))
    set_mode = score(section.model_copy(update={"missing_eos_mode": "set"}))
    assert_close(set_mode.scores, scored.scores)
    assert_close(set_mode.rewards, torch.stack([scored.scores[0], torch.tensor(-1.5)]))
    unpenalised = score(section.model_copy(update={"missing_eos_penalty": None}))
    assert_close(unpenalised.rewards, scored.scores)


def test_gae_returns_before_whitening_hand_computed():
    """r = [0, 1], V = [0.5, 0.5], gamma 1, lam 0.95 (third column is padding):
    t=1: delta = 1 + 0 - 0.5 = 0.5, A1 = 0.5;  t=0: delta = 0 + 0.5 - 0.5 = 0, A0 = 0.95 * 0.5 = 0.475.
    returns = A + V = [0.975, 1.0] (before whitening). Whitened A: mean 0.4875, unbiased std 0.0125*sqrt(2)
    -> [-1/sqrt(2), 1/sqrt(2)]; padding stays 0. The all-reduce path (statistics summed over processes; the
    identity on one process) whitens the same."""
    rewards = torch.tensor([[0.0, 1.0, 5.0]])
    values = torch.tensor([[0.5, 0.5, 3.0]])
    mask = torch.tensor([[1, 1, 0]])
    s = 1 / math.sqrt(2)
    for all_reduce in (None, lambda x: x):
        advantages, returns = whitened_advantages(rewards, values, mask, gamma=1.0, lam=0.95, whiten_rewards=False,
                                                  all_reduce=all_reduce)
        assert_close(returns, torch.tensor([[0.975, 1.0, 0.0]]))
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
    assert_close(values[rows, last_index(mask)], scores)
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
def ppo_experience(paths, out, temperature, lr, penalty, max_grad_norm, bf16=False) -> tuple[OnlineRun, Experience]:
    """A freshly started harness and its first experience on the 4 varied prompts (kl_coef 0.05), for one PPO
    update of 2 epochs x 2 minibatches of 2 rows (micro-batches of 2); under ``train.mixed_precision=bf16``
    if ``bf16``."""
    run = start_ppo_run(paths, out, f"generation.temperature={temperature}", f"train.lr={lr}",
                        f"ppo.missing_eos_penalty={'null' if penalty is None else penalty}",
                        f"train.max_grad_norm={'null' if max_grad_norm is None else max_grad_norm}",
                        f"train.mixed_precision={'bf16' if bf16 else 'no'!r}", "ppo.micro_batch_size=2")
    return run, Experience(run, run.sample(*run.next_prompts(4)), kl_coef=0.05)


def test_first_minibatch_ratio_is_one_and_approxkl_zero(paths, tmp_path):
    """Log-probs recomputed with logits / temperature (0.7) under the same padding, dropout off: the first
    minibatch of the first epoch sees pi == pi_old (ratio 1, approxkl 0); later minibatches do not."""
    run, exp = ppo_experience(paths, tmp_path / "run", temperature=0.7, lr=1e-2, penalty=1.0, max_grad_norm=1.0)
    stats = ppo_update(run, exp, iteration=1)
    assert len(stats) == 4  # 2 epochs x 2 minibatches
    first = stats[0]
    assert first["policy/ratio_min"] == first["policy/ratio_max"] == 1.0  # exactly, on CPU
    assert first["policy/approxkl"] == 0.0
    assert first["policy/clipfrac"] == 0.0 and first["val/clipfrac"] == 0.0
    assert first["policy/grad_norm"] > 0 and first["val/grad_norm"] > 0  # both param groups are trained
    assert stats[-1]["policy/approxkl"] > 1e-8  # the policy moved: the check above can fail


def test_mixed_precision_updates_see_the_new_weights(paths, tmp_path):
    """Under bf16 autocast (train.mixed_precision=bf16: ``OnlineRun.autocast``) each micro-batch forward must use
    the weights after the previous optimizer step. One autocast context around the whole update would serve
    torch.autocast's cached bf16 copies of the old weights. Autocast casts (and caches) the linear layers' weights
    only, so only those are trained here: with a stale cache every minibatch would then see the initial policy,
    ratio == 1 and approxkl == 0 exactly (checked by wrapping ppo_update in one outer autocast); embeddings or
    norms that moved would hide it."""
    run, exp = ppo_experience(paths, tmp_path / "run", temperature=1.0, lr=5e-2, penalty=None, max_grad_norm=None,
                              bf16=True)
    assert run.autocast().fast_dtype == torch.bfloat16
    for name, p in run.policy.named_parameters():
        if not name.endswith("_proj.weight"):  # the tied embedding / lm_head and the norms stay fixed
            p.requires_grad_(False)
    stats = ppo_update(run, exp, iteration=1)
    assert all(s["policy/approxkl"] > 1e-6 for s in stats[2:])  # second epoch: the policy has moved
    assert any(s["policy/ratio_min"] != s["policy/ratio_max"] for s in stats[1:])


# ---------------------------------------------------------------- end to end
def test_cli_ppo_end_to_end_with_adaptive_kl(paths, tmp_path, monkeypatch):
    """`alignkit ppo` on tiny models: model/, value_model/, summary.json, one metrics line per iteration with
    the logged keys (incl. an extra reward component), greedy eval/ metrics before and after training, the
    adaptive KL coefficient following Ziegler's update between lines (and into the summary), and the LR
    schedule spanning num_iterations * ppo_epochs * num_minibatches."""
    sampled: list[bool] = []  # do_sample of each OnlineRun.sample call
    real_sample = OnlineRun.sample

    def recording_sample(self, prompts, seeds, num_samples=1, do_sample=True):
        sampled.append(do_sample)
        return real_sample(self, prompts, seeds, num_samples, do_sample)

    monkeypatch.setattr(OnlineRun, "sample", recording_sample)
    out = tmp_path / "run"
    rc = cli.main(["ppo", *overrides(paths, out, "ppo.num_iterations=3", "ppo.adaptive_kl=true", "ppo.kl_target=0.5",
                                     "ppo.kl_horizon=20", "ppo.kl_coef=0.2", f"data.eval={paths['prompts']}",
                                     "data.eval_limit=2", "reward.components=[{type: length, target_length: 3}]")])
    assert rc == 0
    assert sampled == [False, True, True, True, False]  # greedy eval before, 3 sampled iterations, eval after
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

    def ziegler(record):
        e = min(max(record["objective/kl"] / 0.5 - 1.0, -0.2), 0.2)
        return record["kl_coef"] * (1 + e * 4 / 20)

    for prev, nxt in zip(train_records, train_records[1:]):
        assert_close(torch.tensor(nxt["kl_coef"]), torch.tensor(ziegler(prev)))
    assert train_records[0]["kl_coef"] == 0.2 and train_records[1]["kl_coef"] != 0.2
    # linear schedule over 3 iterations x 2 epochs x 2 minibatches = 12 updates, 4 per iteration; each line logs
    # the LR its iteration started with
    assert_close(torch.tensor([r["lr"] for r in train_records]), torch.tensor([1e-3, 1e-3 * 8 / 12, 1e-3 * 4 / 12]))
    eval_records = [r for r in records if "eval/scores" in r]
    assert [r["step"] for r in eval_records] == [0, 3]
    for r in eval_records:
        assert {"eval/response_length", "eval/no_eos_frac", "eval/rewards/reward_model",
                "eval/rewards/length"} <= set(r)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_metrics"]["objective/scores"] == train_records[-1]["objective/scores"]
    assert summary["iterations"] == 3 and summary["kl_coef"] == pytest.approx(ziegler(train_records[-1]))
    assert summary["eval_before"]["scores"] == eval_records[0]["eval/scores"]
    assert summary["eval_after"]["scores"] == eval_records[1]["eval/scores"]
    assert summary["value_model_dir"] == str(out / "value_model")


def test_resume_after_kill_equals_uninterrupted(paths, tmp_path, monkeypatch):
    """4 iterations, checkpoint every 2. Killed in iteration 4's sampling (iteration 3 logged, not checkpointed),
    resumed: same final policy and value weights, and the same metrics (iteration 3's stale line replaced)."""
    extra = ("ppo.num_iterations=4", "ppo.save_every=2", "ppo.adaptive_kl=true", "ppo.kl_target=0.5")
    full = tmp_path / "full"
    assert cli.main(["ppo", *overrides(paths, full, *extra)]) == 0

    class Killed(Exception):
        pass

    calls = {"n": 0}
    real_sample_and_score = run_mod.sample_and_score

    def dying_sample_and_score(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise Killed("simulated kill")
        return real_sample_and_score(*args, **kwargs)

    killed = tmp_path / "killed"
    monkeypatch.setattr(run_mod, "sample_and_score", dying_sample_and_score)
    with pytest.raises(Killed):
        cli.main(["ppo", *overrides(paths, killed, *extra)])
    monkeypatch.setattr(run_mod, "sample_and_score", real_sample_and_score)
    state = json.loads((killed / "checkpoints" / "step-00000002" / "state.json").read_text())
    assert state["step"] == 2 and state["loop_state"]["iteration"] == 2 and "sampler" in state["loop_state"]
    assert "kl_ctl" in state["extra_state"]
    assert not (killed / "checkpoints" / "step-00000003").exists()
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


def test_resume_without_a_checkpoint_is_an_error(paths, tmp_path, monkeypatch, capsys):
    """Killed in iteration 1, before any checkpoint: --resume refuses (RunError, exit code 1) instead of silently
    starting over, and says how to start fresh."""

    def dying_sample_and_score(*args, **kwargs):
        raise RuntimeError("simulated kill")

    out = tmp_path / "run"
    monkeypatch.setattr(run_mod, "sample_and_score", dying_sample_and_score)
    with pytest.raises(RuntimeError, match="simulated kill"):
        cli.main(["ppo", *overrides(paths, out)])
    assert (out / "config.yaml").is_file() and not (out / "checkpoints").exists()
    capsys.readouterr()
    assert cli.main(["ppo", *overrides(paths, out), "--resume"]) == 1
    err = capsys.readouterr().err
    assert f"--resume: no checkpoint in {out / 'checkpoints'} to resume from" in err
    assert "run without --resume to start fresh" in err
    assert not (out / "metrics.jsonl").exists()


def test_lora_policy_uses_adapter_disabled_reference(paths, tiny, tmp_path, monkeypatch):
    """Under LoRA the reference is the policy itself with adapters disabled: no frozen copy is ever made."""
    policy0, _, _ = tiny
    peft_policy = apply_lora(copy.deepcopy(policy0), LoraConfig(enabled=True, r=4, alpha=8))
    reference = Reference.of_policy(peft_policy)
    assert reference.kind == "adapters_off" and reference.model is peft_policy

    def no_copy(model):
        raise AssertionError("copy_frozen called under LoRA")

    monkeypatch.setattr(reference_mod, "copy_frozen", no_copy)
    with pytest.raises(AssertionError, match="copy_frozen called under LoRA"):  # the patch is where it would bite
        Reference.of_policy(policy0)
    out = tmp_path / "lora"
    assert cli.main(["ppo", *overrides(paths, out, "model.lora.enabled=true", "model.lora.r=4",
                                       "model.lora.alpha=8", "train.lr=1e-2")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out / "model")
    base = AutoModelForCausalLM.from_pretrained(paths["policy"])
    assert not torch.equal(merged.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)
    ckpt = load_file(str(out / "checkpoints" / "step-00000002" / "weights.safetensors"))
    policy_keys = [k for k in ckpt if k.startswith("policy.")]
    assert policy_keys and all("lora_" in k for k in policy_keys)  # adapters only, no frozen base weights
    assert any(k.startswith("value_model.") for k in ckpt)
    records = read_metrics(out / "metrics.jsonl")
    assert records[0]["objective/kl"] == 0.0  # adapters start at B = 0: policy == reference
    assert records[1]["objective/kl"] != 0.0  # after an update the adapter-disabled reference differs


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
def test_reward_model_of_another_tokenizer_sees_the_format_it_was_trained_on(paths, encoder_rm):
    """`alignkit rm` trained the encoder on {"prompt": user text, "chosen", "rejected"} tokenised by
    tokenize_preference: render_prompt without a chat template = "count to 3\n\n", then "One, two" + "[SEP]".
    At PPO time the policy's prompt is ChatML markup; the reward component (``reward_section``'s model, which
    ``build_reward`` wraps in its own prompt format since the vocabularies differ) re-renders the prompt's
    messages (extras) for the encoder, which gets exactly the training ids, so its PPO score equals the
    training-time score (reward_scores). Sampled and scored like any rollout: rows [EOS, no EOS], penalty 1 ->
    rewards [s0, s1 - 1]."""
    tok = load_tokenizer(paths["policy"])
    cfg = load_config(PPOConfig, None, overrides(paths, "unused", f"ppo.reward_model={encoder_rm}",
                                                 "reward.missing_eos_penalty=1.0"))
    reward_models: dict = {}
    reward = build_reward(reward_section(cfg), tok, reward_models)
    scorer = reward_models[encoder_rm]
    prompts = load_prompts(RLDataConfig(train=paths["prompts"]), tok, 6)
    chosen = [p for i in (3, 5) for p in prompts if p["prompt_text"].startswith(f"<|im_start|>user\ncount to {i}<")]
    assert [p["prompt_text"] for p in chosen] == [f"<|im_start|>user\ncount to {i}<|im_end|>\n<|im_start|>assistant\n"
                                                  for i in (3, 5)]
    assert scorer.render("count to 3\n\n", "One, two") == "count to 3\n\nOne, two[SEP]"
    total, _ = reward([p["prompt_text"] for p in prompts], ["x"] * 8, [p["extras"] for p in prompts])
    assert_close(total, scorer([f"count to {i}\n\n" for i in range(8)], ["x"] * 8))  # every prompt re-rendered

    completions = ["One, two", "three!!!!"]
    records = [{"prompt": [{"role": "user", "content": f"count to {i}"}], "chosen": c, "rejected": "no"}
               for i, c in zip((3, 5), completions)]
    pairs, _ = tokenize_preference(records, scorer.tokenizer, DataConfig(max_length=64))
    trained = [torch.tensor([p["chosen_input_ids"]]) for p in pairs]
    expected = torch.cat([reward_scores(scorer.model, ids, torch.ones_like(ids)) for ids in trained])  # [2]
    ids, mask = scorer.tokenize(["count to 3\n\n", "count to 5\n\n"], completions)
    assert [row[m.bool()].tolist() for row, m in zip(ids, mask)] == [t[0].tolist() for t in trained]

    # the policy "samples" "One, two" + EOS and "three!!!!" (9 tokens each: row 1 hits the length limit, no EOS)
    raw = torch.tensor([tok(completions[0], add_special_tokens=False)["input_ids"] + [tok.eos_token_id],
                        tok(completions[1], add_special_tokens=False)["input_ids"]])
    scored = sample_and_score(FixedBackend(raw), tok, chosen, [0, 1], 1, SamplingParams(max_new_tokens=9), reward,
                              reward_section(cfg), torch.device("cpu"))
    assert scored.rollout.response_texts == completions and scored.rollout.has_eos.tolist() == [True, False]
    assert_close(scored.scores, expected)
    assert_close(scored.parts["rewards/reward_model"], expected)
    assert_close(scored.rewards, expected - torch.tensor([0.0, 1.0]))
    chatml = scorer([p["prompt_text"] for p in chosen], completions)
    assert not torch.allclose(expected, chatml)  # the ChatML text would score differently
    with pytest.raises(RewardSpecError, match="re-renders each prompt in its own format"):
        reward([chosen[0]["prompt_text"]], ["x"], [{}])  # a prompt without its messages cannot be re-rendered


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

    reward_models = {paths["reward"]: load_reward_model_scorer(paths["reward"])}
    cfg = PPOConfig(ppo=PPOSection(reward_model=paths["reward"], value_layers=1))
    cut_rm = build_value_model(cfg, tok, reward_models)
    rm = AutoModelForSequenceClassification.from_pretrained(paths["reward"])
    assert len(cut_rm.backbone.layers) == 1
    assert_close(cut_rm.head.weight, rm.score.weight)
    full_copy = build_value_model(PPOConfig(ppo=PPOSection(reward_model=paths["reward"])), tok, reward_models)
    assert len(full_copy.backbone.layers) == 2  # no value_layers: the whole reward model, copied
    assert full_copy.model is not reward_models[paths["reward"]].model


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
    assert [r["step"] for r in records if "eval/scores" in r] == [0, 2]
    # 2 eval rows before training, 2 iterations x 4 rows, 2 eval rows after
    assert len(seen) == 2 + 2 * 4 + 2 and set(seen) <= {f"count to {i}\n\n" for i in range(8)}
    saved = AutoModelForSequenceClassification.from_pretrained(out / "value_model")
    assert saved.config.num_hidden_layers == 1
    assert load_tokenizer(str(out / "value_model")).get_vocab() == load_tokenizer(paths["policy"]).get_vocab()


def test_cli_ppo_without_reward_model_scores_with_components_only(paths, tmp_path):
    """ppo.reward_model empty + reward.components: the score is the combined reward alone (no reward_model part)."""
    out = tmp_path / "run"
    assert cli.main(["ppo", *overrides(paths, out, "ppo.reward_model=", f"ppo.value_model={paths['policy']}",
                                       "reward.components=[{type: length, target_length: 3}]")]) == 0
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert "rewards/reward_model" not in r and math.isfinite(r["loss/value"])
        assert_close(torch.tensor(r["scores"]), torch.tensor(r["rewards/length"]))


def test_loo_score_baseline_subtracts_the_other_responses_mean(paths, tmp_path):
    """samples_per_prompt=2, score_baseline=loo, kl_coef 0: each row's per-token rewards sum to its score minus
    the other response's score to the same prompt (k=2: r_i - r_j), so each prompt's pair sums to 0; the logged
    scores stay the raw ones. 2 prompts x 2 samples = 4 rows, prompt-major."""
    run = start_ppo_run(paths, tmp_path / "loo", "ppo.samples_per_prompt=2", "ppo.score_baseline=loo")
    batch = run.sample(*run.next_prompts(2), num_samples=2)
    assert len(batch.rollout) == 4 and batch.rollout.prompt_texts[0] == batch.rollout.prompt_texts[1]
    exp = Experience(run, batch, kl_coef=0.0)
    s = exp.scores
    assert_close(exp.rewards.sum(1), torch.stack([s[0] - s[1], s[1] - s[0], s[2] - s[3], s[3] - s[2]]))
    assert_close(exp.raw_scores, batch.scores)


def test_loo_score_baseline_needs_several_samples(paths, tmp_path, capsys):
    out = tmp_path / "bad_loo"
    assert cli.main(["ppo", *overrides(paths, out, "ppo.score_baseline=loo")]) == 1
    assert "ppo.score_baseline=loo needs ppo.samples_per_prompt >= 2" in capsys.readouterr().err
    assert cli.main(["ppo", *overrides(paths, out, "ppo.samples_per_prompt=3", "ppo.num_minibatches=5")]) == 1
    assert "ppo.rollout_batch_size x ppo.samples_per_prompt (4 x 3) must be divisible by" in capsys.readouterr().err


def test_cli_ppo_with_several_samples_per_prompt_and_loo(paths, tmp_path):
    out = tmp_path / "loo_cli"
    assert cli.main(["ppo", *overrides(paths, out, "ppo.samples_per_prompt=2", "ppo.score_baseline=loo",
                                       "ppo.rollout_batch_size=2")]) == 0
    records = [r for r in read_metrics(out / "metrics.jsonl") if "objective/kl" in r]
    assert len(records) == 2 and all(math.isfinite(r["loss/policy"]) for r in records)
