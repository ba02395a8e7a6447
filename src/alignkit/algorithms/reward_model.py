"""Reward model from pairwise preferences (InstructGPT step 2; Stiennon et al. 2020).

    loss = -log sigma(r(x, y_w) - r(x, y_l))                         (Bradley–Terry)

- Soft labels: a record's ``label_prob`` p = P(chosen better) (e.g. an AI judge's, Constitutional AI) trains
  -[p log sigma(r_w - r_l) + (1 - p) log sigma(r_l - r_w)]; without it p = 1 (the hard loss above).

- The score is the model's single output at the last real token of prompt+response.
- InstructGPT batching (``rm.group_by_prompt``): the K-choose-2 pairs of one prompt form ONE
  batch element; each distinct response is scored once and the loss is the mean over the
  prompt's pairs (Ouyang et al. 2022, sec. 3.5: avoids overfitting from seeing a response
  in several pairs of different batches).
- Held-out metrics: accuracy = frac(r_w > r_l), mean margin r_w - r_l.
- ``rm.normalize``: gain/bias so reference samples score mean 0, std 1, stored in the saved
  config as ``alignkit_reward_norm`` (applied by ``alignkit.rewards`` scorers).
"""

from __future__ import annotations

from collections import defaultdict

import torch

from alignkit.config import RMConfig
from alignkit.data.collate import pad_sequences
from alignkit.data.pipeline import prepare_data
from alignkit.losses import bradley_terry_loss, soft_bradley_terry_loss
from alignkit.models.loading import load_reward_model, load_tokenizer, save_model
from alignkit.ops.logprobs import position_ids_from_mask
from alignkit.train.loop import StepOutput, is_main_process, train_loop
from alignkit.train.run import batches, evaluate, log, model_device, prepare_run_dir, set_seed, to_device, write_summary


def group_pairs(pairs: list[dict], by_prompt: bool) -> list[list[dict]]:
    """One training example = all pairs of one prompt (InstructGPT) or a single pair.

    Pairs share a prompt when they come from one ranking record or when their rendered prompt text is equal.
    """
    if not by_prompt:
        return [[p] for p in pairs]
    groups: dict[object, list[dict]] = defaultdict(list)
    for p in pairs:
        groups[p.get("prompt_text", ("group", p["group"]))].append(p)
    return list(groups.values())


def collate_groups(groups: list[list[dict]], pad_token_id: int) -> dict:
    """Distinct responses of the batch -> [N, T]; pairs index into them; ``pair_group`` for per-prompt means."""
    index: dict[tuple, int] = {}
    seqs: list[list[int]] = []
    chosen_idx, rejected_idx, pair_group, margins, label_probs = [], [], [], [], []

    def slot(g: int, ids: list[int]) -> int:
        key = (g, tuple(ids))
        if key not in index:
            index[key] = len(seqs)
            seqs.append(ids)
        return index[key]

    for gi, group in enumerate(groups):
        for p in group:
            chosen_idx.append(slot(gi, p["chosen_input_ids"]))
            rejected_idx.append(slot(gi, p["rejected_input_ids"]))
            pair_group.append(gi)
            margins.append(float(p.get("margin", 0.0)))
            label_probs.append(float(p.get("label_prob", 1.0)))
    input_ids = pad_sequences(seqs, pad_token_id, side="right")  # [N, T]
    lengths = torch.tensor([len(s) for s in seqs])
    attention_mask = (torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]).long()
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "chosen_idx": torch.tensor(chosen_idx),  # [P]
        "rejected_idx": torch.tensor(rejected_idx),  # [P]
        "pair_group": torch.tensor(pair_group),  # [P]
        "margin": torch.tensor(margins),  # [P]
        "label_prob": torch.tensor(label_probs),  # [P] P(chosen better); 1 for a hard label
        "n_groups": len(groups),
    }


def reward_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Raw score at the last real token: [N]. Inputs are right-padded with pad != eos."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask),
                use_cache=False)
    return out.logits[:, 0].float()


def make_rm_step(use_margin: bool):
    def rm_step(model, batch: dict) -> StepOutput:
        scores = reward_scores(model, batch["input_ids"], batch["attention_mask"])  # [N]
        r_w, r_l = scores[batch["chosen_idx"]], scores[batch["rejected_idx"]]  # [P]
        if use_margin:
            losses = bradley_terry_loss(r_w, r_l, batch["margin"])  # [P]
        else:  # a hard label (label_prob 1) gives exactly -log sigma(r_w - r_l)
            losses = soft_bradley_terry_loss(r_w, r_l, batch["label_prob"].to(r_w.dtype))  # [P]
        # mean over each prompt's pairs, then over prompts
        n_groups = batch["n_groups"]
        per_group = torch.zeros(n_groups, device=losses.device).index_add(0, batch["pair_group"], losses)
        counts = torch.zeros(n_groups, device=losses.device).index_add(0, batch["pair_group"], torch.ones_like(losses))
        loss = (per_group / counts).mean()
        margins = (r_w - r_l).detach()
        n_pairs = len(margins)
        return StepOutput(
            loss=loss,
            metrics={  # (sum, count): means over the step's pairs (a training element holds 1 or more pairs)
                "accuracy": (float((margins > 0).sum()), n_pairs),
                "margin": (float(margins.sum()), n_pairs),
                "rewards/chosen": (float(r_w.detach().sum()), n_pairs),
                "rewards/rejected": (float(r_l.detach().sum()), n_pairs),
            },
            num_tokens=int(batch["attention_mask"].sum()),
        )

    return rm_step


