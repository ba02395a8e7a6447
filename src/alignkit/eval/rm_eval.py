"""``alignkit rm-eval``: a reward model or ensemble on held-out preference pairs.

The same report ``alignkit rm`` prints after training (``alignkit.rewards.evaluation``): accuracy overall and by
category, the expected calibration error of sigma(r_w - r_l) with a reliability plot, the correlation of the score
with response length, and for an ensemble the members' disagreement. Pairs are tokenised as ``alignkit rm`` trained
on them (the reward model's own tokenizer and prompt format). A multi-objective model (``rm.heads``) scores each pair
with the head of its ``category`` (the mean of its heads when the pair has none or another one).

Writes ``rm_eval.json``, ``reliability.png`` and ``summary.json`` to ``output_dir``.
"""

from __future__ import annotations

import torch

from alignkit.config import DataConfig, RMEvalConfig
from alignkit.data.collate import pad_sequences
from alignkit.data.pipeline import prepare_data
from alignkit.io_utils import atomic_write_json
from alignkit.rewards.ensemble import is_ensemble_dir, load_ensemble
from alignkit.rewards.evaluation import format_report, pair_report, plot_reliability
from alignkit.rewards.reward_model import RewardModelScorer, load_reward_model_scorer
from alignkit.train.run import log, prepare_run_dir, write_summary


def _ids(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = pad_sequences(seqs, pad_id, side="right")  # [N, T]
    lengths = torch.tensor([len(s) for s in seqs])
    return ids, (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()


def _head_weights(categories: list[str | None], heads: list[str]) -> torch.Tensor:
    """[P, H]: 1 on the head named by the pair's category, else 1 on every head (their mean)."""
    return torch.tensor([[float(h == c) for h in heads] if c in heads else [1.0] * len(heads) for c in categories])


def run(cfg: RMEvalConfig, resume: bool = False) -> dict:
    missing = [k for k in ("model", "data") if not getattr(cfg, k)]
    if missing:
        raise ValueError(f"rm-eval needs {' and '.join(missing)} (e.g. model=runs/rm/model data=heldout.jsonl)")
    run_dir = prepare_run_dir(cfg, cfg.output_dir, resume, "rm-eval")
    ensemble = is_ensemble_dir(cfg.model)
    if ensemble:
        ens = load_ensemble(cfg.model, batch_size=cfg.batch_size)
        members = ens.members
    else:
        scorer = load_reward_model_scorer(cfg.model, batch_size=cfg.batch_size)
        members = [(scorer, None)]  # None: the head of each pair's category
    tokenizer = members[0][0].tokenizer
    data_cfg = DataConfig(train=cfg.data, eval=cfg.data, max_length=cfg.max_length,
                          max_prompt_length=cfg.max_prompt_length)
    pairs = prepare_data(data_cfg, "preference", tokenizer, 0, log).eval  # builtin data: its test split
    if not pairs:
        raise ValueError(f"rm-eval: no preference pairs in {cfg.data}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    categories = [p.get("category") for p in pairs]
    ids, mask = _ids([p["chosen_input_ids"] for p in pairs] + [p["rejected_input_ids"] for p in pairs], pad)
    P = len(pairs)
    raw_rows, norm_rows, cache = [], [], {}
    for scorer, head in members:
        if id(scorer) not in cache:
            raw = RewardModelScorer(scorer.model, tokenizer, cfg.batch_size, normalize=False).score_heads_ids(ids, mask)
            norm = RewardModelScorer(scorer.model, tokenizer, cfg.batch_size, normalize=True).score_heads_ids(ids, mask)
            cache[id(scorer)] = (raw.cpu(), norm.cpu())  # [2P, H] each
        raw, norm = cache[id(scorer)]
        if head is None:
            w = _head_weights(categories, scorer.head_names)  # [P, H]
            w2 = torch.cat([w, w])  # chosen rows, then rejected rows
            raw_rows.append((raw * w2).sum(1) / w2.sum(1))
            norm_rows.append((norm * w2).sum(1) / w2.sum(1))
        else:
            raw_rows.append(raw[:, head])
            norm_rows.append(norm[:, head])
    raw, norm = torch.stack(raw_rows), torch.stack(norm_rows)  # [K, 2P]
    report = pair_report(raw[:, :P], raw[:, P:], categories,
                         torch.tensor([float(sum(p["chosen_response_mask"])) for p in pairs]),
                         torch.tensor([float(sum(p["rejected_response_mask"])) for p in pairs]),
                         norm[:, :P], norm[:, P:], n_bins=cfg.n_bins)
    report["model"], report["data"] = cfg.model, cfg.data
    report["reliability_plot"] = str(plot_reliability(report["reliability"], run_dir / "reliability.png"))
    atomic_write_json(run_dir / "rm_eval.json", report, indent=2)
    write_summary(run_dir, {k: v for k, v in report.items() if k != "reliability"})
    text = format_report(report, f"rm-eval {cfg.model}")
    log(text)
    return report
