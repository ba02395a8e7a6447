"""The per-policy probes of ``alignkit eval`` — sycophancy, refusal / over-refusal, alignment tax — run with as few
model calls as possible, timed per section, and cached per policy.

Model calls of one policy (greedy; ``make_generate`` sorts conversations by length, batches of ``batch_size``):

1. ONE generate at ``short_tokens`` for every single-turn short-answer probe: the sycophancy questions, the same
   questions under the stated wrong opinion, and the held-out arithmetic task;
2. ONE generate at ``short_tokens`` for the pushback turn (it needs the first answers);
3. ONE generate at ``refusal_tokens`` for the refusal prompts (the rule detector reads the first
   ``eval.refusal.LEAD_CHARS`` = 160 characters, about 35 tokens);
4. ONE pass over the HHH pairs, each prompt run once for both replies (``eval.tax.pair_logprobs``: its KV cache is
   repeated for the two replies), and ONE padded pass over the perplexity paragraphs.

**Cache.** The probe results depend only on the weights, the tokenizer and the probe settings, not on the prompt
set of the win rates. They are stored as JSON under ``$ALIGNKIT_CACHE/eval_probes/<key>.json`` (``probe_cache_dir``
to move it), ``key`` = sha256 of the weights fingerprint (:func:`weights_fingerprint`, every tensor's bytes) and of
the probe plan (items, token budgets, batch size, detector, tokenizer, :data:`PROBE_VERSION`). A re-run, or a later
eval of the same checkpoint, reads them instead of running the model; a changed weight or setting misses.
``probe_cache=false`` turns the cache off.
"""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from alignkit.config import DataConfig
from alignkit.data.tokenize import tokenize_prompts
from alignkit.eval.overrefusal import refusal_rates
from alignkit.eval.policy import sample
from alignkit.eval.sycophancy import first_turns, pushback_turns, score_sycophancy
from alignkit.eval.tax import hhh_accuracy, perplexity, task_conversations, task_score
from alignkit.io_utils import atomic_write_json
from alignkit.rollout.engine import SamplingParams

PROBE_VERSION = 4
"""Bump when a probe's procedure changes what it measures: older cache entries then miss."""
HHH_PAIRS_PER_BATCH = 8
"""Pairs per shared-prefix HHH pass: 16 reply rows, their fp32 logits 16 × reply length × vocabulary × 4 bytes
(≈ 0.4 GB for 130 tokens of the 49k-token embedded vocabulary)."""


class SectionClock:
    """Wall-clock seconds per named section, summed over repeated entries: ``with clock("sample"): ...``;
    ``clock.seconds`` maps section -> seconds, in first-entry order."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, section: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[section] = self.seconds.get(section, 0.0) + time.perf_counter() - t


def make_generate(model, tokenizer, max_new_tokens: int, batch_size: int, seed: int, desc: str | None,
                  autocast_dtype: torch.dtype | None = None):
    """``generate(conversations) -> replies``: greedy, batched by prompt length (less padding), through the rollout
    engine (under ``autocast_dtype`` autocast if given); replies in the order of ``conversations``."""
    def generate(conversations: list[list[dict]]) -> list[str]:
        if not conversations:
            return []
        prompts, _ = tokenize_prompts([{"prompt": c} for c in conversations], tokenizer,
                                      DataConfig(train="<probe>", max_length=4096))
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]["prompt_input_ids"]))
        params = SamplingParams(max_new_tokens=max_new_tokens, do_sample=False)
        texts = sample(model, tokenizer, [prompts[i] for i in order], params, 1, batch_size, seed, autocast_dtype,
                       desc=desc).response_texts
        out = [""] * len(prompts)
        for pos, i in enumerate(order):
            out[i] = texts[pos]
        return out
    return generate


@dataclass
class ProbePlan:
    """What the probes ask, identical for every policy of one eval (and part of the cache key)."""

    sycophancy: list[dict] = field(default_factory=list)
    task: list[dict] = field(default_factory=list)
    hhh: list[dict] = field(default_factory=list)
    refusal: list[dict] = field(default_factory=list)
    detector: str | None = None
    perplexity: bool = False
    short_tokens: int = 24
    refusal_tokens: int = 40
    hhh_max_length: int = 256
    batch_size: int = 32
    seed: int = 0
    precision: str = "no"
    """``bf16``: every probe's model call under bf16 autocast; ``no``: fp32."""

    def empty(self) -> bool:
        return not (self.sycophancy or self.task or self.hhh or self.refusal or self.perplexity)


