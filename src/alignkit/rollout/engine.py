"""One generation engine for every online method (PPO, GRPO, RLOO, best-of-n, online DPO).

Conventions (REFERENCES, PPO; Huang et al. 2024, "The N+ implementation details of RLHF with PPO"):

- Prompts are LEFT-padded for generation, so every row's new tokens start in the same column.
- Responses are RIGHT-padded: everything after the first EOS is replaced by ``pad`` (pad != eos).
- ``response_mask`` is 1 up to AND INCLUDING the first EOS: the EOS token is part of the action
  sequence and stays in the loss. A row that never emits EOS (``max_new_tokens`` reached) keeps a
  full mask and ``has_eos = False`` (it can get the missing-EOS penalty).
- With ``num_samples = G`` each prompt is repeated G times CONSECUTIVELY (rows p0,p0,..,p1,p1,..):
  group-relative advantages (GRPO, RLOO) reshape scores to [B/G, G].
- Log-probs are recomputed with ``logits / temperature`` (the sampler's distribution), through the
  shared :mod:`alignkit.ops.logprobs` code, with position ids from the attention mask so padding
  never changes a real token's log-prob.

- Row seeds: given ``row_seeds`` [B], row b's sample is a function of ``row_seeds[b]`` alone, never of the
  batch it shares, its padding, or the number of processes (Gumbel-max sampling with per-row noise:
  :class:`RowSeededSampling`). The online harness seeds row (iteration, prompt, sample), so 2 processes x b
  prompts draw exactly the samples of 1 process x 2b prompts, and a resumed run draws what it would have.

The only thing an algorithm needs from a generator is :class:`GenerationBackend`; the engine is chosen in
config (``generation.backend``, :func:`alignkit.rollout.backends.make_backend`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

from alignkit.config import GenerationSection
from alignkit.ops.logprobs import token_logprobs
from alignkit.ops.seeds import derive_seed


# ---------------------------------------------------------------- sampling parameters
@dataclass(frozen=True)
class SamplingParams:
    """How to sample. ``top_k = 0`` disables top-k; ``do_sample = False`` is greedy decoding."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    do_sample: bool = True

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise ValueError(f"SamplingParams.max_new_tokens must be > 0, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ValueError(
                f"SamplingParams.temperature must be > 0, got {self.temperature} "
                "(use do_sample=False for greedy)"
            )
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be >= 0 (0 disables it), got {self.top_k}")

    @classmethod
    def from_section(cls, g: GenerationSection, do_sample: bool = True) -> "SamplingParams":
        return cls(
            max_new_tokens=g.max_new_tokens,
            temperature=g.temperature,
            top_p=g.top_p,
            top_k=g.top_k,
            do_sample=do_sample,
        )


TRUNCATED_SAMPLING_MESSAGE = (
    "sampling with top_p < 1 or top_k > 0: responses are drawn from the truncated (renormalised) "
    "distribution, while the log-probs of the loss are recomputed from the full tempered softmax; the "
    "importance ratio and the KL are therefore taken against the untruncated policy, not against the "
    "distribution the tokens were sampled from (the sampler is slightly off-policy)"
)


def truncated_sampling_note(params: SamplingParams) -> dict[str, float]:
    """Metrics to log when the sampler truncates the distribution (``top_p < 1`` or ``top_k > 0``).

    Returns ``{"sampling/truncated": 1.0, "sampling/top_p": p, "sampling/top_k": k}`` for such runs, ``{}``
    otherwise (full-distribution or greedy sampling). Meaning (:data:`TRUNCATED_SAMPLING_MESSAGE`): the tokens
    come from the truncated distribution, but the log-probs of the loss (hence the importance ratio and the KL)
    are recomputed by the trainer from the full tempered softmax, for either backend.
    """
    if not params.do_sample or (params.top_p >= 1.0 and params.top_k == 0):
        return {}
    return {"sampling/truncated": 1.0, "sampling/top_p": float(params.top_p), "sampling/top_k": float(params.top_k)}


