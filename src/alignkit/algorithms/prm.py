"""Process reward model (Lightman et al. 2023, "Let's Verify Step by Step"; Wang et al. 2024, Math-Shepherd).

    loss = -1/K sum_k [ y_k log sigma(z_{s_k}) + (1 - y_k) log(1 - sigma(z_{s_k})) ]     (``losses.prm_step_loss``)

- A token classifier: a scalar head on the LM's hidden state at every position; z_{s_k} is read at the last token
  of the separator that ends step k (``data.tokenize.encode_steps``), y_k the step's label (bool, or a soft
  Math-Shepherd label in [0, 1]).
- Held-out metrics: step accuracy (sigma(z) > 0.5 against y > 0.5), step loss, and solution accuracy (every step
  predicted as its label).
- The saved model's config stores the separator (``alignkit_prm``), so ``rewards.prm.load_prm_scorer`` splits
  completions the same way.
"""

from __future__ import annotations

import torch

from alignkit.config import PRMConfig
from alignkit.data.collate import pad_sequences
from alignkit.data.pipeline import prepare_data
from alignkit.losses import prm_step_loss
from alignkit.models.loading import load_prm_model, load_tokenizer
from alignkit.rewards.prm import PRM_CONFIG_ATTR, token_logits
from alignkit.train.loop import StepOutput, finish_run, train_loop
from alignkit.train.run import evaluate, log, prepare_run_dir, set_seed


def collate_stepwise(examples: list[dict], pad_token_id: int) -> dict:
    """Right-padded ``input_ids``/``attention_mask`` [B, T]; ``step_mask`` [B, T] is 1 at each step's separator
    position and ``step_labels`` [B, T] holds that step's label there (0 elsewhere)."""
    input_ids = pad_sequences([e["input_ids"] for e in examples], pad_token_id, side="right")  # [B, T]
    lengths = torch.tensor([len(e["input_ids"]) for e in examples])
    attention_mask = (torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]).long()  # [B, T]
    step_mask = torch.zeros_like(input_ids)
    step_labels = torch.zeros(input_ids.shape, dtype=torch.float32)
    for i, e in enumerate(examples):
        ends = torch.tensor(e["step_ends"], dtype=torch.long)
        step_mask[i, ends] = 1
        step_labels[i, ends] = torch.tensor(e["labels"], dtype=torch.float32)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "step_mask": step_mask, "step_labels": step_labels}


def _step_stats(logits: torch.Tensor, batch: dict) -> dict[str, tuple[float, float]]:
    mask = batch["step_mask"].bool()  # [B, T]
    hit = ((logits > 0) == (batch["step_labels"] > 0.5)) & mask  # [B, T]
    solved = (hit | ~mask).all(-1)  # [B] every step right
    return {"step_accuracy": (float(hit.sum()), float(mask.sum())), "solution_accuracy": (float(solved.sum()), len(solved))}


def prm_step(model, batch: dict) -> StepOutput:
    logits = token_logits(model, batch["input_ids"], batch["attention_mask"])  # [B, T]
    losses = prm_step_loss(logits, batch["step_labels"], batch["step_mask"])  # [B]
    return StepOutput(loss=losses.mean(), metrics=_step_stats(logits.detach(), batch),
                      num_tokens=int(batch["attention_mask"].sum()))


def step_metrics(model, batch: dict) -> tuple[int, dict[str, float]]:
    logits = token_logits(model, batch["input_ids"], batch["attention_mask"])  # [B, T]
    stats = _step_stats(logits, batch)
    n = len(logits)
    return n, {"loss": float(prm_step_loss(logits, batch["step_labels"], batch["step_mask"]).mean()),
               **{k: s / max(c, 1.0) for k, (s, c) in stats.items()}}


def train(cfg: PRMConfig, resume: bool = False) -> dict:
    run_dir = prepare_run_dir(cfg, cfg.train.output_dir, resume, "process reward model")
    set_seed(cfg.train.seed)
    tokenizer = load_tokenizer(cfg.model.name_or_path)
    data = prepare_data(cfg.data, "stepwise", tokenizer, cfg.train.seed, log)
    model = load_prm_model(cfg.model, tokenizer)
    n_steps = sum(len(e["labels"]) for e in data.train)
    n_good = sum(sum(v > 0.5 for v in e["labels"]) for e in data.train)
    log(f"process reward model: {len(data.train)} solutions, {n_steps} steps ({n_good} labelled correct), "
        f"separator {cfg.data.step_separator!r}")

    def collate(examples):
        return collate_stepwise(examples, tokenizer.pad_token_id)

    eval_bs = cfg.train.eval_batch_size or cfg.train.batch_size

    def eval_fn(m):
        return evaluate(m, data.eval, collate, step_metrics, eval_bs) if data.eval else None

    result = train_loop(cfg.train, model=model, train_examples=data.train, collate_fn=collate, step_fn=prm_step,
                        run_dir=run_dir, eval_fn=eval_fn, resume=resume, desc="prm")
    setattr(getattr(model, "module", model).config, PRM_CONFIG_ATTR, {"separator": cfg.data.step_separator})
    finish_run(cfg.train, model, tokenizer, run_dir, result, data.report)
    if result.get("eval"):
        log(f"process reward model held-out step accuracy {result['eval'].get('step_accuracy', float('nan')):.3f}, "
            f"solution accuracy {result['eval'].get('solution_accuracy', float('nan')):.3f}")
    return result
