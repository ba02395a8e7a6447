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
- Several outputs (``losses.reward.masked_bradley_terry_loss``, loss = sum_{p,h} w_ph l_ph / sum w_ph):
  ``rm.heads`` names objectives (multi-objective: a pair trains only the head of its ``category``, all heads when
  it has none); ``rm.ensemble_mode: heads`` puts K heads on one backbone, each pair weighted per head by a
  Poisson(1) bootstrap count (``rm.bootstrap``).
- ``rm.ensemble_size: K`` with ``rm.ensemble_mode: seeds``: K members trained on seeds ``train.seed + k`` and, with
  ``rm.bootstrap``, a bootstrap resample of the training prompts each; every member is normalised on the same
  reference samples; saved as ONE directory ``<output_dir>/model`` (``ensemble.json`` + ``member_<k>/``,
  ``alignkit.rewards.ensemble``).
- After training: the held-out evaluation of ``alignkit.rewards.evaluation`` (accuracy by category, ECE with a
  reliability plot, length correlation, members' disagreement), printed and written to ``rm_eval.json``.
"""

from __future__ import annotations

import json
from collections import defaultdict

import torch

from alignkit.config import ModelConfig, RMConfig
from alignkit.data.collate import pad_sequences
from alignkit.data.pipeline import prepare_data
from alignkit.io_utils import atomic_write_json
from alignkit.losses import bradley_terry_loss, soft_bradley_terry_loss
from alignkit.losses.reward import masked_bradley_terry_loss
from alignkit.models.loading import load_reward_model, load_tokenizer, save_model
from alignkit.ops.logprobs import position_ids_from_mask
from alignkit.ops.seeds import derive_seed
from alignkit.rewards.ensemble import standardize, write_manifest
from alignkit.rewards.evaluation import format_report, pair_report, plot_reliability
from alignkit.train.checkpoint import latest_checkpoint
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
    out = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "chosen_idx": torch.tensor(chosen_idx),  # [P]
        "rejected_idx": torch.tensor(rejected_idx),  # [P]
        "pair_group": torch.tensor(pair_group),  # [P]
        "margin": torch.tensor(margins),  # [P]
        "label_prob": torch.tensor(label_probs),  # [P] P(chosen better); 1 for a hard label
        "n_groups": len(groups),
    }
    if "head_weight" in groups[0][0]:
        out["head_weight"] = torch.tensor([p["head_weight"] for g in groups for p in g], dtype=torch.float32)  # [P, H]
    return out


def reward_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Raw score at the last real token: [N]. Inputs are right-padded with pad != eos."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask),
                use_cache=False)
    return out.logits[:, 0].float()


def reward_head_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Raw scores of every output at the last real token: [N, H]."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask),
                use_cache=False)
    return out.logits.float()


def multi_head_step(model, batch: dict) -> StepOutput:
    """Several outputs: loss = sum_{p,h} w_ph * BT(r_w,ph - r_l,ph) / sum w_ph (w: category mask or bootstrap)."""
    scores = reward_head_scores(model, batch["input_ids"], batch["attention_mask"])  # [N, H]
    r_w, r_l = scores[batch["chosen_idx"]], scores[batch["rejected_idx"]]  # [P, H]
    w = batch["head_weight"]  # [P, H]
    loss = masked_bradley_terry_loss(r_w, r_l, w).sum() / w.sum().clamp(min=1e-8)
    margins = (r_w - r_l).detach()
    n = float(w.sum())
    return StepOutput(
        loss=loss,
        metrics={"accuracy": (float((w * (margins > 0)).sum()), n), "margin": (float((w * margins).sum()), n)},
        num_tokens=int(batch["attention_mask"].sum()),
    )


def multi_head_pair_metrics(model, batch: dict) -> tuple[int, dict[str, float]]:
    """Held-out: a pair's score is the w-weighted mean of its heads (its category's head; all heads without one)."""
    scores = reward_head_scores(model, batch["input_ids"], batch["attention_mask"])
    w = batch["head_weight"]  # [P, H]
    r_w = (scores[batch["chosen_idx"]] * w).sum(1) / w.sum(1)  # [P]
    r_l = (scores[batch["rejected_idx"]] * w).sum(1) / w.sum(1)
    m = r_w - r_l
    return len(m), {"loss": float(bradley_terry_loss(r_w, r_l).mean()), "accuracy": float((m > 0).float().mean()),
                    "margin": float(m.mean())}


def head_weights(pairs: list[dict], heads: list[str], objectives: bool, bootstrap_seed: int | None) -> list[list[float]]:
    """Per pair and head, the weight of its loss: [P][H].

    ``objectives`` (multi-objective heads): 1 for the head named by the pair's ``category``, 0 for the others (all
    1 when the pair has no category). Otherwise (a heads-ensemble): Poisson(1) counts drawn from
    ``bootstrap_seed`` (the online bootstrap: each head sees its own resample), or all 1 without a seed.
    """
    if objectives:
        out = []
        for i, p in enumerate(pairs):
            c = p.get("category")
            if c is not None and c not in heads:
                raise ValueError(f"rm.heads is {heads} but pair {i} has category {c!r} (from its 'category' or "
                                 "'subset' field); add it to rm.heads or drop those pairs")
            out.append([1.0] * len(heads) if c is None else [float(h == c) for h in heads])
        return out
    if bootstrap_seed is None:
        return [[1.0] * len(heads) for _ in pairs]
    g = torch.Generator().manual_seed(bootstrap_seed)
    return torch.poisson(torch.ones(len(pairs), len(heads)), generator=g).tolist()


def bootstrap_sample(items: list, seed: int) -> list:
    """n items drawn with replacement (a bootstrap resample), reproducible from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return [items[i] for i in torch.randint(len(items), (len(items),), generator=g).tolist()]


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
def score_sequences(model, sequences: list[list[int]], pad_token_id: int, batch_size: int) -> torch.Tensor:
    """Raw scores of every output for token sequences: [N, H]."""
    model.eval()
    device = model_device(model)
    scores = []
    for chunk in batches(sequences, batch_size):
        ids = pad_sequences(chunk, pad_token_id, side="right")
        lengths = torch.tensor([len(s) for s in chunk])
        mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
        batch = to_device({"input_ids": ids, "attention_mask": mask}, device)
        scores.append(reward_head_scores(model, batch["input_ids"], batch["attention_mask"]).cpu())
    return torch.cat(scores)