# ---------------------------------------------------------------- backends
@runtime_checkable
class GenerationBackend(Protocol):
    """Generates new tokens for a LEFT-padded batch of prompts.

    ``prompt_ids``/``prompt_mask`` [B, P] -> raw new tokens [B, R], R <= ``params.max_new_tokens``.
    Rows may run past their EOS (they are cleaned by :func:`postprocess_responses`).
    """

    def generate(
        self, prompt_ids: Tensor, prompt_mask: Tensor, params: SamplingParams, row_seeds: Tensor | None = None
    ) -> Tensor: ...

    def update_weights(self, model) -> None:
        """Called after every policy update: an engine holding its own copy of the weights syncs them."""
        ...


# ---------------------------------------------------------------- row-seeded sampling
def filter_logits(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """Top-k then nucleus (top-p) filtering: [B, V] -> [B, V] with removed tokens at -inf (at least one kept)."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # [B, V]
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # [B, V] probability of the tokens ranked above
        drop_sorted = mass_before > top_p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


class RowSeededSampling:
    """A ``transformers`` logits processor that turns greedy decoding into sampling with per-row seeds.

    At decoding step s it returns ``filter(logits / T) + g`` with Gumbel noise ``g = -log(-log u)``,
    ``u ~ U(0, 1)^V`` drawn from a generator seeded by ``derive_seed(row_seeds[b], s)``: the argmax is an
    exact sample of ``softmax(filter(logits / T))`` (the Gumbel-max trick), and it depends on the row's own
    seed only. ``prompt_width`` is the column where the new tokens start.
    """

    def __init__(self, row_seeds: Tensor, prompt_width: int, params: SamplingParams):
        self.row_seeds = [int(s) for s in row_seeds.tolist()]
        self.prompt_width, self.params = prompt_width, params

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        step = input_ids.shape[1] - self.prompt_width
        logits = filter_logits(scores.float() / self.params.temperature, self.params.top_k, self.params.top_p)
        u = torch.empty_like(logits)  # [B, V]
        for b, seed in enumerate(self.row_seeds):
            g = torch.Generator(device=logits.device).manual_seed(derive_seed(seed, step))
            u[b].uniform_(generator=g)
        gumbel = -torch.log(-torch.log(u.clamp_(min=1e-20, max=1.0 - 1e-7)))
        return logits + gumbel


class InverseCdfSampling:
    """A ``transformers`` logits processor that turns greedy decoding into exact sampling from
    ``softmax(filter(logits / T))`` with ONE uniform per row and step (inverse CDF: the first token whose cumulative
    probability exceeds ``u``), drawn from torch's global generator.

    ``generate(do_sample=True)`` draws through ``torch.multinomial``, which makes a full [B, V] tensor of exponential
    noise every step: 15% of a CPU sampling run of the embedded model (49k-token vocabulary, batch 64); this costs a
    cumulative sum instead. It returns 0 at the drawn token and -inf elsewhere, so the greedy argmax picks it."""

    def __init__(self, params: SamplingParams):
        self.params = params

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        logits = filter_logits(scores.float() / self.params.temperature, self.params.top_k, self.params.top_p)
        cdf = torch.softmax(logits, dim=-1).cumsum(dim=-1)  # [B, V]
        u = torch.rand(cdf.shape[0], 1, device=cdf.device) * cdf[:, -1:]  # [B, 1], scaled to the rounded total
        token = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[1] - 1)  # [B, 1]; skips p = 0 tokens
        return torch.full_like(scores, float("-inf")).scatter_(1, token, 0.0)


def unwrap_for_generation(model):
    """Strip distributed / compile wrappers (DDP, DeepSpeed ``.module``, ``torch.compile``'s ``_orig_mod``).

    A peft ``PeftModel`` is kept: its own ``generate`` runs with the adapters active.
    """
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif not hasattr(model, "generate") and isinstance(getattr(model, "module", None), torch.nn.Module):
            model = model.module
        else:
            return model


class HFGenerateBackend:
    """``transformers`` ``generate()`` with the KV cache, in eval mode, under ``torch.no_grad``.

    The model's training/eval mode is restored afterwards. ``top_k = 0`` is passed as ``None``
    (disabled); greedy decoding (``do_sample=False``) passes no sampling knobs at all.
    ``autocast_dtype`` (e.g. ``torch.bfloat16``) samples under ``torch.autocast``: ~1.6x faster on CPUs
    with AVX512-BF16; log-probs for the loss are recomputed by the caller anyway.
    """

    def __init__(self, model, tokenizer, autocast_dtype: torch.dtype | None = None,
                 cache_implementation: str = "dynamic"):
        self.model = model
        self.tokenizer = tokenizer
        self.autocast_dtype = autocast_dtype
        self.cache_implementation = cache_implementation  # generation.cache_implementation
        if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
            raise ValueError(
                "HFGenerateBackend needs a tokenizer with both pad_token_id and eos_token_id set"
            )
        if tokenizer.pad_token_id == tokenizer.eos_token_id:
            raise ValueError(
                f"pad_token_id == eos_token_id ({tokenizer.eos_token_id}): EOS would be masked out with the "
                "padding (REFERENCES, PPO: pad != eos). "
                "Load the tokenizer with alignkit.models.loading.load_tokenizer."
            )

    def generation_kwargs(self, params: SamplingParams) -> dict:
        kwargs = {
            "max_new_tokens": params.max_new_tokens,
            "do_sample": params.do_sample,
            "pad_token_id": self.tokenizer.pad_token_id,
            "eos_token_id": self.tokenizer.eos_token_id,
            "use_cache": True,
        }
        if self.cache_implementation != "dynamic":  # "static": a preallocated [B, heads, P + R, d] cache
            kwargs["cache_implementation"] = self.cache_implementation
        if params.do_sample:
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or None)
        else:  # override sampling defaults a checkpoint's generation_config may carry (avoids HF warnings)
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs

    def generate(
        self, prompt_ids: Tensor, prompt_mask: Tensor, params: SamplingParams, row_seeds: Tensor | None = None
    ) -> Tensor:
        from transformers import LogitsProcessorList

        model = unwrap_for_generation(self.model)
        was_training = model.training
        model.eval()
        device_type = next(model.parameters()).device.type
        kwargs = self.generation_kwargs(params)
        if params.do_sample:  # greedy over a processor that samples: per-row seeds, or one uniform per row
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            sampler = InverseCdfSampling(params) if row_seeds is None else \
                RowSeededSampling(row_seeds, prompt_ids.shape[1], params)
            kwargs["logits_processor"] = LogitsProcessorList([sampler])
        try:
            with torch.no_grad(), torch.autocast(device_type, dtype=self.autocast_dtype,
                                                 enabled=self.autocast_dtype is not None):
                out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, **kwargs)  # [B, P + R]
        finally:
            model.train(was_training)
        if not isinstance(out, Tensor):
            out = out.sequences
        return out[:, prompt_ids.shape[1] :]  # [B, R]

    def generate_with_logprobs(
        self, prompt_ids: Tensor, prompt_mask: Tensor, params: SamplingParams, row_seeds: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`generate`, plus log π(y_t) and the entropy of every new token's step, read from the logits the
        decoding loop computes anyway (:class:`StepRecorder`): ``(raw [B, R], logprobs [B, R], entropy [B, R])``
        of the full softmax at ``params.temperature`` — what :func:`response_logprobs` recomputes with a second
        forward pass, equal up to float rounding (KV-cached vs. full-sequence matmuls)."""
        recorder = StepRecorder(params.temperature)
        handle = _generating_module(unwrap_for_generation(self.model)).register_forward_hook(recorder, with_kwargs=True)
        try:
            raw = self.generate(prompt_ids, prompt_mask, params, row_seeds)  # [B, R]
        finally:
            handle.remove()
        logprobs, entropy = recorder.result(raw)
        return raw, logprobs, entropy

    def update_weights(self, model) -> None:
        """Nothing to sync: ``generate`` runs the live training model."""


def _generating_module(model):
    """The ``transformers`` model whose ``forward`` the decoding loop calls (inside a peft wrapper)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class StepRecorder:
    """A forward hook on the model during ``generate``: the log-prob of each sampled token and the entropy of
    each step's distribution, softmax(logits / T) (untruncated, like :func:`response_logprobs`).

    Forward call k returns the logits of new token k [B, V]; the token chosen from them is the input of call
    k + 1 (``input_ids[:, -1]``), and the last one is read from the returned ids by :meth:`result`. Only a
    [B, V] row of log-probs is held between calls."""

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.pending: Tensor | None = None  # [B, V] log-probs of the step whose token is not known yet
        self.logprobs: list[Tensor] = []  # R x [B]
        self.entropy: list[Tensor] = []  # R x [B]

    def __call__(self, module, args, kwargs, output) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if self.pending is not None:
            self.logprobs.append(self.pending.gather(-1, ids[:, -1:]).squeeze(-1))  # [B]
        logits = output.logits if hasattr(output, "logits") else output[0]
        logp = torch.log_softmax(logits[:, -1].float() / self.temperature, dim=-1)  # [B, V]
        self.entropy.append(-(logp.exp() * logp).sum(-1))  # [B]
        self.pending = logp

    def result(self, raw: Tensor) -> tuple[Tensor, Tensor]:
        """(logprobs [B, R], entropy [B, R]) of the R tokens of ``raw`` [B, R]."""
        if self.pending is not None:
            self.logprobs.append(self.pending.gather(-1, raw[:, -1:].to(self.pending.device)).squeeze(-1))
            self.pending = None
        r = raw.shape[1]
        if len(self.logprobs) != r or len(self.entropy) != r:
            raise RuntimeError(f"StepRecorder saw {len(self.entropy)} decoding steps for {r} new tokens")
        return torch.stack(self.logprobs, 1), torch.stack(self.entropy, 1)  # [B, R] each


# ---------------------------------------------------------------- rollout batch
@dataclass
class Rollout:
    """A batch of prompts and their sampled responses (row layout group-contiguous for G > 1)."""

    prompt_ids: Tensor  # [B, P] left-padded
    prompt_mask: Tensor  # [B, P]
    response_ids: Tensor  # [B, R] right-padded after the first EOS
    response_mask: Tensor  # [B, R] 1 up to and including the first EOS
    has_eos: Tensor  # [B] bool
    prompt_texts: list[str]
    response_texts: list[str]
    extras: list[dict] = field(default_factory=list)
    logprobs: Tensor | None = None
    """[B, R] log π(y_t) at the sampling temperature, recorded while sampling (``record_logprobs``), 0 outside
    ``response_mask``; None when not recorded."""
    entropy: Tensor | None = None
    """[B, R] entropy of each step's distribution, recorded with ``logprobs``."""

    @property
    def input_ids(self) -> Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)  # [B, P + R]

    @property
    def attention_mask(self) -> Tensor:
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)  # [B, P + R]

    @property
    def response_lengths(self) -> Tensor:
        return self.response_mask.sum(1)  # [B]

    @property
    def prompt_length(self) -> int:
        return self.prompt_ids.shape[1]

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    def select(self, rows: Tensor | list[int]) -> "Rollout":
        """The rows ``rows``, in that order (same columns, so padding and log-probs are unchanged)."""
        idx = rows.tolist() if isinstance(rows, Tensor) else list(rows)
        inds = torch.tensor(idx, dtype=torch.long, device=self.prompt_ids.device)
        return Rollout(
            prompt_ids=self.prompt_ids[inds], prompt_mask=self.prompt_mask[inds],
            response_ids=self.response_ids[inds], response_mask=self.response_mask[inds],
            has_eos=self.has_eos[inds], prompt_texts=[self.prompt_texts[i] for i in idx],
            response_texts=[self.response_texts[i] for i in idx],
            extras=[self.extras[i] for i in idx] if self.extras else [],
            logprobs=None if self.logprobs is None else self.logprobs[inds],
            entropy=None if self.entropy is None else self.entropy[inds],
        )

    def response_slice(self, token_values_full: Tensor) -> Tensor:
        """[B, P + R] values aligned to ``input_ids`` -> [B, R] values of the response tokens."""
        p, r = self.prompt_ids.shape[1], self.response_ids.shape[1]
        if token_values_full.shape[1] != p + r:
            raise ValueError(
                f"response_slice expects {p + r} columns (prompt {p} + response {r}), "
                f"got {token_values_full.shape[1]}"
            )
        return token_values_full[:, p : p + r]


