"""Online (iterative) DPO: sample pairs from the CURRENT policy, label them with a reward, take DPO steps.

Guo et al. (2024), "Direct Language Model Alignment from Online AI Feedback"; Xiong et al. (2024),
"Iterative Preference Learning from Human Feedback"; Rafailov et al. (2023) for the loss. Each round:

1. draw ``prompts_per_round`` prompts and sample ``num_generations`` completions per prompt from the current
   policy; score them with ``reward`` (+ missing-EOS penalty);
2. pair the best (y_w) with the worst (y_l) of each group; a group whose best and worst scores tie carries no
   preference and is skipped (counted and logged as ``n_ties``);
3. take ``steps_per_round`` optimizer steps of the DPO (or IPO) loss against pi_ref = the initial policy:

       h = (log pi(y_w) - log pi(y_l)) - (log pi_ref(y_w) - log pi_ref(y_l))
       DPO: -log sigma(beta h)         IPO: (h - 1 / (2 beta))^2

   with summed token log-probs from ONE forward over the concatenated [chosen; rejected] batch; the
   reference log-probs of a round's pairs are computed once. Batching, accumulation, clipping, checkpoints
   (one per round) and exact resume are ``online.OnlineRun``'s.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from alignkit.config import OnlineDPOConfig
from alignkit.data.collate import collate_preference
from alignkit.losses import PREFERENCE_LOSSES
from alignkit.online.run import OnlineRun
from alignkit.ops.logprobs import sequence_logprobs
from alignkit.ops.seeds import derive_seed
from alignkit.rollout.engine import Rollout
from alignkit.train.loop import StepOutput
from alignkit.train.run import to_device


def best_worst_pairs(scores: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """[P, G] scores -> (chosen [P], rejected [P], is_pair [P] bool): argmax and argmin of each group (first
    index on ties); ``is_pair`` is False where max == min (a tie: no preference to learn from)."""
    if scores.dim() != 2 or scores.shape[1] < 2:
        raise ValueError(f"scores must be [P, G] with G >= 2 samples per prompt, got {tuple(scores.shape)}")
    chosen, rejected = scores.argmax(dim=1), scores.argmin(dim=1)  # [P], [P]
    rows = torch.arange(scores.shape[0])
    return chosen, rejected, scores[rows, chosen] > scores[rows, rejected]


def row_tokens(rollout: Rollout, b: int) -> tuple[list[int], list[int]]:
    """Real prompt tokens and response tokens (up to and including EOS) of rollout row ``b``."""
    return (rollout.prompt_ids[b][rollout.prompt_mask[b].bool()].tolist(),
            rollout.response_ids[b][rollout.response_mask[b].bool()].tolist())


def pair_example(rollout: Rollout, w: int, l: int) -> dict:
    """A token-exact preference example (the sampled tokens, not a re-tokenisation) for ``collate_preference``."""
    prompt, y_w = row_tokens(rollout, w)
    _, y_l = row_tokens(rollout, l)
    return {"chosen_input_ids": prompt + y_w, "chosen_response_mask": [0] * len(prompt) + [1] * len(y_w),
            "rejected_input_ids": prompt + y_l, "rejected_response_mask": [0] * len(prompt) + [1] * len(y_l)}


def concatenated_logps(model, batch: dict) -> tuple[Tensor, Tensor]:
    """One forward over [chosen; rejected] ([2B, T]) -> summed response log-probs (chosen [B], rejected [B])."""
    logps = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"])  # [2B]
    n = logps.shape[0] // 2
    return logps[:n], logps[n:]


def collate_with_ref(examples: list[dict], pad_token_id: int) -> dict:
    batch = collate_preference(examples, pad_token_id)  # [2B, T]
    for key in ("ref_chosen_logps", "ref_rejected_logps"):
        batch[key] = torch.tensor([e[key] for e in examples])  # [B]
    return batch


def make_dpo_step(loss_fn, beta: float):
    def dpo_step(model, batch: dict) -> StepOutput:
        policy_chosen_logps, policy_rejected_logps = concatenated_logps(model, batch)  # [B], [B]
        out = loss_fn(policy_chosen_logps, policy_rejected_logps, batch["ref_chosen_logps"],
                      batch["ref_rejected_logps"], beta=beta)
        margins = (out.chosen_rewards - out.rejected_rewards).detach()  # [B]
        return StepOutput(loss=out.losses.mean(), metrics={
            "rewards/chosen": out.chosen_rewards.mean(), "rewards/rejected": out.rejected_rewards.mean(),
            "rewards/margins": margins.mean(), "rewards/accuracies": (margins > 0).float().mean(),
            "logps/chosen": policy_chosen_logps.detach().mean(), "logps/rejected": policy_rejected_logps.detach().mean(),
        })

    return dpo_step


def train(cfg: OnlineDPOConfig, resume: bool = False) -> dict:
    odpo, G = cfg.online_dpo, cfg.online_dpo.num_generations
    run = OnlineRun.start(cfg, f"online {odpo.loss}", resume, total_steps=odpo.rounds * odpo.steps_per_round,
                          reference=True)
    clash = sorted(set(run.reward.names) & {"chosen", "rejected", "margins", "accuracies"})
    if clash:
        raise ValueError(f"reward component name(s) {clash} clash with DPO's rewards/<name> metrics; rename them")
    pad = run.tokenizer.pad_token_id
    collate = partial(collate_with_ref, pad_token_id=pad)
    dpo_step = make_dpo_step(PREFERENCE_LOSSES[odpo.loss].fn, odpo.beta)
    run.evaluate_before()
    for round_idx in run.iterations(odpo.rounds):
        batch = run.sample(*run.next_prompts(odpo.prompts_per_round), num_samples=G)
        scores = batch.rewards.view(-1, G)  # [P, G]
        chosen, rejected, is_pair = best_worst_pairs(scores)
        pairs = torch.nonzero(is_pair).flatten().tolist()
        examples = [pair_example(batch.rollout, i * G + int(chosen[i]), i * G + int(rejected[i])) for i in pairs]
        for start in range(0, len(examples), cfg.train.batch_size):  # reference log-probs once per round
            chunk = examples[start : start + cfg.train.batch_size]
            with run.autocast():
                ref_c, ref_r = run.reference.logprobs(
                    concatenated_logps, to_device(collate_preference(chunk, pad), run.device))
            for e, c, r in zip(chunk, ref_c.tolist(), ref_r.tolist()):
                e["ref_chosen_logps"], e["ref_rejected_logps"] = c, r
        dummy = {**pair_example(batch.rollout, 0, 0), "ref_chosen_logps": 0.0, "ref_rejected_logps": 0.0}
        stats = run.fit(examples, collate, dpo_step, steps=odpo.steps_per_round, dummy=dummy,
                        seed=derive_seed(cfg.train.seed, round_idx))
        rows = torch.arange(scores.shape[0])
        stats.update({"steps": stats.get("steps", 0), "n_pairs": len(examples), "n_ties": int((~is_pair).sum()), "objective/scores": float(scores.mean()),
                      **{k: v for k, v in batch.stats().items() if k != "scores"}})
        if examples:  # no chosen/rejected scores in a round where every group tied
            stats.update({"scores/chosen": float(scores[rows, chosen][is_pair].mean()),
                          "scores/rejected": float(scores[rows, rejected][is_pair].mean())})
        run.end_iteration(round_idx, stats, save_every=1, history=True)
    history = run.state.get("history", [])
    return run.finish({"rounds": odpo.rounds, "global_step": sum(h["steps"] for h in history), "history": history, "n_pairs": sum(h["n_pairs"] for h in history),
                       "n_ties": sum(h["n_ties"] for h in history)})
