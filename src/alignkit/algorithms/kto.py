"""KTO on unpaired binary feedback ``{"prompt", "completion", "label": bool}`` (Ethayarajh et al. 2024).

    r = log pi(y|x) - log pref(y|x);  z0 = max(0, mean_{mismatched (x, y')} r), detached
    desirable:   lambda_D (1 - sigma(beta (r - z0)))
    undesirable: lambda_U (1 - sigma(beta (z0 - r)))

The mismatched pairs that estimate z0 are fixed once over the dataset: prompt i with the
completion of example (i+1) mod N, so their reference log-probs can be precomputed too.
Each batch runs ONE forward over [matched rows; mismatched rows].

z0 is estimated per micro-batch: over ``train.batch_size`` mismatched rows, on each process of an
``accelerate launch`` (not over the ``P * batch_size`` rows of the global micro-batch, as with
grad_accum). So, unlike sft/dpo/rm, P processes of batch b do not exactly reproduce one process of
batch P*b: each process's z0 is a noisier estimate of the same detached reference point.
"""

from __future__ import annotations

import contextlib
from functools import partial

import torch

from alignkit.config import KTOConfig
from alignkit.data.collate import pad_sequences
from alignkit.data.io import DataError
from alignkit.data.pipeline import prepare_data
from alignkit.losses import kto_loss
from alignkit.models.loading import load_policy, load_tokenizer
from alignkit.models.reference import Reference
from alignkit.ops.logprobs import sequence_logprobs
from alignkit.train.loop import StepOutput, distributed_state, map_over_processes, finish_run, train_loop
from alignkit.train.run import (
    evaluate, log, prepare_run_dir, set_seed, autocast_for,
)


def add_mismatched_pairs(examples: list[dict], max_length: int) -> None:
    """KL rows: prompt of i + completion of (i+1) mod N, right-truncated to ``max_length`` (in place)."""
    n = len(examples)
    for i, e in enumerate(examples):
        other = examples[(i + 1) % n]["completion_input_ids"]
        prompt = e["prompt_input_ids"]
        ids = (prompt + other)[:max_length]
        e["kl_input_ids"] = ids
        e["kl_response_mask"] = [0] * len(prompt) + [1] * (len(ids) - len(prompt))


def collate_kto_rows(examples: list[dict], pad_token_id: int) -> dict:
    """[matched B rows; mismatched B rows] padded to one length -> input_ids [2B, T]."""
    seqs = [e["input_ids"] for e in examples] + [e["kl_input_ids"] for e in examples]
    masks = [e["response_mask"] for e in examples] + [e["kl_response_mask"] for e in examples]
    input_ids = pad_sequences(seqs, pad_token_id, side="right")  # [2B, T]
    lengths = torch.tensor([len(s) for s in seqs])
    batch = {
        "input_ids": input_ids,
        "attention_mask": (torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]).long(),
        "response_mask": pad_sequences(masks, 0, side="right"),
        "label": torch.tensor([bool(e["label"]) for e in examples]),  # [B]
    }
    if "ref_logps" in examples[0]:
        batch["ref_logps"] = torch.tensor([e["ref_logps"] for e in examples])
        batch["ref_kl_logps"] = torch.tensor([e["ref_kl_logps"] for e in examples])
    return batch


def _split_logps(model, batch, padding_free: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    logps = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"],
                              padding_free=padding_free)  # [2B]
    n = logps.shape[0] // 2
    return logps[:n], logps[n:]


def precompute_reference(ref: Reference, examples: list[dict], pad: int, batch_size: int,
                         amp=contextlib.nullcontext, map_fn=None) -> None:
    """Adds ref_logps / ref_kl_logps (log pref(y|x), and of the mismatched row) to each example, in place."""
    ref.precompute(examples, partial(collate_kto_rows, pad_token_id=pad), _split_logps, ("ref_logps", "ref_kl_logps"),
                   batch_size, amp, map_fn)