def postprocess_responses(raw: Tensor, eos_token_id: int, pad_token_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Cut raw generations at the first EOS.

    raw [B, R] -> (response_ids [B, R], response_mask [B, R] long, has_eos [B] bool), with
    ``mask[b, t] = 1`` iff ``t <= first_eos[b]`` (EOS kept in the mask; REFERENCES, PPO) and every
    token after the first EOS replaced by ``pad``. Rows without EOS keep all R tokens.
    """
    is_eos = raw == eos_token_id  # [B, R]
    has_eos = is_eos.any(dim=1)  # [B]
    r = raw.shape[1]
    first_eos = torch.where(
        has_eos, is_eos.long().argmax(dim=1), torch.full_like(has_eos, r - 1, dtype=torch.long)
    )
    positions = torch.arange(r, device=raw.device).unsqueeze(0)  # [1, R]
    response_mask = (positions <= first_eos.unsqueeze(1)).long()  # [B, R]
    response_ids = raw.masked_fill(response_mask == 0, pad_token_id)
    return response_ids, response_mask, has_eos


def _pad_right(chunks: list[Tensor], value: int) -> Tensor:
    width = max(c.shape[1] for c in chunks)
    return torch.cat([F.pad(c, (0, width - c.shape[1]), value=value) for c in chunks], dim=0)


def generate_rollouts(
    backend: GenerationBackend,
    tokenizer,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    params: SamplingParams,
    num_samples: int = 1,
    prompt_texts: list[str] | None = None,
    extras: list[dict] | None = None,
    batch_size: int | None = None,
    prompt_seeds: list[int] | None = None,
    record_logprobs: bool = False,
) -> Rollout:
    """Sample ``num_samples`` responses per prompt.

    ``prompt_ids``/``prompt_mask`` [N, P] are LEFT-padded. Each prompt row is repeated ``num_samples``
    times consecutively (rows p0,p0,..,p1,p1,..), so the result has B = N * num_samples rows and
    ``scores.view(N, num_samples)`` groups the samples of one prompt. ``prompt_texts`` (default: the
    decoded prompts) and ``extras`` (default: ``{}``) are repeated the same way. Generation runs in
    chunks of ``batch_size`` rows of the repeated batch (all at once when None). Trailing columns
    that are padding in every row are dropped, so R = the longest response.
    ``prompt_seeds`` [N]: sample j of prompt i is drawn with row seed ``derive_seed(prompt_seeds[i], j)``
    (independent of batching); None samples from torch's global generator.
    ``record_logprobs``: fill ``Rollout.logprobs`` / ``Rollout.entropy`` from the decoding loop's own logits when
    the backend can (``generate_with_logprobs``; they stay None otherwise, and callers recompute them).
    """
    if prompt_ids.shape != prompt_mask.shape or prompt_ids.dim() != 2:
        raise ValueError(
            f"prompt_ids and prompt_mask must both be [N, P]; "
            f"got {tuple(prompt_ids.shape)} and {tuple(prompt_mask.shape)}"
        )
    n = prompt_ids.shape[0]
    if n == 0:
        raise ValueError("generate_rollouts got an empty batch of prompts")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
    if bool((prompt_mask[:, -1] == 0).any()):
        raise ValueError("prompts must be LEFT-padded for generation (a row's last prompt column is padding)")
    if prompt_texts is None:
        prompt_texts = tokenizer.batch_decode(
            [ids[m.bool()] for ids, m in zip(prompt_ids, prompt_mask)], skip_special_tokens=True
        )
    if len(prompt_texts) != n:
        raise ValueError(f"prompt_texts has {len(prompt_texts)} entries for {n} prompts")
    if extras is None:
        extras = [{} for _ in range(n)]
    if len(extras) != n:
        raise ValueError(f"extras has {len(extras)} entries for {n} prompts")
    row_seeds = None
    if prompt_seeds is not None:
        if len(prompt_seeds) != n:
            raise ValueError(f"prompt_seeds has {len(prompt_seeds)} entries for {n} prompts")
        row_seeds = torch.tensor([derive_seed(s, j) for s in prompt_seeds for j in range(num_samples)], dtype=torch.long)

    prompt_ids = prompt_ids.repeat_interleave(num_samples, dim=0)  # [B, P], B = N * G
    prompt_mask = prompt_mask.repeat_interleave(num_samples, dim=0)  # [B, P]
    rep_texts = [t for t in prompt_texts for _ in range(num_samples)]
    rep_extras = [dict(e) for e in extras for _ in range(num_samples)]

    b = prompt_ids.shape[0]
    step = b if batch_size is None else batch_size
    # chunks of similar prompt length waste less on padding; stable, so a prompt's samples stay together,
    # and with row seeds the samples do not depend on which chunk a row lands in
    order = torch.argsort(prompt_mask.sum(1), stable=True) if step < b else torch.arange(b)  # [B]
    record = record_logprobs and hasattr(backend, "generate_with_logprobs")
    raw_chunks, logp_chunks, ent_chunks = [], [], []
    for start in range(0, b, step):
        rows = order[start : start + step]
        ids, mask = prompt_ids[rows], prompt_mask[rows]
        first_col = int(mask.any(dim=0).long().argmax())  # drop columns that are padding in every row
        seeds = None if row_seeds is None else row_seeds[rows]
        args = (ids[:, first_col:], mask[:, first_col:], params) + (() if seeds is None else (seeds,))
        if record:
            raw, logp, ent = backend.generate_with_logprobs(*args)  # [b, r] each
            logp_chunks.append(logp.to(prompt_ids.device))
            ent_chunks.append(ent.to(prompt_ids.device))
        else:
            raw = backend.generate(*args)  # [b, r]
        if raw.dim() != 2 or raw.shape[0] != ids.shape[0] or raw.shape[1] > params.max_new_tokens:
            raise ValueError(
                f"backend {type(backend).__name__}.generate returned shape {tuple(raw.shape)}; expected "
                f"[{ids.shape[0]}, <= {params.max_new_tokens}]"
            )
        raw_chunks.append(raw.to(prompt_ids.device))
    raw = _pad_right(raw_chunks, tokenizer.pad_token_id)[torch.argsort(order)]  # [B, R] back in row order

    response_ids, response_mask, has_eos = postprocess_responses(
        raw, tokenizer.eos_token_id, tokenizer.pad_token_id
    )
    width = int(response_mask.sum(1).max())
    response_ids, response_mask = response_ids[:, :width], response_mask[:, :width]
    response_texts = tokenizer.batch_decode(
        [ids[m.bool()] for ids, m in zip(response_ids, response_mask)], skip_special_tokens=True
    )
    recorded = {}
    if record:
        back, outside = torch.argsort(order), response_mask == 0
        recorded = {k: _pad_right(chunks, 0)[back][:, :width].masked_fill(outside, 0.0)  # [B, R]
                    for k, chunks in (("logprobs", logp_chunks), ("entropy", ent_chunks))}
    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=response_ids,
        response_mask=response_mask,
        has_eos=has_eos,
        prompt_texts=rep_texts,
        response_texts=response_texts,
        extras=rep_extras,
        **recorded,
    )


# ---------------------------------------------------------------- log-probs
def response_logprobs(
    model,
    rollout: Rollout,
    temperature: float,
    return_entropy: bool = False,
    micro_batch_size: int | None = None,
    hidden: torch.Tensor | None = None,
    hidden_layers: int = 0,
):
    """log π(y_t | x, y_<t) of each response token, from log_softmax(logits / temperature).

    Returns [B, R] (and the entropy [B, R] if ``return_entropy``), zero outside ``response_mask``.
    Computed on ``rollout.input_ids`` with padding-aware position ids, so a row's values do not
    depend on how much the batch pads it. Gradients flow unless the caller uses ``torch.no_grad()``.
    ``hidden`` [B, P + R, d]: the rows' states entering decoder layer ``hidden_layers`` (``ops.prefix``); only the
    layers after it run.
    """
    input_ids, attention_mask = rollout.input_ids, rollout.attention_mask  # [B, P + R]
    b = input_ids.shape[0]
    step = b if micro_batch_size is None else micro_batch_size
    logps_chunks, ent_chunks = [], []
    for start in range(0, b, step):
        out = token_logprobs(
            model,
            input_ids[start : start + step],
            attention_mask[start : start + step],
            temperature=temperature,
            return_entropy=return_entropy,
            first_index=rollout.prompt_length,  # the LM head skips prompt positions
            hidden=None if hidden is None else hidden[start : start + step],
            hidden_layers=hidden_layers,
        )
        if return_entropy:
            logps_chunks.append(out[0])
            ent_chunks.append(out[1])
        else:
            logps_chunks.append(out)
    outside = rollout.response_mask.to(logps_chunks[0].device) == 0  # [B, R]
    logprobs = rollout.response_slice(torch.cat(logps_chunks, 0)).masked_fill(outside, 0.0)  # [B, R]
    if not return_entropy:
        return logprobs
    entropy = rollout.response_slice(torch.cat(ent_chunks, 0)).masked_fill(outside, 0.0)  # [B, R]
    return logprobs, entropy
