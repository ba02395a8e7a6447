"""Tests for alignkit.rewards: reward-model scorer, rule rewards, user callables, combination, EOS penalty."""

from __future__ import annotations

import sys
import textwrap
import types

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from alignkit.config import RewardComponent, RewardSection
from alignkit.models.tiny import save_tiny_models, tiny_reward_model, tiny_tokenizer
from alignkit.rewards.base import RewardFn, RewardSpecError, load_callable
from alignkit.rewards.combine import CombinedReward, apply_missing_eos_penalty, build_reward
from alignkit.rewards.reward_model import (
    RewardModelScorer,
    load_reward_model_scorer,
    pack_left,
)
from alignkit.rewards.rules import (
    CallableReward,
    FormatReward,
    LengthReward,
    VaderReward,
    arithmetic_reward,
)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def varied_rm(seed: int = 0):
    """Tiny Llama reward model, matrices redrawn at std 0.3 (so scores differ clearly between sequences)."""
    model, tok = tiny_reward_model(seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval(), tok


# ---------------------------------------------------------------- reward model scorer
def test_pack_left_hand_example():
    """pack_left([9,5,6,9] with mask [0,1,1,0]) -> [5,6,pad,pad] mask [1,1,0,0]."""
    ids, m = pack_left(torch.tensor([[9, 5, 6, 9]]), torch.tensor([[0, 1, 1, 0]]), pad_token_id=0)
    assert torch.equal(ids, torch.tensor([[5, 6, 0, 0]])) and torch.equal(m, torch.tensor([[1, 1, 0, 0]]))


def test_scorer_pads_on_both_sides_equal_unpadded_score():
    """Row 0 = [3 pads] + prompt [30, 31] + response [40, 0, 2] + [2 pads]: the response holds a real token
    equal to the pad id (0), which HF's pad-id pooling would mis-read if it were last. Its score equals the
    unpadded sequence's score, which equals HF's own forward on the unpadded sequence (logits[0, 0])."""
    model, tok = varied_rm(1)
    scorer = RewardModelScorer(model, tok, batch_size=2, normalize=False)
    seq0 = [30, 31, 40, 0, 2]
    seq1 = [10, 11, 12, 13, 14, 15, 16, 17, 18, 2]
    ids = torch.tensor([[0, 0, 0, 30, 31, 40, 0, 2, 0, 0], seq1])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 0, 0], [1] * 10])
    got = scorer.score_ids(ids, mask)
    alone0 = scorer.score_ids(torch.tensor([seq0]), torch.ones(1, 5, dtype=torch.long))
    alone1 = scorer.score_ids(torch.tensor([seq1]), torch.ones(1, 10, dtype=torch.long))
    assert_close(got, torch.cat([alone0, alone1]), atol=1e-5, rtol=0)
    with torch.no_grad():
        hf0 = model(input_ids=torch.tensor([seq0])).logits[0, 0]
    assert_close(alone0[0], hf0, atol=1e-5, rtol=0)
    assert got.dtype == torch.float32 and abs(float(got[0] - got[1])) > 1e-3  # not a constant


