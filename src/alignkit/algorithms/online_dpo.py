"""Online (iterative) DPO: sample pairs from the CURRENT policy, label them with a reward, take DPO steps.

Guo et al. (2024), "Direct Language Model Alignment from Online AI Feedback"; Xiong et al. (2024),
"Iterative Preference Learning from Human Feedback"; Rafailov et al. (2023) for the loss. Each round:

1. draw ``prompts_per_round`` prompts (seeded, resumable order) and sample ``num_generations``
   completions per prompt from the current policy;
2. score them with ``reward`` (a reward model, a verifier, any combination);
3. pair the best (y_w) with the worst (y_l) of each group; a group whose best and worst scores tie
   carries no preference and is skipped (counted and logged as ``n_ties``);
4. take ``steps_per_round`` optimizer steps of the DPO (or IPO) loss against the reference pi_ref =
   the initial policy (the adapter-disabled policy under LoRA, else a frozen copy):

       h = (log pi(y_w) - log pi(y_l)) - (log pi_ref(y_w) - log pi_ref(y_l))
       DPO: -log sigma(beta h)         IPO: (h - 1 / (2 beta))^2

   with summed token log-probs from ONE forward over the concatenated [chosen; rejected] batch.
   The reference log-probs of a round's pairs are computed once (pi_ref never changes).

Each step uses ``train.grad_accum`` micro-batches of ``train.batch_size`` pairs, drawn in a
fresh seeded permutation of the round's pairs (cycled if the round has fewer pairs than a step needs).
A checkpoint is written after every round; ``--resume`` continues after the last complete one and
gives the same final weights as an uninterrupted run (each round is seeded from (seed, round)).
"""

from __future__ import annotations

import math
import time

import torch
from torch import Tensor
from transformers import get_scheduler

from alignkit.config import OnlineDPOConfig
from alignkit.data.collate import collate_preference
from alignkit.losses import PREFERENCE_LOSSES
from alignkit.models.loading import copy_frozen, is_peft, load_policy, load_tokenizer, reference_context, save_model
from alignkit.ops.logprobs import sequence_logprobs
from alignkit.rewards.combine import apply_missing_eos_penalty, build_reward
from alignkit.rollout.engine import HFGenerateBackend, Rollout, SamplingParams, generate_rollouts
from alignkit.rollout.prompts import PromptSampler, load_prompts, prompt_batch
from alignkit.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from alignkit.train.logging import MetricsLogger
from alignkit.train.run import log, make_accelerator, prepare_run_dir, set_seed, to_device, write_summary


