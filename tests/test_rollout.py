"""Tests for alignkit.rollout.engine: sampling params, backends, rollouts, response log-probs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from alignkit.config import GenerationSection
from alignkit.models.tiny import tiny_causal_lm, tiny_tokenizer
from alignkit.rollout.engine import (
    GenerationBackend,
    HFGenerateBackend,
    Rollout,
    SamplingParams,
    generate_rollouts,
    postprocess_responses,
    response_logprobs,
    unwrap_for_generation,
)

PAD, EOS = 0, 2  # tiny tokenizer: pad <|endoftext|> = 0, eos <|im_end|> = 2, vocab 103


class PlusOneBackend:
    """Deterministic generator: next token = previous token + 1 (mod V); never stops at EOS."""

    def __init__(self, vocab_size: int = 103):
        self.vocab_size = vocab_size
        self.calls: list[tuple[int, int]] = []  # (rows, prompt columns) per generate() call

    def generate(self, prompt_ids, prompt_mask, params, row_seeds=None):
        self.calls.append(tuple(prompt_ids.shape))
        last = prompt_ids[:, -1:]  # [B, 1] (left-padded: the last column is real)
        steps = torch.arange(1, params.max_new_tokens + 1).unsqueeze(0)  # [1, R]
        return (last + steps) % self.vocab_size  # [B, R]

    def update_weights(self, model) -> None:
        pass


def varied_lm(seed: int):
    """The tiny Llama with its matrices redrawn at std 0.3, so greedy outputs vary from token to token
    (at the default init std 0.02 greedy decoding just repeats one token)."""
    model, tok = tiny_causal_lm(seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model, tok


def left_pad(rows: list[list[int]], pad: int = PAD) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


# ---------------------------------------------------------------- sampling params
def test_sampling_params_from_section_and_validation():
    g = GenerationSection(max_new_tokens=7, temperature=0.7, top_p=0.9, top_k=5)
    assert SamplingParams.from_section(g) == SamplingParams(7, 0.7, 0.9, 5, True)
    assert SamplingParams.from_section(g, do_sample=False).do_sample is False
    with pytest.raises(ValueError, match="max_new_tokens must be > 0"):
        SamplingParams(0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        SamplingParams(4, temperature=0.0)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        SamplingParams(4, top_p=1.5)
    with pytest.raises(ValueError, match="top_k must be >= 0"):
        SamplingParams(4, top_k=-1)


# ---------------------------------------------------------------- postprocess
def test_postprocess_responses_hand_example():
    """raw rows (eos = 2, pad = 0):
    [5, 2, 7, 2] -> first EOS at 1: ids [5, 2, 0, 0], mask [1, 1, 0, 0], has_eos True
    [5, 6, 7, 8] -> no EOS: ids unchanged, mask [1, 1, 1, 1] (full), has_eos False
    [2, 9, 9, 9] -> EOS first: ids [2, 0, 0, 0], mask [1, 0, 0, 0], has_eos True
    [0, 4, 2, 9] -> a pad-id token BEFORE the EOS is a real token: mask [1, 1, 1, 0]"""
    raw = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 9, 9, 9], [0, 4, 2, 9]])
    ids, mask, has_eos = postprocess_responses(raw, eos_token_id=EOS, pad_token_id=PAD)
    assert torch.equal(ids, torch.tensor([[5, 2, 0, 0], [5, 6, 7, 8], [2, 0, 0, 0], [0, 4, 2, 0]]))
    assert torch.equal(mask, torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0]]))
    assert torch.equal(has_eos, torch.tensor([True, False, True, True]))


# ---------------------------------------------------------------- generate_rollouts (generic logic)
def test_generate_rollouts_plus_one_layout_masks_and_extras():
    """Prompts (token ids): A = [10, 11] -> responses 12, 13, 14, 15 (no EOS, full mask);
    B = [100] (V = 103) -> 101, 102, 0, 1: no EOS either (a pad id 0 inside is a real token);
    C = [5, 1] -> 2 = EOS first: response [2, pad, pad, pad], mask [1, 0, 0, 0].
    num_samples = 2 -> rows A, A, B, B, C, C; batch_size = 4 rows -> two generate() calls."""
    tok = tiny_tokenizer()
    ids, mask = left_pad([[10, 11], [100], [5, 1]])
    backend = PlusOneBackend()
    assert isinstance(backend, GenerationBackend)
    extras = [{"answer": "a"}, {"answer": "b"}, {"answer": "c"}]
    r = generate_rollouts(
        backend,
        tok,
        ids,
        mask,
        SamplingParams(4, do_sample=False),
        num_samples=2,
        prompt_texts=["A", "B", "C"],
        extras=extras,
        batch_size=4,
    )
    assert backend.calls == [(4, 2), (2, 2)]
    assert r.prompt_texts == ["A", "A", "B", "B", "C", "C"]
    assert [e["answer"] for e in r.extras] == ["a", "a", "b", "b", "c", "c"]
    assert r.extras[0] is not r.extras[1]  # copies: a reward cannot alias rows
    assert torch.equal(r.prompt_ids, torch.tensor([[10, 11], [10, 11], [0, 100], [0, 100], [5, 1], [5, 1]]))
    assert torch.equal(r.prompt_mask, torch.tensor([[1, 1], [1, 1], [0, 1], [0, 1], [1, 1], [1, 1]]))
    expected_ids = torch.tensor([[12, 13, 14, 15]] * 2 + [[101, 102, 0, 1]] * 2 + [[2, 0, 0, 0]] * 2)
    expected_mask = torch.tensor([[1, 1, 1, 1]] * 4 + [[1, 0, 0, 0]] * 2)
    assert torch.equal(r.response_ids, expected_ids)
    assert torch.equal(r.response_mask, expected_mask)
    assert torch.equal(r.has_eos, torch.tensor([False, False, False, False, True, True]))
    assert torch.equal(r.response_lengths, torch.tensor([4, 4, 4, 4, 1, 1]))
    assert torch.equal(r.input_ids, torch.cat([r.prompt_ids, expected_ids], 1))
    assert torch.equal(r.attention_mask, torch.cat([r.prompt_mask, expected_mask], 1))
    assert len(r) == 6 and r.prompt_length == 2
    # decoded without special tokens: ids 12..15 are characters; the EOS-only response decodes to ""
    assert r.response_texts[0] == tok.decode([12, 13, 14, 15])
    assert r.response_texts[4] == ""
    # response_slice takes columns P .. P+R-1
    full = torch.arange(6 * 6).view(6, 6)
    assert torch.equal(r.response_slice(full), full[:, 2:])
    with pytest.raises(ValueError, match="expects 6 columns"):
        r.response_slice(full[:, :5])


def test_generate_rollouts_chunks_prompts_of_similar_length_and_restores_row_order():
    """Prompts of lengths 5, 1, 5, 1 in chunks of 2 rows: sorted by length, the chunks are [1, 1] (width 1) and
    [5, 5] (width 5) instead of two chunks of width 5; the rows come back in the caller's order."""
    tok = tiny_tokenizer()
    ids, mask = left_pad([[10, 11, 12, 13, 14], [40], [20, 21, 22, 23, 24], [50]])
    backend = PlusOneBackend()
    r = generate_rollouts(backend, tok, ids, mask, SamplingParams(2, do_sample=False), batch_size=2)
    assert backend.calls == [(2, 1), (2, 5)]
    assert torch.equal(r.response_ids, torch.tensor([[15, 16], [41, 42], [25, 26], [51, 52]]))
    assert torch.equal(r.prompt_ids, ids)


