"""The serving engine: one worker thread owns the model; requests wait in a bounded queue and compatible ones are
batched into one ``generate()`` call of the rollout engine (:mod:`alignkit.rollout.engine`).

- Admission: at most ``max_queue`` requests are waiting or running; :meth:`ServingEngine.submit` refuses more
  (the server answers 429), so a burst never piles up unbounded work or memory.
- Batching: a non-streaming request waits up to ``batch_wait_ms`` for others with the same sampling settings
  (temperature, top-p); up to ``max_batch_size`` of them are left-padded into one batch and generated together
  for the largest ``max_tokens`` among them, each then cut to its own limit. Greedy results equal those of a
  request served alone (padding-aware positions); sampled ones use each request's own row seed.
- Streaming requests run alone, their text handed out piece by piece through a ``TextIteratorStreamer``.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from transformers import TextIteratorStreamer

from alignkit.ops.logprobs import forward_logits
from alignkit.rollout.engine import HFGenerateBackend, SamplingParams, generate_rollouts


@dataclass
class GenerationJob:
    """One chat request, rendered: ``prompt_ids`` (the chat template applied), how to sample, what to return."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop: list[str] = field(default_factory=list)
    top_logprobs: int | None = None  # None: no log-probs; k >= 0: the chosen token's and the top k alternatives
    stream: bool = False
    future: Future = field(default_factory=Future)
    streamer: TextIteratorStreamer | None = None

    @property
    def params(self) -> SamplingParams:
        sample = self.temperature > 0
        return SamplingParams(max_new_tokens=self.max_tokens, temperature=self.temperature if sample else 1.0,
                              top_p=self.top_p, do_sample=sample)

    def batch_key(self) -> tuple:
        return (self.temperature, self.top_p) if not self.stream else ("stream", id(self))


@dataclass
class GenerationResult:
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) | "length" (max_tokens reached)
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[dict] | None = None


class QueueFull(RuntimeError):
    pass


class CountingStreamer(TextIteratorStreamer):
    """A ``TextIteratorStreamer`` that also counts the generated tokens and remembers the last one."""

    def __init__(self, tokenizer, timeout: float | None = None):
        super().__init__(tokenizer, skip_prompt=True, timeout=timeout, skip_special_tokens=True)
        self.n_tokens, self.last_token = 0, None

    def put(self, value):
        if not self.next_tokens_are_prompt:
            flat = value.reshape(-1)
            self.n_tokens += int(flat.numel())
            if flat.numel():
                self.last_token = int(flat[-1])
        super().put(value)


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """``text`` up to the earliest stop string (excluded), and whether one was found."""
    cuts = [text.find(s) for s in stops if s and s in text]
    return (text[:min(cuts)], True) if cuts else (text, False)