def make_kto_step(cfg: KTOConfig, ref: Reference | None = None):
    def kto_step(model, batch: dict) -> StepOutput:
        policy_logps, policy_kl_logps = _split_logps(model, batch, cfg.train.padding_free)  # [B], [B]
        if "ref_logps" in batch:  # precomputed
            ref_logps, ref_kl_logps = batch["ref_logps"], batch["ref_kl_logps"]
        else:
            ref_logps, ref_kl_logps = ref.logprobs(_split_logps, batch)
        out = kto_loss(policy_logps, ref_logps, batch["label"], policy_kl_logps, ref_kl_logps,
                       beta=cfg.kto.beta, desirable_weight=cfg.kto.desirable_weight,
                       undesirable_weight=cfg.kto.undesirable_weight)
        labels = batch["label"]
        metrics = {"kl": float(out.kl), "frac_desirable": float(labels.float().mean())}
        if labels.any():
            metrics["rewards/chosen"] = float(out.rewards[labels].mean())
            metrics["logps/chosen"] = float(policy_logps.detach()[labels].mean())
        if (~labels).any():
            metrics["rewards/rejected"] = float(out.rewards[~labels].mean())
            metrics["logps/rejected"] = float(policy_logps.detach()[~labels].mean())
        return StepOutput(loss=out.losses.mean(), metrics=metrics, num_tokens=int(batch["attention_mask"].sum()))

    return kto_step


def train(cfg: KTOConfig, resume: bool = False) -> dict:
    run_dir = prepare_run_dir(cfg, cfg.train.output_dir, resume, "kto")
    set_seed(cfg.train.seed)
    tokenizer = load_tokenizer(cfg.model.name_or_path)
    data = prepare_data(cfg.data, "kto", tokenizer, cfg.train.seed, log)
    for split in (data.train, data.eval):
        if split:
            add_mismatched_pairs(split, cfg.data.max_length)
    labels = [bool(e["label"]) for e in data.train]
    if all(labels) or not any(labels):
        which = "true (desirable)" if labels[0] else "false (undesirable)"
        if not cfg.kto.allow_one_label:
            raise DataError(cfg.data.train, None, "label", f"all {len(labels)} training examples are labelled {which}; "
                            "KTO needs both desirable and undesirable examples, or it only pushes the rewards one way. "
                            "Check the label column, or set kto.allow_one_label=true to train anyway")
        log(f"WARNING: all {len(labels)} training labels are {which} (kto.allow_one_label=true): KTO only pushes "
            "the rewards one way")
    model = load_policy(cfg.model, tokenizer)
    pad = tokenizer.pad_token_id
    eval_bs = cfg.train.eval_batch_size or cfg.train.batch_size
    device = distributed_state(cfg.train).device  # where this process trains: the reference works there too
    model.to(device)
    ref = Reference.of_policy(model, copy=not cfg.kto.precompute_ref_logps).to(device)
    if cfg.kto.precompute_ref_logps:
        log(f"precomputing reference log-probs ({ref}) for {len(data.train) + len(data.eval)} examples")
        precompute_reference(ref, data.train + data.eval, pad, eval_bs, lambda: autocast_for(cfg.train, device),
                             map_fn=partial(map_over_processes, cfg.train))  # each process a share
        ref = Reference.precomputed("ref_logps/ref_kl_logps on each example")
    step_fn = make_kto_step(cfg, ref)

    def collate(examples):
        return collate_kto_rows(examples, pad)

    def eval_metrics(m, batch):
        out = step_fn(m, batch)
        return batch["label"].shape[0], {"loss": float(out.loss), **out.metrics}

    def eval_fn(m):
        return evaluate(m, data.eval, collate, eval_metrics, eval_bs) if data.eval else None

    result = train_loop(cfg.train, model=model, train_examples=data.train, collate_fn=collate, step_fn=step_fn,
                        run_dir=run_dir, eval_fn=eval_fn, resume=resume, desc="kto")
    finish_run(cfg.train, model, tokenizer, run_dir, result, data.report)
    return result