def test_generate_rollouts_trims_all_pad_columns_and_decodes_prompts():
    """Both prompts end in id 1 -> the response is EOS at once; of 5 generated columns only 1 is kept.
    prompt_texts default to the decoded prompts (special tokens skipped)."""
    tok = tiny_tokenizer()
    a = tok("hi", add_special_tokens=False)["input_ids"] + [1]
    ids, mask = left_pad([a, [1]])
    r = generate_rollouts(PlusOneBackend(), tok, ids, mask, SamplingParams(5))
    assert torch.equal(r.response_ids, torch.tensor([[2], [2]]))
    assert torch.equal(r.response_mask, torch.tensor([[1], [1]]))
    assert r.prompt_texts == ["hi", ""]
    assert r.extras == [{}, {}]


def test_generate_rollouts_errors():
    tok = tiny_tokenizer()
    ids, mask = left_pad([[10, 11], [12]])
    params = SamplingParams(3)
    with pytest.raises(ValueError, match="LEFT-padded"):
        generate_rollouts(PlusOneBackend(), tok, ids.flip(1), mask.flip(1), params)
    with pytest.raises(ValueError, match="extras has 1 entries for 2 prompts"):
        generate_rollouts(PlusOneBackend(), tok, ids, mask, params, extras=[{}])
    with pytest.raises(ValueError, match="prompt_texts has 3 entries for 2 prompts"):
        generate_rollouts(PlusOneBackend(), tok, ids, mask, params, prompt_texts=["a", "b", "c"])
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        generate_rollouts(PlusOneBackend(), tok, ids, mask, params, num_samples=0)
    with pytest.raises(ValueError, match=r"must both be \[N, P\]"):
        generate_rollouts(PlusOneBackend(), tok, ids, mask[:, :1], params)

    class TooLong(PlusOneBackend):
        def generate(self, prompt_ids, prompt_mask, params, row_seeds=None):
            return torch.zeros(prompt_ids.shape[0], params.max_new_tokens + 1, dtype=torch.long)

    with pytest.raises(ValueError, match=r"TooLong.generate returned shape \(2, 4\)"):
        generate_rollouts(TooLong(), tok, ids, mask, params)