class ServingEngine:
    def __init__(self, model, tokenizer, max_queue: int = 16, max_batch_size: int = 8, batch_wait_ms: float = 10.0):
        self.model, self.tokenizer = model, tokenizer
        self.backend = HFGenerateBackend(model, tokenizer)
        self.max_queue, self.max_batch_size, self.batch_wait_s = max_queue, max_batch_size, batch_wait_ms / 1000
        self._jobs: queue.Queue = queue.Queue()
        self._carry: deque = deque()
        self._pending, self._lock = 0, threading.Lock()
        self.batches_run, self.largest_batch = 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="alignkit-serve-engine", daemon=True)
        self._thread.start()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def pending(self) -> int:
        with self._lock:
            return self._pending

    def submit(self, job: GenerationJob) -> GenerationJob:
        """Queue ``job`` (its ``future`` gets the :class:`GenerationResult`); :class:`QueueFull` when
        ``max_queue`` requests are already waiting or running."""
        with self._lock:
            if self._pending >= self.max_queue:
                raise QueueFull(f"the server is busy: {self._pending} requests are queued or running "
                                f"(serve.max_queue={self.max_queue}); retry shortly")
            self._pending += 1
        if job.stream:
            job.streamer = CountingStreamer(self.tokenizer, timeout=None)
        self._jobs.put(job)
        return job

    def close(self) -> None:
        self._stop.set()
        self._jobs.put(None)
        self._thread.join(timeout=10)

    # ---------------------------------------------------------------- the worker
    def _next(self, timeout: float | None):
        if self._carry:
            return self._carry.popleft()
        return self._jobs.get(timeout=timeout) if timeout is None or timeout > 0 else self._jobs.get_nowait()

    def _loop(self) -> None:
        while not self._stop.is_set():
            job = self._next(None)
            if job is None:
                return
            batch = [job]
            if not job.stream:
                deadline = time.monotonic() + self.batch_wait_s
                skipped = []
                while len(batch) < self.max_batch_size:
                    try:
                        other = self._next(deadline - time.monotonic())
                    except queue.Empty:
                        break
                    if other is None:
                        self._stop.set()
                        break
                    (batch if other.batch_key() == job.batch_key() else skipped).append(other)
                self._carry.extend(skipped)
            try:
                if job.stream:
                    self._run_stream(job)
                else:
                    self._run_batch(batch)
            except Exception as e:  # noqa: BLE001 (handed to the request that caused it)
                for j in batch:
                    if not j.future.done():
                        j.future.set_exception(e)
                    if j.streamer is not None:
                        j.streamer.end()
            finally:
                with self._lock:
                    self._pending -= len(batch)

    def _left_pad(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs], dtype=torch.long)  # [B, P]
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], dtype=torch.long)  # [B, P]
        return ids.to(self.device), mask.to(self.device)

    def _run_batch(self, batch: list[GenerationJob]) -> None:
        self.batches_run += 1
        self.largest_batch = max(self.largest_batch, len(batch))
        ids, mask = self._left_pad([j.prompt_ids for j in batch])
        first = batch[0]
        params = SamplingParams(max_new_tokens=max(j.max_tokens for j in batch), temperature=first.params.temperature,
                                top_p=first.top_p, do_sample=first.params.do_sample)
        seeds = [j.seed for j in batch] if params.do_sample else None
        rollout = generate_rollouts(self.backend, self.tokenizer, ids, mask, params, prompt_texts=[""] * len(batch),
                                    prompt_seeds=seeds)
        eos = self.tokenizer.eos_token_id
        for row, job in enumerate(batch):
            tokens = rollout.response_ids[row][rollout.response_mask[row].bool()].tolist()[:job.max_tokens]
            stopped = bool(tokens) and tokens[-1] == eos
            content = tokens[:-1] if stopped else tokens
            text, hit = cut_at_stop(self.tokenizer.decode(content, skip_special_tokens=True), job.stop)
            logprobs = None
            if job.top_logprobs is not None and content:
                logprobs = self.token_logprobs(job.prompt_ids, content, job.top_logprobs)
            job.future.set_result(GenerationResult(
                text=text, finish_reason="stop" if stopped or hit else "length", prompt_tokens=len(job.prompt_ids),
                completion_tokens=len(tokens), logprobs=logprobs))

    @torch.no_grad()
    def token_logprobs(self, prompt_ids: list[int], response_ids: list[int], top_k: int) -> list[dict]:
        """OpenAI's ``logprobs.content``: per generated token its text, log-prob (of the model's untempered
        distribution) and the ``top_k`` most likely alternatives at that position."""
        ids = torch.tensor([prompt_ids + response_ids], device=self.device)  # [1, P + R]
        logits = forward_logits(self.model, ids, torch.ones_like(ids), logits_to_keep=len(response_ids) + 1)
        logps = torch.log_softmax(logits[0, :-1].float(), dim=-1)  # [R, V]: position t predicts response token t
        chosen = logps.gather(1, torch.tensor(response_ids, device=logps.device)[:, None])[:, 0]  # [R]
        top = torch.topk(logps, k=min(top_k, logps.shape[-1])) if top_k > 0 else None
        out = []
        for t, token in enumerate(response_ids):
            alts = [] if top is None else [
                {"token": self.tokenizer.decode([int(i)]), "logprob": float(v), "bytes": None}
                for v, i in zip(top.values[t].tolist(), top.indices[t].tolist())]
            out.append({"token": self.tokenizer.decode([token]), "logprob": float(chosen[t]), "bytes": None,
                        "top_logprobs": alts})
        return out

    def _run_stream(self, job: GenerationJob) -> None:
        self.batches_run += 1
        ids, mask = self._left_pad([job.prompt_ids])
        params = job.params
        kwargs = self.backend.generation_kwargs(params)
        if params.do_sample:
            torch.manual_seed(job.seed)
        model = self.model
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, streamer=job.streamer, **kwargs)
        stopped = job.streamer.last_token == self.tokenizer.eos_token_id
        job.future.set_result(GenerationResult(
            text="", finish_reason="stop" if stopped else "length", prompt_tokens=len(job.prompt_ids),
            completion_tokens=job.streamer.n_tokens))
