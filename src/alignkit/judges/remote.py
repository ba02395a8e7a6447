"""A judge behind any OpenAI-compatible ``/v1/chat/completions`` endpoint, through the official ``openai`` client.

Works with OpenAI, vLLM / SGLang / llama.cpp servers and ``alignkit serve``. Per comparison (one order):

1. The judging chat of :mod:`alignkit.judges.prompts` is sent (answer "(A)" or "(B)" only; or reason first with
   ``chain_of_thought``), with ``logprobs=True, top_logprobs=k`` when ``judge.logprobs`` is on.
2. Log-probs given: at the answer's letter token (the first token that reads "A"/"B" once brackets and spaces are
   stripped; the last one for chain of thought) the alternatives among the top k that read "A" or "B" are summed
   and normalised: ``P(first better) = m_A / (m_A + m_B)``.
3. No log-probs (the endpoint gives none, or the letter is missing from the top k): the text is parsed
   (:func:`alignkit.judges.prompts.parse_verdict`) -> 1.0 / 0.0; an answer naming neither option counts 0.5 and
   is counted in ``usage()["unparsed"]``.

Production concerns:

- **Cache**: every response is stored on disk under ``judge.cache_dir`` (default ``$ALIGNKIT_CACHE/judge_cache``),
  keyed by the sha256 of ``(model, messages, parameters)`` and written atomically; asking again costs nothing.
- **Retries**: 408/409/429/5xx, connection errors and timeouts are retried up to ``max_retries`` times with
  exponential backoff ``retry_base_delay_s · 2^attempt`` (capped at 30 s; a ``Retry-After`` header is honoured
  up to the cap). Other 4xx (a wrong key, an unknown model) fail at once with the server's message.
- **Concurrency**: at most ``max_concurrency`` requests in flight (a thread pool); ``timeout_s`` per request.
- **Accounting**: :meth:`OpenAIJudge.usage` counts requests, prompt/completion tokens, cache hits, retries and
  answers read from log-probs vs parsed vs unparsed; :class:`~alignkit.judges.base.Comparison` carries each
  call's share, and runs log them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from alignkit.io_utils import atomic_write_json
from alignkit.judges.base import Judge
from alignkit.judges.prompts import OPTIONS, judging_messages, parse_verdict

MAX_BACKOFF_S = 30.0
DIRECT_MAX_TOKENS = 16
"""Tokens a direct (no chain of thought) answer may use: "(A)" plus a few words of slack."""
RESAMPLE_TEMPERATURE = 1.0
"""Temperature of a re-draw (``sample`` >= 1) when the judge is configured greedy (``temperature`` 0)."""
RETRY_STATUS = {408, 409, 429}


class JudgeRequestError(RuntimeError):
    """The endpoint refused a request (a 4xx other than 408/409/429) or kept failing after every retry."""


def _letter(token: str) -> str | None:
    """A token that reads as an option letter once brackets, spaces and emphasis are stripped: "(A", " B", "A)"."""
    core = token.strip().strip("()[]*.:").strip()
    return core if core in OPTIONS else None


def probability_from_logprobs(content: list[dict], chain_of_thought: bool = False) -> float | None:
    """P(first better) from a response's token log-probs, or None when no answer letter can be found.

    ``content``: one ``{"token", "logprob", "top_logprobs": [{"token", "logprob"}, ...]}`` per generated token.
    At the answer position (the first letter token; the last for chain of thought), m_X = Σ exp(logprob) over the
    top alternatives reading X, and P = m_A / (m_A + m_B). E.g. top [("A", ln .6), (" A", ln .1), ("B", ln .2),
    ("C", ln .1)] -> m_A = .7, m_B = .2, P = .7 / .9 = 0.7778.
    """
    positions = [i for i, t in enumerate(content) if _letter(t["token"]) is not None]
    if not positions:
        return None
    at = content[positions[-1] if chain_of_thought else positions[0]]
    mass = {opt: 0.0 for opt in OPTIONS}
    alternatives = at.get("top_logprobs") or [{"token": at["token"], "logprob": at["logprob"]}]
    for alt in alternatives:
        letter = _letter(alt["token"])
        if letter is not None:
            mass[letter] += math.exp(alt["logprob"])
    total = mass["A"] + mass["B"]
    return mass["A"] / total if total > 0 else None


def cache_key(model: str, messages: list[dict], params: dict) -> str:
    """sha256 of the canonical JSON of (model, messages, parameters): equal requests share one cache entry."""
    blob = json.dumps({"model": model, "messages": messages, "params": params}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class OpenAIJudge(Judge):
    """Pairwise judge through an OpenAI-compatible endpoint (see the module docstring)."""

    def __init__(self, model: str, base_url: str | None = None, api_key: str | None = None,
                 chain_of_thought: bool = False, cache_dir: str | Path | None = None, max_concurrency: int = 4,
                 timeout_s: float = 60.0, max_retries: int = 5, temperature: float = 0.0, max_tokens: int = 256,
                 logprobs: bool = True, top_logprobs: int = 5, retry_base_delay_s: float = 0.5,
                 cache: bool = True, client=None):
        import openai

        self.model, self.chain_of_thought, self.temperature = model, chain_of_thought, temperature
        self.max_tokens, self.logprobs, self.top_logprobs = max_tokens, logprobs, top_logprobs
        self.max_concurrency, self.max_retries, self.retry_base_delay_s = max_concurrency, max_retries, retry_base_delay_s
        self.name = f"openai:{model}"
        base_url = base_url or os.environ.get("OPENAI_BASE_URL") or None
        # a local endpoint usually needs no key, but the client insists on one ("EMPTY", vLLM's convention)
        api_key = api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"
        # retries are ours (counted and tested); the client's own are off
        self.client = client or openai.OpenAI(base_url=base_url, api_key=api_key, timeout=timeout_s, max_retries=0)
        self.base_url = str(self.client.base_url)
        if cache_dir is None:
            from alignkit.models.embedded import cache_dir as asset_cache

            cache_dir = asset_cache() / "judge_cache"
        self.cache_dir = Path(cache_dir) if cache else None
        self._lock = threading.Lock()
        self._usage = {k: 0.0 for k in ("requests", "prompt_tokens", "completion_tokens", "cache_hits", "retries",
                                        "answers_logprobs", "answers_parsed", "unparsed")}

    @classmethod
    def from_config(cls, cfg) -> "OpenAIJudge":
        return cls(cfg.model, base_url=cfg.base_url, api_key=cfg.api_key, chain_of_thought=cfg.chain_of_thought,
                   cache_dir=cfg.cache_dir, max_concurrency=cfg.max_concurrency, timeout_s=cfg.timeout_s,
                   max_retries=cfg.max_retries, temperature=cfg.temperature, max_tokens=cfg.max_tokens,
                   logprobs=cfg.logprobs, top_logprobs=cfg.top_logprobs, retry_base_delay_s=cfg.retry_base_delay_s,
                   cache=cfg.cache)

    def usage(self) -> dict[str, float]:
        with self._lock:
            return dict(self._usage)

    def _count(self, **amounts: float) -> None:
        with self._lock:
            for k, v in amounts.items():
                self._usage[k] += v

    # ---------------------------------------------------------------- one request, cached and retried
    def _params(self, sample: int) -> dict:
        temperature = self.temperature if sample == 0 else (self.temperature or RESAMPLE_TEMPERATURE)
        params = {"temperature": temperature,
                  "max_tokens": self.max_tokens if self.chain_of_thought else min(self.max_tokens, DIRECT_MAX_TOKENS)}
        if self.logprobs:
            params.update(logprobs=True, top_logprobs=self.top_logprobs)
        return params

    def _cache_path(self, key: str) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / key[:2] / f"{key}.json"

    def complete(self, messages: list[dict], params: dict, sample: int = 0) -> dict:
        """``{"text", "logprobs": [...] | None}`` for one chat, from the cache or the endpoint."""
        key = cache_key(self.model, messages, {**params, **({"sample": sample} if sample else {})})
        path = self._cache_path(key)
        if path is not None and path.is_file():
            try:
                entry = json.loads(path.read_text(encoding="utf-8"))
                self._count(cache_hits=1)
                return entry
            except (OSError, json.JSONDecodeError):
                pass  # an unreadable entry is asked again and rewritten
        response = self._request(messages, params)
        choice = response.choices[0]
        content = None
        if choice.logprobs is not None and choice.logprobs.content:
            content = [{"token": t.token, "logprob": t.logprob,
                        "top_logprobs": [{"token": a.token, "logprob": a.logprob} for a in (t.top_logprobs or [])]}
                       for t in choice.logprobs.content]
        entry = {"text": choice.message.content or "", "logprobs": content}
        usage = response.usage
        self._count(requests=1, prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
                    completion_tokens=getattr(usage, "completion_tokens", 0) or 0)
        if path is not None:
            atomic_write_json(path, entry)
        return entry

    def _request(self, messages: list[dict], params: dict):
        import openai

        for attempt in range(self.max_retries + 1):
            try:
                return self.client.chat.completions.create(model=self.model, messages=messages, **params)
            except (openai.APIConnectionError, openai.APIStatusError) as e:  # APITimeoutError is a connection error
                status = getattr(e, "status_code", None)
                retryable = status is None or status in RETRY_STATUS or status >= 500
                if not retryable:
                    raise JudgeRequestError(f"judge endpoint {self.base_url} refused the request (HTTP {status}): "
                                            f"{e}") from None
                if attempt == self.max_retries:
                    raise JudgeRequestError(f"judge endpoint {self.base_url} still failing after {self.max_retries} "
                                            f"retries: {type(e).__name__}: {e}") from None
                self._count(retries=1)
                time.sleep(self._backoff(attempt, e))

    def _backoff(self, attempt: int, error) -> float:
        delay = self.retry_base_delay_s * 2 ** attempt
        response = getattr(error, "response", None)
        retry_after = response.headers.get("retry-after") if response is not None else None
        if retry_after:
            try:
                delay = max(delay, float(retry_after))
            except ValueError:
                pass
        return min(delay, MAX_BACKOFF_S)

    # ---------------------------------------------------------------- one order of a batch
    def _judge_one(self, item: tuple[str, str, str, str], sample: int) -> float:
        prompt, first, second, principle = item
        messages = judging_messages(prompt, first, second, principle, self.chain_of_thought)
        entry = self.complete(messages, self._params(sample), sample)
        if entry["logprobs"]:
            p = probability_from_logprobs(entry["logprobs"], self.chain_of_thought)
            if p is not None:
                self._count(answers_logprobs=1)
                return p
        letter = parse_verdict(entry["text"], self.chain_of_thought)
        if letter is None:
            self._count(unparsed=1)
            return 0.5
        self._count(answers_parsed=1)
        return 1.0 if letter == "A" else 0.0

    def prefer_first(self, prompts, first, second, principles, sample: int = 0) -> np.ndarray:
        items = list(zip(prompts, first, second, principles))
        with ThreadPoolExecutor(max_workers=self.max_concurrency) as pool:
            return np.array(list(pool.map(lambda it: self._judge_one(it, sample), items)), dtype=np.float64)
