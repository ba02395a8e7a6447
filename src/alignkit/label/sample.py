"""``alignkit sample``: K responses per prompt from a policy -> a candidates file for ``alignkit label create``.

Reuses the rollout engine of every online method (:func:`alignkit.rollout.engine.generate_rollouts`, backend from
``generation.backend``): prompt i's K samples are drawn with seed ``(seed, i)``, so the file does not depend on
``generation.batch_size``. Each line: ``{"prompt", "responses": [K strings], "models": [K names]}`` where the prompt
is written as in the prompt file (a string, or the message list).

Outputs in ``output_dir``: the candidates file (``sample.output_file``), ``summary.json`` and ``config.yaml``.
"""

from __future__ import annotations

import time

from alignkit.config import SampleConfig
from alignkit.data.tokenize import PROMPT_MESSAGES_KEY
from alignkit.io_utils import atomic_write_text
from alignkit.label.candidates import candidate_line
from alignkit.models.loading import load_policy, load_tokenizer
from alignkit.ops.seeds import derive_seed
from alignkit.rollout.backends import make_backend
from alignkit.rollout.engine import SamplingParams, generate_rollouts
from alignkit.rollout.prompts import load_prompts, prompt_batch
from alignkit.train.run import log, make_accelerator, prepare_run_dir, write_summary


def prompt_as_written(messages: list[dict], system_prompt: str | None):
    """The prompt for the candidates file: a single user message becomes its string again; a conversation stays a
    list of messages (without the ``data.system_prompt`` the config added, which is not part of the prompt)."""
    if system_prompt is not None and messages and messages[0]["role"] == "system" and messages[0]["content"] == system_prompt:
        messages = messages[1:]
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def run(cfg: SampleConfig, resume: bool = False) -> dict:
    if resume:
        raise ValueError("alignkit sample has no --resume: rerun it (samples are seeded, the file comes out the same)")
    run_dir = prepare_run_dir(cfg, cfg.output_dir, resume, "sample")
    tokenizer = load_tokenizer(cfg.model.name_or_path, padding_side="left")
    prompts = load_prompts(cfg.data, tokenizer, cfg.generation.max_new_tokens, "train", log)
    accelerator = make_accelerator()
    if accelerator.num_processes > 1:
        raise ValueError("alignkit sample runs as one process (one GPU or the CPU); launch it without "
                         "accelerate launch / torchrun, or use generation.backend=vllm with tensor parallelism")
    device = accelerator.device
    model = load_policy(cfg.model, tokenizer, trainable=False).to(device)
    backend = make_backend(cfg.generation, model, tokenizer)
    params = SamplingParams.from_section(cfg.generation)
    k, chunk = cfg.sample.k, cfg.generation.batch_size
    name = cfg.sample.model_label or cfg.model.name_or_path
    lines, n_no_eos, t0 = [], 0, time.time()
    for start in range(0, len(prompts), chunk):
        part = prompts[start:start + chunk]
        batch = prompt_batch(part, tokenizer.pad_token_id)
        rollout = generate_rollouts(
            backend, tokenizer, batch["input_ids"].to(device), batch["attention_mask"].to(device), params,
            num_samples=k, prompt_texts=batch["prompt_texts"], extras=batch["extras"],
            prompt_seeds=[derive_seed(cfg.seed, start + i) for i in range(len(part))],
        )
        n_no_eos += int((~rollout.has_eos.bool()).sum())
        for i, p in enumerate(part):
            texts = rollout.response_texts[i * k:(i + 1) * k]  # [k] samples of prompt i (group-contiguous rows)
            prompt = prompt_as_written(p["extras"][PROMPT_MESSAGES_KEY], cfg.data.system_prompt)
            lines.append(candidate_line(prompt, texts, [name] * k))
        log(f"sample: {min(start + chunk, len(prompts))}/{len(prompts)} prompts")
    out = run_dir / cfg.sample.output_file
    atomic_write_text(out, "".join(lines))
    summary = {"prompts": len(prompts), "k": k, "responses": len(prompts) * k, "no_eos_frac": n_no_eos / (len(prompts) * k),
               "output_file": str(out), "time_s": time.time() - t0}
    write_summary(run_dir, summary)
    log(f"sample done: {len(prompts)} prompts x {k} responses -> {out}; next: alignkit label create --candidates {out}")
    return summary