def normalization_stats(model, sequences: list[list[int]], pad_token_id: int, batch_size: int) -> dict:
    """gain/bias so that gain*score + bias has mean 0, std 1 on ``sequences`` (floats; lists, one per head, for a
    model with several outputs)."""
    s = score_sequences(model, sequences, pad_token_id, batch_size)  # [N, H]
    mean, std = s.mean(0), s.std(0).clamp(min=1e-6)  # [H]
    gain, bias = (t.tolist() for t in standardize(s.T))  # each head (ensemble member) on the same reference samples
    if s.shape[1] == 1:
        return {"gain": gain[0], "bias": bias[0], "raw_mean": float(mean[0]), "raw_std": float(std[0]), "n": len(s)}
    return {"gain": gain, "bias": bias, "raw_mean": mean.tolist(), "raw_std": std.tolist(), "n": len(s)}


def pair_scores(model, pairs: list[dict], pad_token_id: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw scores of every output for the chosen and the rejected response of each pair: ([P, H], [P, H])."""
    s = score_sequences(model, [p["chosen_input_ids"] for p in pairs] + [p["rejected_input_ids"] for p in pairs],
                        pad_token_id, batch_size)
    return s[: len(pairs)], s[len(pairs):]


def _norm_tensors(stats: dict | None, H: int) -> tuple[torch.Tensor, torch.Tensor]:
    if stats is None:
        return torch.ones(H), torch.zeros(H)
    return (torch.as_tensor(stats["gain"], dtype=torch.float32).flatten(),
            torch.as_tensor(stats["bias"], dtype=torch.float32).flatten())


def _reference_sequences(cfg: RMConfig, data, tokenizer) -> list[list[int]]:
    """The reference samples of the normalisation: ``rm.normalize_data``, or each distinct train response once."""
    if cfg.rm.normalize_data:
        norm_data = prepare_data(cfg.data.model_copy(update={"train": cfg.rm.normalize_data, "eval": None,
                                                             "eval_fraction": 0.0}), "sft", tokenizer, 0, log)
        return [e["input_ids"] for e in norm_data.train]
    # each distinct response once (with all K-choose-2 pairs a response appears in K - 1 of them)
    return [list(t) for t in dict.fromkeys(tuple(p[k]) for p in data.train
                                           for k in ("chosen_input_ids", "rejected_input_ids"))]


def _train_one(cfg: RMConfig, run_dir, tokenizer, train_pairs: list[dict], eval_pairs: list[dict],
               head_names: list[str] | None, seed: int, resume: bool, ref_seqs, desc: str, bootstrap_seed=None):
    """Train one reward model (one output or several) in ``run_dir``; returns (result, model, norm stats)."""
    set_seed(seed)
    model = load_reward_model(cfg.model, tokenizer, head_names=head_names)
    pad = tokenizer.pad_token_id
    train_groups = group_pairs(train_pairs, cfg.rm.group_by_prompt)
    if bootstrap_seed is not None:
        train_groups = bootstrap_sample(train_groups, bootstrap_seed)
    eval_groups = group_pairs(eval_pairs, False)
    log(f"{desc}: {len(train_pairs)} pairs in {len(train_groups)} training elements "
        f"({'all pairs of a prompt together' if cfg.rm.group_by_prompt else 'one pair each'}"
        f"{', bootstrap resample' if bootstrap_seed is not None else ''})")

    def collate(groups):
        return collate_groups(groups, pad)

    eval_bs = cfg.train.eval_batch_size or cfg.train.batch_size
    metrics_fn = multi_head_pair_metrics if head_names else pair_metrics

    def eval_fn(m):
        return evaluate(m, eval_groups, collate, metrics_fn, eval_bs) if eval_groups else None

    step = multi_head_step if head_names else make_rm_step(cfg.rm.margin)
    result = train_loop(
        cfg.train.model_copy(update={"seed": seed}), model=model, train_examples=train_groups, collate_fn=collate,
        step_fn=step, run_dir=run_dir, eval_fn=eval_fn, resume=resume, desc=desc,
    )
    stats = None
    if ref_seqs is not None:
        stats = normalization_stats(model, ref_seqs, pad, eval_bs)
        getattr(model, "module", model).config.alignkit_reward_norm = {"gain": stats["gain"], "bias": stats["bias"]}
        result["normalization"] = stats
        log(f"{desc}: score normalisation: raw mean {stats['raw_mean']} std {stats['raw_std']} over {stats['n']} "
            "responses")
    return result, model, stats


def _eval_scores(model, stats, pairs, pad, bs, weights=None):
    """Held-out raw and normalised scores, [H', P] each for chosen and rejected (``weights`` [P, H] pick/average
    the heads of each pair: H' = 1)."""
    c, r = pair_scores(model, pairs, pad, bs)  # [P, H]
    gain, bias = _norm_tensors(stats, c.shape[1])
    nc, nr = c * gain + bias, r * gain + bias
    if weights is not None:
        w = torch.tensor(weights)  # [P, H]
        c, r, nc, nr = ((x * w).sum(1, keepdim=True) / w.sum(1, keepdim=True) for x in (c, r, nc, nr))
    return c.T, r.T, nc.T, nr.T


def train(cfg: RMConfig, resume: bool = False) -> dict:
    run_dir = prepare_run_dir(cfg, cfg.train.output_dir, resume, "reward model")
    set_seed(cfg.train.seed)
    tokenizer = load_tokenizer(cfg.model.name_or_path)
    data = prepare_data(cfg.data, "preference", tokenizer, cfg.train.seed, log)
    rm, pad = cfg.rm, tokenizer.pad_token_id
    K = rm.ensemble_size
    eval_bs = cfg.train.eval_batch_size or cfg.train.batch_size
    main = is_main_process(cfg.train)
    ensemble = K > 1
    ref_seqs = _reference_sequences(cfg, data, tokenizer) if (rm.normalize or ensemble) else None
    head_names = list(rm.heads) if rm.heads else ([f"member_{k}" for k in range(K)]
                                                  if ensemble and rm.ensemble_mode == "heads" else None)
    eval_weights = None
    if head_names:
        objectives = bool(rm.heads)
        boot = derive_seed(cfg.train.seed) if (not objectives and rm.bootstrap) else None
        for p, w in zip(data.train, head_weights(data.train, head_names, objectives, boot)):
            p["head_weight"] = w
        eval_weights = head_weights(data.eval, head_names, objectives, None)
        for p, w in zip(data.eval, eval_weights):
            p["head_weight"] = w
        if not objectives:
            eval_weights = None  # a heads-ensemble: every head is a member
    model_dir = run_dir / "model"
    chosen, rejected, norm_c, norm_r = [], [], [], []

    if ensemble and rm.ensemble_mode == "seeds":
        member_results = []
        for k in range(K):
            member_run = run_dir / "members" / f"member_{k}"
            member_run.mkdir(parents=True, exist_ok=True)
            saved = model_dir / f"member_{k}"
            if resume and (member_run / "summary.json").is_file() and saved.is_dir():
                log(f"rm --resume: member {k} already trained; reusing {saved}")
                res = json.loads((member_run / "summary.json").read_text(encoding="utf-8"))
                model = load_reward_model(ModelConfig(name_or_path=str(saved)), tokenizer, trainable=False)
                stats = res.get("normalization")
            else:
                res, model, stats = _train_one(
                    cfg, member_run, tokenizer, data.train, data.eval, None, cfg.train.seed + k,
                    resume and latest_checkpoint(member_run) is not None, ref_seqs, f"rm member {k}/{K}",
                    bootstrap_seed=derive_seed(cfg.train.seed, k) if rm.bootstrap else None)
                if main:
                    model_dir.mkdir(parents=True, exist_ok=True)
                    save_model(model, tokenizer, saved)
                    write_summary(member_run, {**res, "model_dir": str(saved)})
            member_results.append(res)
            if data.eval:
                c, r, nc, nr = _eval_scores(model, stats, data.eval, pad, eval_bs)
                chosen.append(c)
                rejected.append(r)
                norm_c.append(nc)
                norm_r.append(nr)
            del model
        result = {"members": member_results, "ensemble_size": K, "ensemble_mode": "seeds"}
        if main:
            write_manifest(model_dir, "seeds", [{"path": f"member_{k}", "head": 0} for k in range(K)],
                           {"bootstrap": rm.bootstrap, "seeds": [cfg.train.seed + k for k in range(K)]})
    else:
        result, model, stats = _train_one(cfg, run_dir, tokenizer, data.train, data.eval, head_names,
                                          cfg.train.seed, resume, ref_seqs, "rm")
        if data.eval:
            c, r, nc, nr = _eval_scores(model, stats, data.eval, pad, eval_bs, eval_weights)
            chosen, rejected, norm_c, norm_r = [c], [r], [nc], [nr]
        if cfg.train.save_model and main:
            if ensemble:  # K heads on one backbone: the ensemble directory holds it once
                model_dir.mkdir(parents=True, exist_ok=True)
                save_model(model, tokenizer, model_dir / "backbone")
                write_manifest(model_dir, "heads", [{"path": "backbone", "head": k} for k in range(K)],
                               {"bootstrap": rm.bootstrap})
            else:
                save_model(model, tokenizer, model_dir)
        if ensemble:
            result.update(ensemble_size=K, ensemble_mode="heads")
        if rm.heads:
            result["heads"] = list(rm.heads)
    if cfg.train.save_model or (ensemble and rm.ensemble_mode == "seeds"):
        result["model_dir"] = str(model_dir)
    result["data"] = data.report
    if chosen:
        report = pair_report(torch.cat(chosen), torch.cat(rejected), [p.get("category") for p in data.eval],
                             torch.tensor([float(sum(p["chosen_response_mask"])) for p in data.eval]),
                             torch.tensor([float(sum(p["rejected_response_mask"])) for p in data.eval]),
                             torch.cat(norm_c), torch.cat(norm_r))
        if main:
            report["reliability_plot"] = str(plot_reliability(report["reliability"], run_dir / "reliability.png"))
            atomic_write_json(run_dir / "rm_eval.json", report, indent=2)
        result["rm_eval"] = {k: v for k, v in report.items() if k != "reliability"}
        log(format_report(report))
    if main:
        write_summary(run_dir, result)
    if result.get("eval"):
        log(f"reward model held-out accuracy {result['eval'].get('accuracy', float('nan')):.3f}, "
            f"margin {result['eval'].get('margin', float('nan')):.3f}")
    return result