# ---------------------------------------------------------------- pairs from scored groups
def best_worst_pairs(scores: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """[P, G] scores -> (chosen [P], rejected [P], is_pair [P] bool).

    chosen = argmax, rejected = argmin within each group (first index on ties); ``is_pair`` is
    False where max == min (a tie: no preference to learn from).
    """
    if scores.dim() != 2 or scores.shape[1] < 2:
        raise ValueError(f"scores must be [P, G] with G >= 2 samples per prompt, got {tuple(scores.shape)}")
    chosen, rejected = scores.argmax(dim=1), scores.argmin(dim=1)  # [P], [P]
    rows = torch.arange(scores.shape[0])
    is_pair = scores[rows, chosen] > scores[rows, rejected]  # [P]
    return chosen, rejected, is_pair


def row_tokens(rollout: Rollout, b: int) -> tuple[list[int], list[int]]:
    """Real prompt tokens and response tokens (up to and including EOS) of rollout row ``b``."""
    prompt = rollout.prompt_ids[b][rollout.prompt_mask[b].bool()].tolist()
    response = rollout.response_ids[b][rollout.response_mask[b].bool()].tolist()
    return prompt, response


def pair_examples(rollout: Rollout, num_generations: int, chosen: Tensor, rejected: Tensor, is_pair: Tensor) -> list[dict]:
    """Token-exact preference examples (the sampled tokens, not a re-tokenisation) for ``collate_preference``."""
    examples = []
    for i in torch.nonzero(is_pair).flatten().tolist():
        prompt, y_w = row_tokens(rollout, i * num_generations + int(chosen[i]))
        _, y_l = row_tokens(rollout, i * num_generations + int(rejected[i]))
        examples.append({
            "chosen_input_ids": prompt + y_w, "chosen_response_mask": [0] * len(prompt) + [1] * len(y_w),
            "rejected_input_ids": prompt + y_l, "rejected_response_mask": [0] * len(prompt) + [1] * len(y_l),
        })
    return examples


def concatenated_logps(model, batch: dict) -> tuple[Tensor, Tensor]:
    """One forward over [chosen; rejected] ([2B, T]) -> summed response log-probs (chosen [B], rejected [B])."""
    logps = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"])  # [2B]
    n = logps.shape[0] // 2
    return logps[:n], logps[n:]


def round_seed(seed: int, round_idx: int) -> int:
    return (seed * 1_000_003 + round_idx) % (2**63)


# ---------------------------------------------------------------- training
def train(cfg: OnlineDPOConfig, resume: bool = False) -> dict:
    odpo, tcfg = cfg.online_dpo, cfg.train
    run_dir = prepare_run_dir(cfg, tcfg.output_dir, resume, f"online {odpo.loss}")
    set_seed(tcfg.seed)
    accelerator = make_accelerator(tcfg.mixed_precision, tcfg.cpu)
    tokenizer = load_tokenizer(cfg.model.name_or_path)
    prompts = load_prompts(cfg.data, tokenizer, cfg.generation.max_new_tokens, "train", log)
    sampler = PromptSampler(prompts, tcfg.seed)
    model = load_policy(cfg.model, tokenizer)
    ref_model = None if is_peft(model) else copy_frozen(model).to(accelerator.device)  # pi_ref = initial policy
    reward_models: dict = {}
    reward_fn = build_reward(cfg.reward, tokenizer, reward_models)
    clash = sorted(set(reward_fn.names) & {"chosen", "rejected", "margins", "accuracies"})
    if clash:
        raise ValueError(f"reward component name(s) {clash} clash with DPO's rewards/<name> metrics; rename them")
    for scorer in reward_models.values():
        scorer.model.to(accelerator.device)
    params = SamplingParams.from_section(cfg.generation)
    spec = PREFERENCE_LOSSES[odpo.loss]
    pad, G = tokenizer.pad_token_id, odpo.num_generations

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=tcfg.lr, betas=tuple(tcfg.adam_betas), weight_decay=tcfg.weight_decay)
    total_steps = odpo.rounds * odpo.steps_per_round
    scheduler = get_scheduler(tcfg.scheduler, optimizer, num_warmup_steps=tcfg.warmup_steps,
                              num_training_steps=total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    backend = HFGenerateBackend(unwrapped, tokenizer)
    logger = MetricsLogger(run_dir, enabled=accelerator.is_main_process)

    start_round, global_step, history = 0, 0, []
    if resume:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is not None:
            state = load_checkpoint(ckpt, unwrapped, optimizer, scheduler)
            start_round, global_step = state["step"], state["loop_state"]["global_step"]
            sampler.load_state_dict(state["extra_state"]["sampler"])
            history = state["extra_state"]["history"]
            log(f"online dpo: resuming after round {start_round} from {ckpt}")
        else:
            log(f"online dpo: --resume found no checkpoint in {run_dir}; starting at round 1")
    logger.truncate_after(start_round)

    def reference_logps(batch: dict) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            if ref_model is not None:
                return concatenated_logps(ref_model, batch)
            with reference_context(unwrapped):
                return concatenated_logps(model, batch)

    for round_idx in range(start_round, odpo.rounds):
        set_seed(round_seed(tcfg.seed, round_idx))  # the round does not depend on what ran before it
        # ---- 1-2. sample from the current policy, score
        t0 = time.perf_counter()
        batch_prompts = sampler.next(odpo.prompts_per_round)
        pb = prompt_batch(batch_prompts, pad)
        rollout = generate_rollouts(
            backend, tokenizer, pb["input_ids"].to(accelerator.device), pb["attention_mask"].to(accelerator.device),
            params, num_samples=G, prompt_texts=pb["prompt_texts"], extras=pb["extras"],
            batch_size=cfg.generation.batch_size * G,  # generation.batch_size prompts per generate() call
        )
        t1 = time.perf_counter()
        total, parts = reward_fn(rollout.prompt_texts, rollout.response_texts, rollout.extras)
        scores = apply_missing_eos_penalty(total, rollout.has_eos.cpu(), cfg.reward.missing_eos_penalty,
                                           cfg.reward.missing_eos_mode).view(-1, G)  # [P, G]
        t2 = time.perf_counter()

        # ---- 3. best vs. worst pairs; ties skipped and counted
        chosen, rejected, is_pair = best_worst_pairs(scores)
        rows = torch.arange(scores.shape[0])
        score_w, score_l = scores[rows, chosen][is_pair], scores[rows, rejected][is_pair]  # [n_pairs]
        examples = pair_examples(rollout, G, chosen, rejected, is_pair)
        n_pairs, n_ties = len(examples), int((~is_pair).sum())

        # ---- 4. DPO steps against the reference
        sums: dict[str, float] = {}
        steps_done = 0
        if n_pairs:
            for start in range(0, n_pairs, tcfg.batch_size):  # reference log-probs once per round
                chunk = examples[start : start + tcfg.batch_size]
                ref_c, ref_r = reference_logps(to_device(collate_preference(chunk, pad), accelerator.device))
                for e, c, r in zip(chunk, ref_c.tolist(), ref_r.tolist()):
                    e["ref_chosen_logps"], e["ref_rejected_logps"] = c, r
            g = torch.Generator().manual_seed(round_seed(tcfg.seed, round_idx))
            order = torch.randperm(n_pairs, generator=g).tolist()
            per_step = tcfg.batch_size * tcfg.grad_accum
            cursor = 0
            model.train()
            for _ in range(odpo.steps_per_round):
                idx = [order[(cursor + k) % n_pairs] for k in range(min(per_step, n_pairs))]
                cursor += len(idx)
                step_stats: dict[str, float] = {}
                for m in range(0, len(idx), tcfg.batch_size):
                    micro = [examples[i] for i in idx[m : m + tcfg.batch_size]]
                    weight = len(micro) / len(idx)
                    batch = to_device(collate_preference(micro, pad), accelerator.device)  # [2B, T]
                    ref_chosen_logps = torch.tensor([e["ref_chosen_logps"] for e in micro], device=accelerator.device)
                    ref_rejected_logps = torch.tensor([e["ref_rejected_logps"] for e in micro], device=accelerator.device)
                    policy_chosen_logps, policy_rejected_logps = concatenated_logps(model, batch)  # [B], [B]
                    out = spec.fn(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                                  beta=odpo.beta)
                    loss = out.losses.mean()
                    if not math.isfinite(float(loss.detach())):
                        raise ValueError(f"online dpo: non-finite loss at round {round_idx + 1}, step {global_step + 1}")
                    accelerator.backward(loss * weight)
                    margins = out.chosen_rewards - out.rejected_rewards  # [B]
                    for k, v in {
                        "loss": float(loss.detach()),
                        "rewards/chosen": float(out.chosen_rewards.mean()),
                        "rewards/rejected": float(out.rejected_rewards.mean()),
                        "rewards/margins": float(margins.mean()),
                        "rewards/accuracies": float((margins > 0).float().mean()),
                        "logps/chosen": float(policy_chosen_logps.detach().mean()),
                        "logps/rejected": float(policy_rejected_logps.detach().mean()),
                    }.items():
                        step_stats[k] = step_stats.get(k, 0.0) + weight * v
                step_stats["lr"] = scheduler.get_last_lr()[0]
                step_stats["grad_norm"] = float(accelerator.clip_grad_norm_(trainable, tcfg.max_grad_norm or math.inf))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                global_step += 1
                steps_done += 1
                for k, v in step_stats.items():
                    sums[k] = sums.get(k, 0.0) + v
        t3 = time.perf_counter()

        # ---- log the round
        stats = {k: v / steps_done for k, v in sums.items()}  # means over the round's steps
        stats.update({
            "n_pairs": n_pairs,
            "n_ties": n_ties,
            "steps": steps_done,
            "objective/scores": float(scores.mean()),
            "response_length": float(rollout.response_lengths.float().mean()),
            "no_eos_frac": float((~rollout.has_eos).float().mean()),
            "time/generation": t1 - t0,
            "time/scoring": t2 - t1,
            "time/training": t3 - t2,
        })
        if n_pairs:  # no chosen/rejected scores in a round where every group tied
            stats.update({"scores/chosen": float(score_w.mean()), "scores/rejected": float(score_l.mean())})
        stats.update({k: float(v.mean()) for k, v in parts.items()})
        logger.log(stats, round_idx + 1)
        history.append({"round": round_idx + 1, **{k: v for k, v in stats.items() if not k.startswith("time/")}})
        msg = f"online {odpo.loss} round {round_idx + 1}/{odpo.rounds}: score {stats['objective/scores']:.4f}, "
        msg += f"{n_pairs} pairs, {n_ties} ties"
        if n_pairs:
            msg += f", loss {stats['loss']:.4f}, reward acc {stats['rewards/accuracies']:.3f}"
        else:
            msg += " (every group tied: no update this round)"
        log(msg)

        # ---- checkpoint the round (weights, optimizer, scheduler, RNG, prompt order)
        if accelerator.is_main_process:
            save_checkpoint(run_dir, round_idx + 1, unwrapped, optimizer, scheduler,
                            {"global_step": global_step, "round": round_idx + 1},
                            {"sampler": sampler.state_dict(), "history": history})
        accelerator.wait_for_everyone()
    logger.close()

    result = {"rounds": odpo.rounds, "global_step": global_step, "history": history,
              "n_pairs": sum(h["n_pairs"] for h in history), "n_ties": sum(h["n_ties"] for h in history)}
    if tcfg.save_model and accelerator.is_main_process:
        result["model_dir"] = str(save_model(unwrapped, tokenizer, run_dir / "model"))
    write_summary(run_dir, result)
    log(f"online dpo done: {result.get('model_dir', run_dir)}")
    return result