def test_scorer_last_token_pad_id_is_read_at_the_last_real_token():
    """A sequence whose last REAL token has the pad id: pad-id pooling would read position 1 (token 31);
    the scorer reads position 2, i.e. equals the unpadded model's output at its last token."""
    model, tok = varied_rm(2)
    scorer = RewardModelScorer(model, tok, normalize=False)
    ids = torch.tensor([[30, 31, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    with torch.no_grad():
        base_hidden = model.model(input_ids=ids[:, :3]).last_hidden_state  # [1, 3, d]
        expected = model.score(base_hidden[:, -1])[:, 0]
        wrong = model.score(base_hidden[:, 1])[:, 0]
    got = scorer.score_ids(ids, mask)
    assert_close(got, expected, atol=1e-5, rtol=0)
    assert abs(float(got - wrong)) > 1e-3


def test_scorer_normalisation_gain_bias():
    """alignkit_reward_norm = {gain: 2, bias: -1}: score = 2 * raw - 1; normalize=False gives raw."""
    model, tok = varied_rm(3)
    ids, mask = torch.tensor([[20, 21, 2]]), torch.ones(1, 3, dtype=torch.long)
    raw = RewardModelScorer(model, tok, normalize=True).score_ids(ids, mask)  # no norm stored yet: raw
    model.config.alignkit_reward_norm = {"gain": 2.0, "bias": -1.0}
    assert_close(RewardModelScorer(model, tok, normalize=True).score_ids(ids, mask), 2.0 * raw - 1.0)
    assert_close(RewardModelScorer(model, tok, normalize=False).score_ids(ids, mask), raw)
    model.config.alignkit_reward_norm = {"gain": 2.0}
    with pytest.raises(ValueError, match="invalid 'alignkit_reward_norm'"):
        RewardModelScorer(model, tok).score_ids(ids, mask)


def test_scorer_text_path_equals_ids_path():
    """text = prompt + completion + eos, tokenized without extra special tokens, scored like the ids."""
    model, tok = varied_rm(4)
    scorer = RewardModelScorer(model, tok, batch_size=1, normalize=False)
    prompts = [
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>user\n2+2?<|im_end|>\n",
    ]
    completions = ["hello there", "4<|im_end|>"]  # the second already ends with EOS: not doubled
    got = scorer(prompts, completions, [{}, {}])
    ids0 = tok(prompts[0] + "hello there<|im_end|>", add_special_tokens=False)["input_ids"]
    ids1 = tok(prompts[1] + "4<|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids0[-1] == 2 and ids1[-2:] != [2, 2]
    expected = torch.cat(
        [
            scorer.score_ids(torch.tensor([ids0]), torch.ones(1, len(ids0), dtype=torch.long)),
            scorer.score_ids(torch.tensor([ids1]), torch.ones(1, len(ids1), dtype=torch.long)),
        ]
    )
    assert_close(got, expected, atol=1e-5, rtol=0)
    assert isinstance(scorer, RewardFn) and scorer.name == "reward_model"


def test_scorer_encoder_classifier_pads_on_both_sides():
    """An encoder classifier (BERT, CLS pooling) gets its real tokens packed left: both-side padding
    gives the unpadded score."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=103,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=1,
        pad_token_id=0,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = BertForSequenceClassification(cfg).eval()
    scorer = RewardModelScorer(model, tiny_tokenizer(), normalize=False)
    seq = [1, 30, 31, 40, 2]
    padded = scorer.score_ids(torch.tensor([[0, 0] + seq + [0]]), torch.tensor([[0, 0, 1, 1, 1, 1, 1, 0]]))
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([seq])).logits[:, 0]
    assert_close(padded, expected, atol=1e-5, rtol=0)


def test_load_reward_model_scorer_from_disk(tmp_path):
    paths = save_tiny_models(tmp_path)
    scorer = load_reward_model_scorer(str(paths["reward"]), batch_size=4)
    assert not scorer.model.training
    assert not any(p.requires_grad for p in scorer.model.parameters())
    scores = scorer(["a", "b"], ["x", "yy"], [{}, {}])
    assert scores.shape == (2,) and scores.dtype == torch.float32
    with pytest.raises(ValueError, match="is not a reward model checkpoint"):
        load_reward_model_scorer(str(paths["policy"]))


# ---------------------------------------------------------------- rule rewards
def test_arithmetic_reward_right_wrong_garbage():
    """last number vs answer: '2 + 3 = 5' vs '5' -> 1; 'The answer is 6.' vs 5 -> 0; 'banana' -> 0;
    'so it is -4' vs -4 -> 1; '1,234' vs 1234 -> 1; '2.50' vs '2.5' -> 1; '' -> 0; '3/4' vs 0.75 -> 1."""
    completions = [
        "2 + 3 = 5",
        "The answer is 6.",
        "banana",
        "so it is -4",
        "total 1,234",
        "x = 2.50",
        "",
        "3/4",
    ]
    answers = ["5", 5, "5", -4, "1234", "2.5", "1", 0.75]
    got = arithmetic_reward([""] * 8, completions, [{"answer": a} for a in answers])
    assert_close(got, t(1, 0, 0, 1, 1, 1, 0, 1))
    with pytest.raises(ValueError, match=r"needs the field 'answer'.*row 1 has only \['question'\]"):
        arithmetic_reward(["", ""], ["1", "2"], [{"answer": "1"}, {"question": "?"}])


def test_format_and_length_rewards():
    """format r'^<think>.*</think>' -> [1, 0];
    length target 4 chars: len 4 -> 0, len 2 -> -0.5, len 10 -> -1.5;
    with the char tokenizer, '<|im_end|>' is 1 token -> -0.75."""
    fmt = FormatReward(r"^<think>.*</think>")
    assert_close(fmt(["", ""], ["<think>a</think> 4", "4"], [{}, {}]), t(1, 0))
    with pytest.raises(RewardSpecError, match=r"invalid regex '\(unclosed'"):
        FormatReward("(unclosed")
    length = LengthReward(4)
    assert_close(length(["", "", ""], ["abcd", "ab", "abcdefghij"], [{}] * 3), t(0.0, -0.5, -1.5))
    tok_length = LengthReward(4, tokenizer=tiny_tokenizer())
    assert_close(tok_length([""], ["<|im_end|>"], [{}]), t(-0.75))
    with pytest.raises(RewardSpecError, match="target_length must be > 0"):
        LengthReward(0)


def test_vader_reward_wraps_gold_scores(monkeypatch):
    gold = types.ModuleType("alignkit.rewards.gold")
    gold.vader_scores = lambda texts: [0.5 if "good" in s else -0.25 for s in texts]
    monkeypatch.setitem(sys.modules, "alignkit.rewards.gold", gold)
    assert_close(VaderReward()(["", ""], ["good day", "bad day"], [{}, {}]), t(0.5, -0.25))


# ---------------------------------------------------------------- user callables
@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        textwrap.dedent("""
        import numpy as np

        NOT_CALLABLE = 3

        def exact(prompts, completions, answer, **kwargs):
            return [float(c == a) for c, a in zip(completions, answer)]

        def with_len(prompts, completions, **kwargs):
            return np.array([len(c) + len(p) for p, c in zip(prompts, completions)], dtype=np.float64)

        def seen_kwargs(prompts, completions, **kwargs):
            return [float(len(kwargs))] * len(completions)

        def returns_string(prompts, completions, **kwargs):
            return "1.0"

        def returns_short(prompts, completions, **kwargs):
            return [1.0]

        def returns_words(prompts, completions, **kwargs):
            return ["good"] * len(completions)

        class Scorer:
            @staticmethod
            def score(prompts, completions, **kwargs):
                return [2.0] * len(completions)
    """)
    )
    (tmp_path / "broken_dep.py").write_text("import surely_not_a_module_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("my_rewards", "broken_dep"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return tmp_path


def test_load_callable_module_file_and_errors(user_module):
    fn = load_callable("my_rewards:exact")
    assert fn(["p"], ["4"], answer=["4"]) == [1.0]
    by_file = load_callable(f"{user_module / 'my_rewards.py'}:with_len")
    assert list(by_file(["ab"], ["c"])) == [3.0]
    assert load_callable("my_rewards:Scorer.score")([""], ["x"]) == [2.0]
    with pytest.raises(RewardSpecError, match=r"'no_such_mod_xyz:f'.*module 'no_such_mod_xyz' not found"):
        load_callable("no_such_mod_xyz:f")
    with pytest.raises(RewardSpecError, match=r"'my_rewards:nope'.*has no attribute 'nope'"):
        load_callable("my_rewards:nope")
    with pytest.raises(RewardSpecError, match=r"'my_rewards:NOT_CALLABLE'.*is not callable \(it is a int\)"):
        load_callable("my_rewards:NOT_CALLABLE")
    with pytest.raises(RewardSpecError, match=r"must be 'module:function'.*got 'my_rewards'"):
        load_callable("my_rewards")
    with pytest.raises(RewardSpecError, match=r"importing module 'broken_dep' failed: ModuleNotFoundError"):
        load_callable("broken_dep:f")
    with pytest.raises(RewardSpecError, match=r"file '.*missing\.py' not found"):
        load_callable(f"{user_module / 'missing.py'}:f")


def test_callable_reward_passes_extras_as_list_kwargs_and_checks_output(user_module):
    """extras [{answer: '4', id: 1}, {answer: '5', id: 2}] -> exact(answer=['4', '5']) -> [1, 0];
    seen_kwargs counts the list kwargs: answer and id -> 2."""
    extras = [{"answer": "4", "id": 1}, {"answer": "5", "id": 2}]
    reward = CallableReward("my_rewards:exact")
    assert reward.name == "exact"
    assert_close(reward(["", ""], ["4", "4"], extras), t(1, 0))
    assert_close(CallableReward("my_rewards:seen_kwargs")(["", ""], ["a", "b"], extras), t(2, 2))
    assert_close(CallableReward("my_rewards:with_len")(["p", ""], ["ab", "c"], [{}, {}]), t(3, 1))
    with pytest.raises(
        RewardSpecError,
        match=r"'my_rewards:returns_string' must return a list/array/tensor of 2 "
        r"floats, got str",
    ):
        CallableReward("my_rewards:returns_string")(["", ""], ["a", "b"], [{}, {}])
    with pytest.raises(
        RewardSpecError, match=r"'my_rewards:returns_short' must return 2 floats.*got shape \(1,\)"
    ):
        CallableReward("my_rewards:returns_short")(["", ""], ["a", "b"], [{}, {}])
    with pytest.raises(
        RewardSpecError,
        match=r"'my_rewards:returns_words' must return 2 floats; got a list with a "
        r"non-numeric entry",
    ):
        CallableReward("my_rewards:returns_words")(["", ""], ["a", "b"], [{}, {}])


# ---------------------------------------------------------------- combination and EOS penalty
def test_combined_reward_weighted_sum_and_components():
    """r_a = [1, 0], r_b = [2, 4]; weights 1 and 0.5 -> total [1 + 1, 0 + 2] = [2, 2]; raw parts logged."""
    a = lambda p, c, e: t(1, 0)  # noqa: E731
    b = lambda p, c, e: [2.0, 4.0]  # noqa: E731
    combined = CombinedReward([("a", a, 1.0), ("b", b, 0.5)])
    total, parts = combined(["", ""], ["x", "y"], [{}, {}])
    assert_close(total, t(2, 2))
    assert set(parts) == {"rewards/a", "rewards/b"}
    assert_close(parts["rewards/a"], t(1, 0))
    assert_close(parts["rewards/b"], t(2, 4))
    with pytest.raises(RewardSpecError, match=r"\['a'\] appear more than once"):
        CombinedReward([("a", a, 1.0), ("a", b, 1.0)])
    with pytest.raises(RewardSpecError, match="at least one component"):
        CombinedReward([])
    short = CombinedReward([("short", lambda p, c, e: [1.0], 1.0)])
    with pytest.raises(RewardSpecError, match=r"reward component 'short' must return 2 floats"):
        short(["", ""], ["x", "y"], [{}, {}])
    with pytest.raises(ValueError, match="1 extras"):
        combined(["", ""], ["x", "y"], [{}])


def test_missing_eos_penalty_modes():
    """scores [1, 2, 3], has_eos [T, F, F], penalty 1.5: subtract -> [1, 0.5, 1.5]; set -> [1, -1.5, -1.5]."""
    scores, has_eos = t(1, 2, 3), torch.tensor([True, False, False])
    assert_close(apply_missing_eos_penalty(scores, has_eos, 1.5, "subtract"), t(1, 0.5, 1.5))
    assert_close(apply_missing_eos_penalty(scores, has_eos, 1.5, "set"), t(1, -1.5, -1.5))
    assert apply_missing_eos_penalty(scores, has_eos, None, "set") is scores
    with pytest.raises(ValueError, match="missing_eos_mode must be 'subtract' or 'set', got 'zero'"):
        apply_missing_eos_penalty(scores, has_eos, 1.0, "zero")


def test_build_reward_from_section(user_module, tmp_path):
    """arithmetic (w 1) + format (w 0.5) + length target 2 chars (w 2) + callable (w 1), completions
    '4' (answer 4) and '<b>22</b>' (answer 5):
      row 0: 1 + 0.5*0 + 2*(-|1-2|/2 = -0.5) + 1*1 = 1 - 1 + 1 = 1
      row 1: 0 + 0.5*1 + 2*(-|9-2|/2 = -3.5) + 0 = 0.5 - 7 = -6.5"""
    section = RewardSection(
        components=[
            RewardComponent(type="arithmetic"),
            RewardComponent(type="format", pattern="<b>", weight=0.5),
            RewardComponent(type="length", target_length=2, weight=2.0, name="len"),
            RewardComponent(type="callable", path="my_rewards:exact"),
        ]
    )
    reward = build_reward(section)
    total, parts = reward(["", ""], ["4", "<b>22</b>"], [{"answer": "4"}, {"answer": "5"}])
    assert_close(total, t(1.0, -6.5))
    assert sorted(parts) == ["rewards/arithmetic", "rewards/callable", "rewards/format", "rewards/len"]
    assert_close(parts["rewards/len"], t(-0.5, -3.5))

    with pytest.raises(RewardSpecError, match="reward.components is empty"):
        build_reward(RewardSection())
    dup = RewardSection(
        components=[RewardComponent(type="format", pattern="a"), RewardComponent(type="format", pattern="b")]
    )
    with pytest.raises(RewardSpecError, match=r"names \['format'\] appear more than once"):
        build_reward(dup)


def test_build_reward_model_components_share_one_loaded_model(tmp_path):
    """Two model components on the same path load it once; weights 1 and -1 cancel; the component with
    normalize=False ignores the stored gain/bias."""
    paths = save_tiny_models(tmp_path)
    section = RewardSection(
        components=[
            RewardComponent(type="model", path=str(paths["reward"]), name="rm"),
            RewardComponent(
                type="model", path=str(paths["reward"]), name="rm_raw", weight=-1.0, normalize=False
            ),
        ]
    )
    cache: dict = {}
    reward = build_reward(section, reward_models=cache)
    assert list(cache) == [str(paths["reward"])]
    scorers = [fn for _, fn, _ in reward.components]
    assert scorers[0].model is scorers[1].model
    total, parts = reward(["a"], ["b"], [{}])
    assert_close(total, t(0.0), atol=1e-6, rtol=0)
    scorers[0].model.config.alignkit_reward_norm = {"gain": 3.0, "bias": 1.0}
    total, parts = reward(["a"], ["b"], [{}])
    assert_close(parts["rewards/rm"], 3.0 * parts["rewards/rm_raw"] + 1.0)
    assert_close(total, 2.0 * parts["rewards/rm_raw"] + 1.0)


def test_reward_tensor_accepts_numpy_and_tensor():
    from alignkit.rewards.base import as_reward_tensor

    assert_close(as_reward_tensor(np.array([1, 2]), 2, "x"), t(1, 2))
    assert_close(as_reward_tensor(torch.tensor([1.0, 2.0], dtype=torch.float64), 2, "x"), t(1, 2))


def test_model_component_with_another_tokenizer_rerenders_the_prompt_in_its_own_format(tmp_path):
    """A reward model whose vocabulary differs from the policy's scores ``render_prompt(its tokenizer, messages)``
    + completion (its training format), not the policy's chat-formatted prompt text."""
    from alignkit.data.tokenize import render_prompt

    paths = save_tiny_models(tmp_path)

    class OtherPolicyTokenizer:  # only the vocabulary matters for the decision
        def get_vocab(self):
            return {"<policy-only>": 0}

    section = RewardSection(components=[RewardComponent(type="model", path=str(paths["reward"]), name="rm")])
    cache: dict = {}
    reward = build_reward(section, OtherPolicyTokenizer(), reward_models=cache)
    scorer = cache[str(paths["reward"])]
    messages = [{"role": "user", "content": "rate me"}]
    total, _ = reward(["[policy markup] rate me [/policy markup]"], ["fine"], [{"prompt_messages": messages}])
    assert_close(total, scorer([render_prompt(scorer.tokenizer, messages)], ["fine"]))
    assert not torch.allclose(total, scorer(["[policy markup] rate me [/policy markup]"], ["fine"]))
    with pytest.raises(RewardSpecError, match="re-renders each prompt in its own format from extras\\['prompt_messages'\\]"):
        reward(["x"], ["fine"], [{}])
    # the same vocabulary: the policy's prompt text is used as is
    same = build_reward(section, scorer.tokenizer, reward_models=cache)
    assert_close(same(["abc"], ["fine"], [{}])[0], scorer(["abc"], ["fine"]))


def test_freeze_embeddings_leaves_only_the_embedding_matrix_frozen(tmp_path):
    """model.freeze_embeddings (full fine-tuning): the input embeddings get no gradient, everything else does;
    with LoRA the option is moot (adapters are the only trainable weights)."""
    from alignkit.config import ModelConfig
    from alignkit.models.loading import load_policy, load_reward_model

    paths = save_tiny_models(tmp_path)
    tok = tiny_tokenizer()
    for load, path in ((load_reward_model, paths["reward"]), (load_policy, paths["policy"])):
        model = load(ModelConfig(name_or_path=str(path), freeze_embeddings=True), tok)
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        assert frozen and all("embed" in n for n in frozen), frozen
        assert not model.get_input_embeddings().weight.requires_grad
        default = load(ModelConfig(name_or_path=str(path)), tok)
        assert all(p.requires_grad for p in default.parameters())