# ---------------------------------------------------------------- HF backend with the tiny Llama
def test_hf_backend_kwargs():
    model, tok = tiny_causal_lm()
    backend = HFGenerateBackend(model, tok)
    kw = backend.generation_kwargs(SamplingParams(9, temperature=0.7, top_p=0.9, top_k=0))
    assert kw == {
        "max_new_tokens": 9,
        "do_sample": True,
        "pad_token_id": 0,
        "eos_token_id": 2,
        "use_cache": True,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": None,
    }
    greedy = backend.generation_kwargs(SamplingParams(9, top_k=4, do_sample=False))
    assert greedy["do_sample"] is False and greedy["top_k"] is None and greedy["temperature"] is None
    tok.pad_token = tok.eos_token
    with pytest.raises(ValueError, match="pad_token_id == eos_token_id"):
        HFGenerateBackend(model, tok)


def test_hf_backend_greedy_equals_manual_argmax_loop_and_uses_kv_cache():
    """Greedy generate() == argmax loop over full forwards; after the first (prompt) forward each
    step feeds ONE new token (KV cache); eval mode during generation, training mode restored."""
    model, tok = varied_lm(1)
    model.train()
    prompt = torch.tensor([tok("abc", add_special_tokens=False)["input_ids"]])  # [1, 3]
    n_new = 6

    seen = []  # (input length, training flag) per forward call
    orig_forward = model.forward

    def spy(*args, **kwargs):
        seen.append((kwargs["input_ids"].shape[1], model.training))
        return orig_forward(*args, **kwargs)

    model.forward = spy
    raw = HFGenerateBackend(model, tok).generate(
        prompt, torch.ones_like(prompt), SamplingParams(n_new, do_sample=False)
    )
    model.forward = orig_forward
    assert model.training  # restored

    manual = prompt
    with torch.no_grad():
        model.eval()
        for _ in range(n_new):
            nxt = model(input_ids=manual).logits[:, -1].argmax(-1, keepdim=True)
            if int(nxt) == EOS:
                break
            manual = torch.cat([manual, nxt], 1)
    expected = manual[:, 3:]
    assert expected.shape[1] >= 3 and len(set(expected[0].tolist())) >= 3  # a non-degenerate comparison
    assert torch.equal(raw[:, : expected.shape[1]], expected)
    assert seen[0] == (3, False)
    assert all(length == 1 and not training for length, training in seen[1:])
    assert len(seen) == raw.shape[1]


