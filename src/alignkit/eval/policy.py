"""Did alignment work? Sample a policy on held-out prompts and measure gold reward, proxy reward and KL.

- gold: a trusted score of the text (VADER in the quickstart), mean ± standard error;
- proxy: the learned reward model's score (what the optimiser saw);
- KL(pi || pi_ref) estimated from the policy's own samples as the mean of the summed
  log-ratio sum_t [log pi(y_t|.) - log pi_ref(y_t|.)] (the unbiased k1 estimator, Schulman 2020),
  at temperature 1 — the x-axis of the DPO paper's reward-vs-KL frontier.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from alignkit.rollout.engine import HFGenerateBackend, Rollout, SamplingParams, generate_rollouts, response_logprobs
from alignkit.rollout.prompts import prompt_batch


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n == 1:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def paired_difference(a: list[dict], b: list[dict], key: str = "gold") -> tuple[float, float, int]:
    """Mean ± s.e. of (a - b) paired by prompt: each prompt's mean ``key`` under a minus under b.

    Prompts are the sampling unit, so the prompt-to-prompt variance (some subjects are simply more
    positive) cancels; policies may draw different numbers of samples per prompt. Returns
    (mean, se, number of prompts both evaluated).
    """
    def per_prompt(samples: list[dict]) -> dict[str, float]:
        sums: dict[str, list[float]] = {}
        for s in samples:
            sums.setdefault(s["prompt"], []).append(float(s[key]))
        return {p: sum(v) / len(v) for p, v in sums.items()}

    pa, pb = per_prompt(a), per_prompt(b)
    diffs = [pa[p] - pb[p] for p in pa if p in pb]
    mean, se = mean_se(diffs)
    return mean, se, len(diffs)


@dataclass
class PolicyEval:
    name: str
    gold_mean: float
    gold_se: float
    proxy_mean: float | None = None
    proxy_se: float | None = None
    kl_mean: float | None = None
    kl_se: float | None = None
    response_length: float = 0.0
    no_eos_frac: float = 0.0
    samples: list[dict] = field(default_factory=list)

    def row(self) -> dict:
        d = asdict(self)
        d.pop("samples")
        return d


@torch.no_grad()
def sample(model, tokenizer, prompts: list[dict], params: SamplingParams, num_samples: int, batch_size: int,
           seed: int, autocast_dtype: torch.dtype | None = None) -> Rollout:
    torch.manual_seed(seed)
    batch = prompt_batch(prompts, tokenizer.pad_token_id)
    return generate_rollouts(
        HFGenerateBackend(model, tokenizer, autocast_dtype), tokenizer, batch["input_ids"], batch["attention_mask"], params,
        num_samples=num_samples, prompt_texts=batch["prompt_texts"], extras=batch["extras"], batch_size=batch_size,
    )


@torch.no_grad()
def sequence_kl(policy, reference, rollout: Rollout, temperature: float = 1.0, micro_batch_size: int = 16,
                reference_ctx=None) -> torch.Tensor:
    """[B] summed log pi - log pi_ref over each sampled response (k1)."""
    logp = response_logprobs(policy, rollout, temperature, micro_batch_size=micro_batch_size)  # [B, R]
    if reference_ctx is not None:
        with reference_ctx():
            ref = response_logprobs(reference, rollout, temperature, micro_batch_size=micro_batch_size)
    else:
        ref = response_logprobs(reference, rollout, temperature, micro_batch_size=micro_batch_size)
    return ((logp - ref) * rollout.response_mask).sum(-1)


def evaluate_policy(
    name: str,
    model,
    tokenizer,
    prompts: list[dict],
    gold_fn,
    params: SamplingParams,
    num_samples: int = 1,
    proxy_fn=None,
    reference=None,
    batch_size: int = 32,
    seed: int = 0,
    rollout: Rollout | None = None,
    autocast_dtype: torch.dtype | None = None,
    kl_samples: int | None = None,
) -> tuple[PolicyEval, Rollout]:
    """Sample (unless ``rollout`` is given), then score with gold/proxy and estimate KL to ``reference``.

    ``autocast_dtype`` applies to sampling only; the KL is computed from fp32 log-probs of both models, on the
    first ``kl_samples`` samples of every prompt (all when None): two full forwards per row are the
    evaluation's largest cost, and fewer rows only widen the KL's standard error."""
    if rollout is None:
        rollout = sample(model, tokenizer, prompts, params, num_samples, batch_size, seed, autocast_dtype)
    gold = [float(x) for x in gold_fn(rollout.response_texts)]
    g_mean, g_se = mean_se(gold)
    result = PolicyEval(
        name, g_mean, g_se,
        response_length=float(rollout.response_lengths.float().mean()),
        no_eos_frac=float((~rollout.has_eos).float().mean()),
    )
    proxy = None
    if proxy_fn is not None:
        proxy = [float(x) for x in proxy_fn(rollout.prompt_texts, rollout.response_texts, rollout.extras)]
        result.proxy_mean, result.proxy_se = mean_se(proxy)
    if reference is not None:
        rows = rollout
        if kl_samples is not None and kl_samples < num_samples:  # rows are prompt-major: p0 x G, p1 x G, ...
            rows = rollout.select(torch.nonzero(torch.arange(len(rollout)) % num_samples < kl_samples).flatten())
        kl = sequence_kl(model, reference, rows, params.temperature).tolist()
        result.kl_mean, result.kl_se = mean_se(kl)
    lengths, has_eos = rollout.response_lengths.tolist(), rollout.has_eos.tolist()
    for i, (p, r) in enumerate(zip(rollout.prompt_texts, rollout.response_texts)):
        s = {"prompt": p, "response": r, "gold": gold[i], "length": int(lengths[i]), "eos": bool(has_eos[i])}
        if proxy is not None:
            s["proxy"] = proxy[i]
        result.samples.append(s)
    return result, rollout
