"""Did alignment work? Sample a policy on held-out prompts and measure gold reward, proxy reward and KL.

- gold: a trusted score of the text (VADER in the quickstart), mean ± standard error;
- proxy: the learned reward model's score (what the optimiser saw);
- KL(pi || pi_ref) estimated from the policy's own samples as the mean of the summed
  log-ratio sum_t [log pi(y_t|.) - log pi_ref(y_t|.)] (the unbiased k1 estimator, Schulman 2020),
  at temperature 1 — the x-axis of the DPO paper's reward-vs-KL frontier.

Sampling, scoring and the KL each show a tqdm progress bar (on stderr): on a CPU each takes a minute or more.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from alignkit.config import GenerationSection
from alignkit.ops.logprobs import final_states, head_kl_exact, plain_lm_head
from alignkit.ops.prefix import prefix_states, shared_prefix_layers
from alignkit.rollout.backends import make_backend
from alignkit.rollout.engine import Rollout, SamplingParams, generate_rollouts, response_logprobs
from alignkit.rollout.prompts import prompt_batch


def progress(total: int, desc: str | None, unit: str = "row"):
    """A tqdm bar on stderr, shown in logs too (not only on a terminal); none when ``desc`` is None."""
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, disable=desc is None)


def scores_in_chunks(fn, columns: list[list], chunk: int, desc: str) -> list[float]:
    """``fn(*column_chunks)`` over consecutive chunks of the (equal-length) ``columns``, with a progress bar:
    [float] for every row, in order."""
    n = len(columns[0])
    out: list[float] = []
    with progress(n, desc) as bar:
        for start in range(0, n, chunk):
            out += [float(x) for x in fn(*(c[start : start + chunk] for c in columns))]
            bar.update(min(chunk, n - start))
    return out


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
    kl_n: int | None = None
    """Sampled responses the KL estimate averages over (None: not estimated from samples, e.g. analytic)."""
    kl_estimator: str | None = None
    """``exact`` or ``k1`` (``sequence_kl``); None where the KL is not estimated from samples."""
    response_length: float = 0.0
    no_eos_frac: float = 0.0
    samples: list[dict] = field(default_factory=list)

    def row(self) -> dict:
        d = asdict(self)
        d.pop("samples")
        return d


class _ProgressBackend:
    """A generation backend that advances a progress bar by the rows of each ``generate`` call."""

    def __init__(self, backend, bar):
        self.backend, self.bar = backend, bar
        if hasattr(backend, "generate_with_logprobs"):  # only where the engine can record them
            self.generate_with_logprobs = self._generate_with_logprobs

    def _call(self, method, prompt_ids, prompt_mask, params, row_seeds=None):
        args = (prompt_ids, prompt_mask, params) + (() if row_seeds is None else (row_seeds,))
        out = method(*args)
        self.bar.update(prompt_ids.shape[0])
        return out

    def generate(self, *args):
        return self._call(self.backend.generate, *args)

    def _generate_with_logprobs(self, *args):
        return self._call(self.backend.generate_with_logprobs, *args)

    def update_weights(self, model) -> None:
        self.backend.update_weights(model)


@torch.no_grad()
def sample(model, tokenizer, prompts: list[dict], params: SamplingParams, num_samples: int, batch_size: int,
           seed: int, autocast_dtype: torch.dtype | None = None, desc: str = "sample", backend: str = "hf",
           record_logprobs: bool = False) -> Rollout:
    """``num_samples`` responses per prompt (rows prompt-major), drawn after ``torch.manual_seed(seed)`` with the
    engine ``backend`` names (``generation.backend``); ``record_logprobs``: with the log-probs and entropies of
    the decoding loop (``generate_rollouts``)."""
    torch.manual_seed(seed)
    batch = prompt_batch(prompts, tokenizer.pad_token_id)
    with progress(len(prompts) * num_samples, desc) as bar:
        engine = _ProgressBackend(make_backend(GenerationSection(backend=backend), model, tokenizer, autocast_dtype), bar)
        return generate_rollouts(
            engine, tokenizer, batch["input_ids"], batch["attention_mask"], params, num_samples=num_samples,
            prompt_texts=batch["prompt_texts"], extras=batch["extras"], batch_size=batch_size,
            record_logprobs=record_logprobs,
        )


@torch.no_grad()
def logprobs_with_reference(policy, reference, rows: Rollout, temperature: float = 1.0,
                            micro_batch_size: int | None = None, entropy: bool = False, reference_ctx=None):
    """log pi and log pi_ref of every response token ([B, R] each; and pi's entropy [B, R] if ``entropy``, else None).

    Leading layers whose weights the two models share (LoRA on the last layers, merged or not) run once
    (``ops.prefix``); not under a ``reference_ctx``, which may change what those layers compute."""
    shared = shared_prefix_layers(policy, reference) if reference_ctx is None else 0
    hidden = prefix_states(policy, rows.input_ids, rows.attention_mask, shared, micro_batch_size) if shared else None
    out = response_logprobs(policy, rows, temperature, return_entropy=entropy, micro_batch_size=micro_batch_size,
                            hidden=hidden, hidden_layers=shared)
    logp, ent = out if entropy else (out, None)
    with reference_ctx() if reference_ctx is not None else contextlib.nullcontext():
        ref = response_logprobs(reference, rows, temperature, micro_batch_size=micro_batch_size, hidden=hidden,
                                hidden_layers=shared)
    return logp, ent, ref


@torch.no_grad()
def sequence_kl(policy, reference, rollout: Rollout, temperature: float = 1.0, micro_batch_size: int = 16,
                reference_ctx=None, desc: str | None = None, estimator: str = "exact") -> torch.Tensor:
    """[B] KL(pi || pi_ref) of each sampled response, estimated on its tokens; a progress bar when ``desc`` is given.

    ``estimator``: ``exact`` sums KL(pi(.|prefix) || pi_ref(.|prefix)) over the whole vocabulary at every response
    prefix (``ops.kl.kl_exact``: same expectation as k1, lower variance, no extra forward); ``k1`` sums
    log pi - log pi_ref of the sampled tokens. ``exact`` needs plain linear LM heads and uses k1 otherwise."""
    exact = kl_estimator_for(policy, reference, estimator) == "exact"
    out = []
    with progress(len(rollout), desc) as bar:
        for start in range(0, len(rollout), micro_batch_size):
            rows = rollout.select(list(range(start, min(start + micro_batch_size, len(rollout)))))
            if exact:
                kl = _exact_token_kl(policy, reference, rows, temperature, reference_ctx)  # [b, R]
            else:
                logp, _, ref = logprobs_with_reference(policy, reference, rows, temperature, micro_batch_size,
                                                       reference_ctx=reference_ctx)  # [b, R] each
                kl = logp - ref
            out.append((kl * rows.response_mask).sum(-1))  # [b]
            bar.update(len(rows))
    return torch.cat(out)  # [B]


def kl_estimator_for(policy, reference, estimator: str) -> str:
    """The estimator ``sequence_kl`` uses for ``estimator`` on these models: ``exact`` needs plain LM heads."""
    if estimator not in ("exact", "k1"):
        raise ValueError(f"KL estimator must be 'exact' or 'k1', got {estimator!r}")
    plain = plain_lm_head(policy) is not None and plain_lm_head(reference) is not None
    return "exact" if estimator == "exact" and plain else "k1"


def _exact_token_kl(policy, reference, rows: Rollout, temperature: float, reference_ctx=None) -> torch.Tensor:
    """[b, R]: KL(pi(.|prefix) || pi_ref(.|prefix)) at each response token's prefix (shared leading layers run once)."""
    shared = shared_prefix_layers(policy, reference) if reference_ctx is None else 0
    ids, mask, first = rows.input_ids, rows.attention_mask, rows.prompt_length
    hidden = prefix_states(policy, ids, mask, shared) if shared else None
    states = final_states(policy, ids, mask, first, hidden, shared)  # [b, R, d]
    with reference_ctx() if reference_ctx is not None else contextlib.nullcontext():
        ref_states = final_states(reference, ids, mask, first, hidden, shared)  # [b, R, d]
    return head_kl_exact(states, plain_lm_head(policy), ref_states, plain_lm_head(reference), temperature)


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
    kl_estimator: str = "exact",
) -> tuple[PolicyEval, Rollout]:
    """Sample (unless ``rollout`` is given), then score with gold/proxy and estimate KL to ``reference``.

    ``autocast_dtype`` applies to sampling only; the KL is computed from fp32 log-probs of both models, on the
    first ``kl_samples`` samples of every prompt (all when None): two full forwards per row are the
    evaluation's largest cost, and fewer rows only widen the KL's standard error. ``kl_estimator``: see
    ``sequence_kl`` (``exact``: the whole next-token distributions, the default)."""
    if rollout is None:
        rollout = sample(model, tokenizer, prompts, params, num_samples, batch_size, seed, autocast_dtype,
                         desc=f"{name}: sample")
    gold = scores_in_chunks(gold_fn, [rollout.response_texts], batch_size, f"{name}: gold")
    g_mean, g_se = mean_se(gold)
    result = PolicyEval(
        name, g_mean, g_se,
        response_length=float(rollout.response_lengths.float().mean()),
        no_eos_frac=float((~rollout.has_eos).float().mean()),
    )
    proxy = None
    if proxy_fn is not None:
        proxy = scores_in_chunks(proxy_fn, [rollout.prompt_texts, rollout.response_texts, rollout.extras], batch_size,
                                 f"{name}: proxy")
        result.proxy_mean, result.proxy_se = mean_se(proxy)
    if reference is not None:
        rows = rollout
        if kl_samples is not None and kl_samples < num_samples:  # rows are prompt-major: p0 x G, p1 x G, ...
            rows = rollout.select(torch.nonzero(torch.arange(len(rollout)) % num_samples < kl_samples).flatten())
        kl = sequence_kl(model, reference, rows, params.temperature, desc=f"{name}: KL", estimator=kl_estimator)
        kl = kl.tolist()
        result.kl_estimator = kl_estimator_for(model, reference, kl_estimator)
        result.kl_mean, result.kl_se = mean_se(kl)
        result.kl_n = len(kl)
    lengths, has_eos = rollout.response_lengths.tolist(), rollout.has_eos.tolist()
    for i, (p, r) in enumerate(zip(rollout.prompt_texts, rollout.response_texts)):
        s = {"prompt": p, "response": r, "gold": gold[i], "length": int(lengths[i]), "eos": bool(has_eos[i])}
        if proxy is not None:
            s["proxy"] = proxy[i]
        result.samples.append(s)
    return result, rollout