def test_hf_backend_left_padding_does_not_change_greedy_output():
    """A prompt generated alone and inside a left-padded batch gives the same greedy tokens."""
    model, tok = varied_lm(2)
    backend = HFGenerateBackend(model, tok)
    short = tok("hi", add_special_tokens=False)["input_ids"]
    long = tok("hello there", add_special_tokens=False)["input_ids"]
    ids, mask = left_pad([long, short])
    params = SamplingParams(5, do_sample=False)
    batched = generate_rollouts(backend, tok, ids, mask, params)
    alone = generate_rollouts(
        backend, tok, torch.tensor([short]), torch.ones(1, len(short), dtype=torch.long), params
    )
    r = alone.response_ids.shape[1]
    assert r >= 3
    assert torch.equal(batched.response_ids[1, :r], alone.response_ids[0])


def test_hf_backend_runs_peft_and_wrapped_models():
    """LoRA (B initialised to 0) generates what the base model generates; a DDP-like `.module` wrapper
    is unwrapped."""
    from peft import LoraConfig, get_peft_model

    model, tok = varied_lm(3)
    prompt = torch.tensor([tok("xy", add_special_tokens=False)["input_ids"]])
    params = SamplingParams(4, do_sample=False)
    base_out = HFGenerateBackend(model, tok).generate(prompt, torch.ones_like(prompt), params)

    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    wrapped = Wrapper(peft_model)
    assert unwrap_for_generation(wrapped) is peft_model
    out = HFGenerateBackend(wrapped, tok).generate(prompt, torch.ones_like(prompt), params)
    assert torch.equal(out, base_out)


def test_sampling_is_reproducible_with_seed_and_respects_top_k_1():
    """top_k = 1 sampling is greedy; with a fixed seed, sampling repeats exactly."""
    model, tok = varied_lm(4)
    backend = HFGenerateBackend(model, tok)
    ids, mask = left_pad([[10, 11, 12], [20]])
    greedy = backend.generate(ids, mask, SamplingParams(5, do_sample=False))
    top1 = backend.generate(ids, mask, SamplingParams(5, temperature=3.0, top_k=1))
    assert torch.equal(top1, greedy)
    torch.manual_seed(0)
    s1 = backend.generate(ids, mask, SamplingParams(5, temperature=1.5))
    torch.manual_seed(0)
    s2 = backend.generate(ids, mask, SamplingParams(5, temperature=1.5))
    assert torch.equal(s1, s2)


# ---------------------------------------------------------------- response log-probs
def make_rollout(prompts: list[list[int]], responses: list[list[int]]) -> Rollout:
    """Left-padded prompts, right-padded responses (mask = real response tokens)."""
    p_ids, p_mask = left_pad(prompts)
    width = max(len(r) for r in responses)
    r_ids = torch.tensor([r + [PAD] * (width - len(r)) for r in responses])
    r_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in responses])
    has_eos = torch.tensor([r[-1] == EOS for r in responses])
    return Rollout(
        p_ids, p_mask, r_ids, r_mask, has_eos, [""] * len(prompts), [""] * len(prompts), [{} for _ in prompts]
    )