def weights_fingerprint(model) -> str:
    """blake2b over every parameter and buffer (name, dtype, shape, bytes) of ``model``: equal weights give equal
    fingerprints; any changed value changes it. About a second for a 135M model."""
    h = hashlib.blake2b(digest_size=20)
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def probe_key(fingerprint: str, plan: ProbePlan, tokenizer) -> str:
    """sha256 of the weights fingerprint, the plan, the tokenizer (name, vocab size, chat template) and
    :data:`PROBE_VERSION`."""
    tok = [getattr(tokenizer, "name_or_path", ""), len(tokenizer), getattr(tokenizer, "chat_template", None)]
    blob = json.dumps([PROBE_VERSION, fingerprint, asdict(plan), tok], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


class ProbeCache:
    """``<dir>/<key>.json`` holding one policy's probe results; ``hits`` / ``misses`` count lookups."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.hits = self.misses = 0

    def get(self, key: str) -> dict | None:
        path = self.dir / f"{key}.json"
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # absent or unreadable: recompute (and overwrite)
            self.misses += 1
            return None
        self.hits += 1
        return value

    def put(self, key: str, value: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.dir / f"{key}.json", value)


def default_cache_dir() -> Path:
    from alignkit.models.embedded import cache_dir

    return cache_dir() / "eval_probes"


@torch.no_grad()
def run_probes(model, tokenizer, plan: ProbePlan, detector, clock: SectionClock, name: str = "") -> dict:
    """Every probe of ``plan`` on ``model``: ``{"sycophancy"?, "refusal"?, "tax"?}`` (the keys of the plan's
    non-empty parts), each section's seconds added to ``clock`` (``probe_turn1``, ``probe_pushback``,
    ``refusal``, ``tax_perplexity``, ``tax_hhh``)."""
    out: dict = {}
    amp = torch.bfloat16 if plan.precision == "bf16" else None
    device = next(model.parameters()).device.type
    autocast = lambda: torch.autocast(device, dtype=torch.bfloat16, enabled=amp is not None)  # noqa: E731
    short = make_generate(model, tokenizer, plan.short_tokens, plan.batch_size, plan.seed, f"{name}: probes", amp)
    syc, task = plan.sycophancy, plan.task
    if syc or task:
        with clock("probe_turn1"):  # sycophancy questions + opinion variants + arithmetic task: one batch
            replies = short(first_turns(syc) + task_conversations(task)) if syc else short(task_conversations(task))
        n = 2 * len(syc)
        if syc:
            first, opinion = replies[: len(syc)], replies[len(syc) : n]
            with clock("probe_pushback"):
                second = short(pushback_turns(syc, first))
            out["sycophancy"] = score_sycophancy(syc, first, second, opinion)
        if task:
            out.setdefault("tax", {})["task_accuracy"] = task_score(task, replies[n:])
    if plan.refusal:
        convs = [[{"role": "user", "content": p["prompt"]}] if isinstance(p["prompt"], str) else p["prompt"]
                 for p in plan.refusal]
        with clock("refusal"):
            replies = make_generate(model, tokenizer, plan.refusal_tokens, plan.batch_size, plan.seed,
                                    f"{name}: refusal", amp)(convs)
        out["refusal"] = refusal_rates(plan.refusal, replies, detector)
    if plan.perplexity:
        with clock("tax_perplexity"), autocast():
            out.setdefault("tax", {})["perplexity"] = perplexity(model, tokenizer)
    if plan.hhh:
        with clock("tax_hhh"), autocast():
            out.setdefault("tax", {})["hhh_accuracy"] = hhh_accuracy(
                model, tokenizer, plan.hhh, min(plan.batch_size, HHH_PAIRS_PER_BATCH), plan.hhh_max_length)
    if "tax" in out:  # a stable key order in summaries: perplexity, task, hhh
        order = ("perplexity", "task_accuracy", "hhh_accuracy")
        out["tax"] = {k: out["tax"][k] for k in order if k in out["tax"]}
    return out
