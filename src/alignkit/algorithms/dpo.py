"""DPO and its family on preference pairs: dpo, cdpo, ipo (reference-based), orpo, simpo (reference-free).

The loss is picked by name from ``alignkit.losses.PREFERENCE_LOSSES``; this file only
computes the log-probs each loss needs:
- one concatenated forward of chosen and rejected (padded to one length, stacked) per batch;
- reference log-probs precomputed once before training (``dpo.precompute_ref_logps``), or on the
  fly from the adapter-disabled policy (LoRA) or a frozen copy;
- summed token log-probs for dpo/cdpo/ipo (as the DPO reference repo), averaged for orpo/simpo.
Metrics use the field's names: rewards/chosen, rewards/rejected, rewards/margins,
rewards/accuracies, logps/chosen, logps/rejected.
"""

from __future__ import annotations

import contextlib
from functools import partial

import torch

from alignkit.config import DPOConfig, default_beta
from alignkit.data.collate import collate_preference
from alignkit.data.pipeline import prepare_data
from alignkit.losses import PREFERENCE_LOSSES
from alignkit.models.loading import load_policy, load_reference, load_tokenizer
from alignkit.models.reference import Reference
from alignkit.ops.logprobs import sequence_logprobs
from alignkit.train.loop import StepOutput, distributed_state, map_over_processes, finish_run, train_loop
from alignkit.train.run import (
    autocast_for, evaluate, log, prepare_run_dir, set_seed,
)


def collate_with_ref(examples: list[dict], pad_token_id: int) -> dict:
    batch = collate_preference(examples, pad_token_id)
    if "ref_chosen_logps" in examples[0]:
        batch["ref_chosen_logps"] = torch.tensor([e["ref_chosen_logps"] for e in examples])  # [B]
        batch["ref_rejected_logps"] = torch.tensor([e["ref_rejected_logps"] for e in examples])  # [B]
    return batch


def concatenated_logps(model, batch: dict, average: bool, padding_free: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over [chosen; rejected] -> (chosen [B], rejected [B])."""
    logps = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"],
                              average=average, padding_free=padding_free)  # [2B]
    n = logps.shape[0] // 2
    return logps[:n], logps[n:]


def precompute_reference_logps(ref: Reference, examples: list[dict], pad_token_id: int, batch_size: int,
                               amp=contextlib.nullcontext, map_fn=None) -> None:
    """Adds ref_chosen_logps / ref_rejected_logps (summed over response tokens) to each example, in place."""
    ref.precompute(examples, partial(collate_preference, pad_token_id=pad_token_id),
                   partial(concatenated_logps, average=False), ("ref_chosen_logps", "ref_rejected_logps"),
                   batch_size, amp, map_fn)


def make_dpo_step(cfg: DPOConfig, ref: Reference | None = None):
    spec = PREFERENCE_LOSSES[cfg.dpo.loss]
    beta = cfg.dpo.beta if cfg.dpo.beta is not None else default_beta(cfg.dpo.loss)
    uses_ref = spec.needs_reference and not cfg.dpo.reference_free

    kwargs = spec.kwargs({**cfg.dpo.model_dump(), "beta": beta})  # the settings this loss takes, by name

    def reference_logps(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        if "ref_chosen_logps" in batch:  # precomputed
            return batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        return ref.logprobs(concatenated_logps, batch, average=False)

    def dpo_step(model, batch: dict) -> StepOutput:
        chosen_logps, rejected_logps = concatenated_logps(model, batch, average=spec.average_logps,
                                                          padding_free=cfg.train.padding_free)  # [B], [B]
        if spec.needs_reference:
            if uses_ref:
                ref_chosen, ref_rejected = reference_logps(model, batch)
            else:
                ref_chosen = ref_rejected = torch.zeros_like(chosen_logps)
            out = spec.fn(chosen_logps, rejected_logps, ref_chosen, ref_rejected, **kwargs)
        else:
            out = spec.fn(chosen_logps, rejected_logps, **kwargs)
        margins = out.chosen_rewards - out.rejected_rewards
        return StepOutput(
            loss=out.losses.mean(),
            metrics={
                "rewards/chosen": float(out.chosen_rewards.mean()),
                "rewards/rejected": float(out.rejected_rewards.mean()),
                "rewards/margins": float(margins.mean()),
                "rewards/accuracies": float((margins > 0).float().mean()),
                "logps/chosen": float(chosen_logps.detach().mean()),
                "logps/rejected": float(rejected_logps.detach().mean()),
            },
            num_tokens=int(batch["attention_mask"].sum()),
        )

    return dpo_step, uses_ref


def train(cfg: DPOConfig, resume: bool = False) -> dict:
    run_dir = prepare_run_dir(cfg, cfg.train.output_dir, resume, f"{cfg.dpo.loss} preference optimisation")
    set_seed(cfg.train.seed)
    tokenizer = load_tokenizer(cfg.model.name_or_path)
    data = prepare_data(cfg.data, "preference", tokenizer, cfg.train.seed, log)
    model = load_policy(cfg.model, tokenizer)
    pad = tokenizer.pad_token_id
    eval_bs = cfg.train.eval_batch_size or cfg.train.batch_size
    spec = PREFERENCE_LOSSES[cfg.dpo.loss]
    needs_ref = spec.needs_reference and not cfg.dpo.reference_free

    device = distributed_state(cfg.train).device  # where this process trains: the reference works there too
    ref = None
    if needs_ref:
        ref_model = load_reference(cfg.model, tokenizer, cfg.dpo.ref_model) if cfg.dpo.ref_model is not None else None
        model.to(device)
        ref = Reference.of_policy(model, ref_model, copy=not cfg.dpo.precompute_ref_logps).to(device)
        if cfg.dpo.precompute_ref_logps:
            log(f"precomputing reference log-probs ({ref}) for {len(data.train) + len(data.eval)} pairs")
            precompute_reference_logps(ref, data.train + data.eval, pad, eval_bs,
                                       lambda: autocast_for(cfg.train, device),
                                       map_fn=partial(map_over_processes, cfg.train))  # each process a share
            ref = Reference.precomputed("ref_chosen_logps/ref_rejected_logps on each example")  # the model is freed

    step_fn, _ = make_dpo_step(cfg, ref)
    collate = partial(collate_with_ref, pad_token_id=pad)

    def eval_metrics(m, batch):
        out = step_fn(m, batch)
        return batch["input_ids"].shape[0] // 2, {"loss": float(out.loss), **out.metrics}

    def eval_fn(m):
        return evaluate(m, data.eval, collate, eval_metrics, eval_bs) if data.eval else None

    result = train_loop(
        cfg.train, model=model, train_examples=data.train, collate_fn=collate, step_fn=step_fn,
        run_dir=run_dir, eval_fn=eval_fn, resume=resume, desc=cfg.dpo.loss,
    )
    finish_run(cfg.train, model, tokenizer, run_dir, result, data.report)
    return result