def test_response_logprobs_do_not_depend_on_padding():
    """Row 1 (short prompt, short response) is padded on both sides in the batch; alone it has no
    padding. Its log-probs and entropies agree to 1e-5; padded columns are 0."""
    model, _ = varied_lm(5)
    batch = make_rollout([[10, 11, 12, 13, 14], [30, 31]], [[40, 41, 42, 43, 2], [50, 2]])
    alone = make_rollout([[30, 31]], [[50, 2]])
    with torch.no_grad():
        lp_b, ent_b = response_logprobs(model, batch, temperature=1.0, return_entropy=True)
        lp_a, ent_a = response_logprobs(model, alone, temperature=1.0, return_entropy=True)
        lp_mb = response_logprobs(model, batch, temperature=1.0, micro_batch_size=1)
    assert lp_b.shape == (2, 5)
    assert_close(lp_b[1, :2], lp_a[0], atol=1e-5, rtol=0)
    assert_close(ent_b[1, :2], ent_a[0], atol=1e-5, rtol=0)
    assert torch.equal(lp_b[1, 2:], torch.zeros(3)) and torch.equal(ent_b[1, 2:], torch.zeros(3))
    assert_close(lp_mb, lp_b, atol=1e-5, rtol=0)
    assert bool((lp_b[0] < 0).all())  # real tokens: strictly negative log-probs


def test_response_logprobs_temperature_matches_manual_log_softmax():
    """log π_T(y_t) = log_softmax(logits_{t-1} / T)[y_t] for the response tokens of one unpadded row."""
    model, _ = varied_lm(6)
    prompt, response, temp = [10, 11, 12], [20, 21, 2], 0.7
    ro = make_rollout([prompt], [response])
    with torch.no_grad():
        got = response_logprobs(model, ro, temperature=temp)
        logits = model(input_ids=torch.tensor([prompt + response])).logits[0]  # [6, V]
    logp = F.log_softmax(logits / temp, dim=-1)
    expected = torch.stack(
        [logp[2 + i, tok] for i, tok in enumerate(response)]
    )  # token at 3+i predicted at 2+i
    assert_close(got[0], expected, atol=1e-5, rtol=0)
    with torch.no_grad():
        t1 = response_logprobs(model, ro, temperature=1.0)
    assert not torch.allclose(t1, got)  # the temperature is really applied


def test_response_logprobs_gradients_follow_caller():
    model, _ = varied_lm(7)
    ro = make_rollout([[10, 11]], [[12, 2]])
    lp = response_logprobs(model, ro, temperature=1.0)
    assert lp.requires_grad
    lp.sum().backward()
    assert model.get_input_embeddings().weight.grad is not None
    with torch.no_grad():
        assert not response_logprobs(model, ro, temperature=1.0).requires_grad