def pair_metrics(model, batch: dict) -> tuple[int, dict[str, float]]:
    scores = reward_scores(model, batch["input_ids"], batch["attention_mask"])
    r_w, r_l = scores[batch["chosen_idx"]], scores[batch["rejected_idx"]]
    losses = bradley_terry_loss(r_w, r_l)
    m = r_w - r_l
    return len(m), {"loss": float(losses.mean()), "accuracy": float((m > 0).float().mean()), "margin": float(m.mean())}


@torch.no_grad()
def normalization_stats(model, sequences: list[list[int]], pad_token_id: int, batch_size: int) -> dict[str, float]:
    """gain/bias so that gain*score + bias has mean 0, std 1 on ``sequences``."""
    model.eval()
    device = model_device(model)
    scores = []
    for chunk in batches(sequences, batch_size):
        ids = pad_sequences(chunk, pad_token_id, side="right")
        lengths = torch.tensor([len(s) for s in chunk])
        mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
        batch = to_device({"input_ids": ids, "attention_mask": mask}, device)
        scores.append(reward_scores(model, batch["input_ids"], batch["attention_mask"]).cpu())
    s = torch.cat(scores)
    mean, std = float(s.mean()), float(s.std().clamp(min=1e-6))
    return {"gain": 1.0 / std, "bias": -mean / std, "raw_mean": mean, "raw_std": std, "n": len(s)}


def train(cfg: RMConfig, resume: bool = False) -> dict:
    run_dir = prepare_run_dir(cfg, cfg.train.output_dir, resume, "reward model")
    set_seed(cfg.train.seed)
    tokenizer = load_tokenizer(cfg.model.name_or_path)
    data = prepare_data(cfg.data, "preference", tokenizer, cfg.train.seed, log)
    model = load_reward_model(cfg.model, tokenizer)
    pad = tokenizer.pad_token_id
    train_groups = group_pairs(data.train, cfg.rm.group_by_prompt)
    eval_groups = group_pairs(data.eval, False)
    log(f"reward model: {len(data.train)} pairs in {len(train_groups)} training elements "
        f"({'all pairs of a prompt together' if cfg.rm.group_by_prompt else 'one pair each'})")

    def collate(groups):
        return collate_groups(groups, pad)

    eval_bs = cfg.train.eval_batch_size or cfg.train.batch_size

    def eval_fn(m):
        return evaluate(m, eval_groups, collate, pair_metrics, eval_bs) if eval_groups else None

    result = train_loop(
        cfg.train, model=model, train_examples=train_groups, collate_fn=collate, step_fn=make_rm_step(cfg.rm.margin),
        run_dir=run_dir, eval_fn=eval_fn, resume=resume, desc="rm",
    )
    if cfg.rm.normalize:
        if cfg.rm.normalize_data:
            norm_data = prepare_data(cfg.data.model_copy(update={"train": cfg.rm.normalize_data, "eval": None,
                                                                 "eval_fraction": 0.0}), "sft", tokenizer, 0, log)
            seqs = [e["input_ids"] for e in norm_data.train]
        else:
            # each distinct response once (with all K-choose-2 pairs a response appears in K - 1 of them)
            seqs = [list(t) for t in dict.fromkeys(tuple(p[k]) for p in data.train
                                                   for k in ("chosen_input_ids", "rejected_input_ids"))]
        stats = normalization_stats(model, seqs, pad, eval_bs)
        getattr(model, "module", model).config.alignkit_reward_norm = {"gain": stats["gain"], "bias": stats["bias"]}
        result["normalization"] = stats
        log(f"score normalisation: raw mean {stats['raw_mean']:.3f} std {stats['raw_std']:.3f} over {stats['n']} responses")
    if cfg.train.save_model:
        result["model_dir"] = str(run_dir / "model")
        if is_main_process(cfg.train):
            save_model(model, tokenizer, run_dir / "model")
    result["data"] = data.report
    if is_main_process(cfg.train):
        write_summary(run_dir, result)
    if result.get("eval"):
        log(f"reward model held-out accuracy {result['eval'].get('accuracy', float('nan')):.3f}, "
            f"margin {result['eval'].get('margin', float('nan')):.3f}")
    return result