def test_first_ratio_is_one_on_own_samples():
    """REFERENCES (PPO): recomputing log-probs of sampled tokens with logits / T gives ratio exactly 1
    against the log-probs recomputed the same way (dropout off, same padding)."""
    model, tok = varied_lm(8)
    ids, mask = left_pad([[10, 11, 12], [20]])
    torch.manual_seed(1)
    ro = generate_rollouts(
        HFGenerateBackend(model, tok), tok, ids, mask, SamplingParams(6, temperature=0.8), num_samples=2
    )
    assert ro.response_ids.shape[0] == 4
    with torch.no_grad():
        old = response_logprobs(model, ro, temperature=0.8)
    new = response_logprobs(model, ro, temperature=0.8, micro_batch_size=3)
    ratio = torch.exp(new - old)[ro.response_mask.bool()]
    assert_close(ratio, torch.ones_like(ratio), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- log-probs recorded while sampling
@pytest.mark.parametrize("temperature,top_k,peft", [(0.8, 0, False), (1.3, 5, False), (1.0, 0, True)])
def test_recorded_logprobs_equal_recomputed(temperature, top_k, peft):
    """record_logprobs: the decoding loop's log π_T(y_t) and entropies equal a second forward pass over the
    sampled rows (response_logprobs) to 1e-4, for left-padded prompts of different lengths, chunked, with
    rows finishing at different steps; zero outside the response mask. Top-k sampling still records the
    untruncated softmax (what response_logprobs computes); a LoRA-wrapped model is hooked through peft."""
    model, tok = varied_lm(9)
    if peft:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    ids, mask = left_pad([[10, 11, 12, 13], [20], [30, 31], [40, 41, 42]])
    params = SamplingParams(8, temperature=temperature, top_k=top_k)
    torch.manual_seed(3)
    ro = generate_rollouts(HFGenerateBackend(model, tok), tok, ids, mask, params, num_samples=2, batch_size=3,
                           record_logprobs=True)
    assert ro.logprobs is not None and ro.logprobs.shape == ro.response_ids.shape
    with torch.no_grad():
        lp, ent = response_logprobs(model, ro, temperature=temperature, return_entropy=True)
    assert_close(ro.logprobs, lp, atol=1e-4, rtol=0)
    assert_close(ro.entropy, ent, atol=1e-4, rtol=0)
    outside = ro.response_mask == 0
    assert bool((ro.logprobs[outside] == 0).all()) and bool((ro.entropy[outside] == 0).all())
    assert bool((ro.logprobs[~outside] < 0).all()) and bool((ro.entropy[~outside] > 0).all())
    # the same draw as without recording (the hook only reads)
    torch.manual_seed(3)
    plain = generate_rollouts(HFGenerateBackend(model, tok), tok, ids, mask, params, num_samples=2, batch_size=3)
    assert torch.equal(plain.response_ids, ro.response_ids) and plain.logprobs is None
    sub = ro.select([3, 0])
    assert torch.equal(sub.logprobs, ro.logprobs[[3, 0]]) and torch.equal(sub.entropy, ro.entropy[[3, 0]])


def test_record_logprobs_is_ignored_by_backends_that_cannot():
    """A backend without generate_with_logprobs samples as before and leaves the fields None (callers recompute)."""
    _, tok = varied_lm(1)
    ids, mask = left_pad([[10, 11], [20]])
    ro = generate_rollouts(PlusOneBackend(), tok, ids, mask, SamplingParams(3), record_logprobs=True)
    assert ro.logprobs is None and ro.entropy is None


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 3, 1.0), (1.5, 0, 0.8)])
def test_inverse_cdf_sampling_draws_the_filtered_tempered_softmax(temperature, top_k, top_p):
    """InverseCdfSampling (the sampler behind generate(do_sample=True)): 200k draws of one row have the frequencies
    of softmax(filter(logits / T)) to 0.005; tokens the filter removes (the first one included, the u = 0 edge) are
    never drawn; the output is 0 at the drawn token and -inf elsewhere."""
    from alignkit.rollout.engine import InverseCdfSampling, filter_logits

    logits = torch.tensor([[-5.0, 2.0, 1.0, 0.5, 1.5, -1.0]])
    params = SamplingParams(4, temperature=temperature, top_k=top_k, top_p=top_p)
    want = torch.softmax(filter_logits(logits / temperature, top_k, top_p), -1)[0]
    torch.manual_seed(0)
    out = InverseCdfSampling(params)(torch.zeros(200_000, 1, dtype=torch.long), logits.expand(200_000, -1))
    assert bool(((out == 0).sum(-1) == 1).all()) and bool(torch.isinf(out).sum(-1).eq(5).all())
    freq = torch.bincount(out.argmax(-1), minlength=6).float() / 200_000
    assert_close(freq, want, atol=5e-3, rtol=0)
    assert bool((freq[want == 0] == 0).all())


def test_unseeded_sampling_goes_through_the_inverse_cdf_sampler():
    """generate(do_sample=True) without row seeds draws with InverseCdfSampling: the same torch seed gives the same
    tokens as calling greedy decoding over that processor by hand."""
    from transformers import LogitsProcessorList

    from alignkit.rollout.engine import InverseCdfSampling

    model, tok = varied_lm(11)
    ids, mask = left_pad([[10, 11, 12], [20]])
    params = SamplingParams(6, temperature=1.2)
    torch.manual_seed(5)
    got = HFGenerateBackend(model, tok).generate(ids, mask, params)
    torch.manual_seed(5)
    with torch.no_grad():
        manual = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                pad_token_id=PAD, eos_token_id=EOS, temperature=None, top_p=None, top_k=None,
                                logits_processor=LogitsProcessorList([InverseCdfSampling(params)]))[:, ids.shape[1]:]
    assert torch.equal(got, manual)
