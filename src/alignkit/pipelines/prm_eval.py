"""``alignkit prm-eval``: does process supervision pick better solutions than outcome supervision or voting?

On chained arithmetic (``data.chains``) with the policy ``model``:

1. sample ``train_samples`` solutions of each training problem; split them into steps (one per line) and label
   each step with the rule verifier (``rewards.steps.verify_chain_steps``) or Math-Shepherd Monte-Carlo rollouts
   (``labels: mc_hard | mc_soft``), and each solution with its outcome (last number = answer);
2. train a PRM (``alignkit prm`` on the step labels) and an outcome RM (the same token classifier trained on the
   whole solution as ONE step with the outcome label, the ORM of Lightman et al. 2023 sec. 2.5), both from the
   policy's checkpoint;
3. sample max(ns) solutions of each held-out problem and report, for each n in ``ns``, the accuracy of
   best-of-n by the ORM, best-of-n by the PRM (min / product / last-step aggregation), majority vote over final
   answers, and pass@n (the ceiling); best-of-n uses the unbiased estimator over all size-n subsets
   (``eval.bon.bon_unbiased_estimate`` with the correctness as the gold score);
4. optionally (``beam_width > 0``) PRM-guided step-level beam search.

Writes ``summary.json`` (the table under ``"accuracy"``), ``accuracy_vs_n.png``, the labelled data and samples.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from alignkit.algorithms import prm as prm_algo
from alignkit.config import GenerationSection, ModelConfig, PRMConfig, PRMEvalConfig, StepwiseDataConfig
from alignkit.data.chains import chain_arithmetic_problems
from alignkit.data.tokenize import encode, render_prompt, split_steps
from alignkit.eval.bon import bon_unbiased_estimate
from alignkit.eval.policy import sample
from alignkit.eval.voting import majority_vote_accuracy, pass_at_n
from alignkit.io_utils import atomic_save_figure, atomic_write_text
from alignkit.models.loading import load_policy, load_tokenizer
from alignkit.rewards.prm import aggregate_steps, load_prm_scorer
from alignkit.rewards.rules import last_number
from alignkit.rewards.steps import is_correct_answer, mc_step_labels, verify_chain_steps
from alignkit.rollout.backends import make_backend
from alignkit.rollout.engine import SamplingParams, generate_rollouts
from alignkit.rollout.step_search import prefix_text, sampled_step_expander, step_beam_search
from alignkit.train.run import log, prepare_run_dir, set_seed, write_summary

SEPARATOR = "\n"


def as_messages(prompt: str | list[dict]) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def _prompts(problems: list[dict], tokenizer) -> list[dict]:
    """Problems as the prompt dicts generation takes (rendered with the policy's chat template)."""
    out = []
    for p in problems:
        text = render_prompt(tokenizer, as_messages(p["prompt"]))
        out.append({"prompt_input_ids": encode(tokenizer, text), "prompt_text": text, "extras": {"answer": p["answer"]}})
    return out


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return path


def label_samples(problems: list[dict], completions: list[list[str]], step_labels) -> tuple[list[dict], list[dict]]:
    """(PRM records, ORM records) in the stepwise format; a completion without any step is left out.
    ``step_labels(problem, steps) -> labels``."""
    prm_rows, orm_rows = [], []
    for prob, comps in zip(problems, completions):
        for c in comps:
            steps = split_steps(c, SEPARATOR)
            if not steps:
                continue
            prm_rows.append({"prompt": prob["prompt"], "steps": steps, "labels": step_labels(prob, steps)})
            orm_rows.append({"prompt": prob["prompt"], "steps": [SEPARATOR.join(steps)],
                             "labels": [is_correct_answer(c, prob["answer"])]})
    return prm_rows, orm_rows


def mc_labeler(policy, tokenizer, cfg: PRMEvalConfig, mode: str):
    """Math-Shepherd labels from ``cfg.mc_rollouts`` continuations of each step prefix, sampled by the policy."""
    backend = make_backend(GenerationSection(), policy, tokenizer)
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, do_sample=True)

    def labels(prob: dict, steps: list[str]) -> list[float]:
        text = render_prompt(tokenizer, as_messages(prob["prompt"]))

        def continue_from(prefix: list[str], n: int) -> list[str]:
            ids = torch.tensor([encode(tokenizer, prefix_text(text, prefix, SEPARATOR))])
            rollout = generate_rollouts(backend, tokenizer, ids, torch.ones_like(ids), params, num_samples=n)
            return rollout.response_texts

        return mc_step_labels(steps, prob["answer"], continue_from, cfg.mc_rollouts, mode.removeprefix("mc_"),
                              SEPARATOR)

    return labels


def accuracy_table(correct: list[list[bool]], answers: list[list], targets: list, scores: dict[str, torch.Tensor],
                   ns: list[int], seed: int) -> dict[str, list[float]]:
    """Accuracy against n: best-of-n by each scorer in ``scores`` ([P, N]), majority vote, pass@n."""
    gold = torch.tensor(correct, dtype=torch.float64)  # [P, N]
    table: dict[str, list[float]] = {"n": list(ns)}
    table["majority_vote"] = [majority_vote_accuracy(answers, targets, n, seed=seed) for n in ns]
    for name, s in scores.items():
        table[name] = [bon_unbiased_estimate(s, gold, n) for n in ns]
    table["pass@n"] = [pass_at_n(correct, n) for n in ns]
    return table


def plot_accuracy(table: dict[str, list[float]], path: Path, title: str) -> Path:
    """One line per selection rule (pass@n dotted), accuracy against n on a log2 axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, ys in table.items():
        if name == "n":
            continue
        style = {"linestyle": ":", "color": "0.5"} if name == "pass@n" else {"marker": "o"}
        ax.plot(table["n"], ys, label=name, **style)
    ax.set_xscale("log", base=2)
    ax.set_xticks(table["n"], [str(n) for n in table["n"]])
    ax.set_xlabel("n (solutions sampled per problem)")
    ax.set_ylabel("held-out accuracy")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return atomic_save_figure(fig, path, dpi=120)


def _train_rm(cfg: PRMEvalConfig, data: Path, out: Path) -> dict:
    model = ModelConfig(name_or_path=cfg.model.name_or_path, lora=cfg.lora, num_hidden_layers=cfg.model.num_hidden_layers)
    rm_cfg = PRMConfig(model=model, data=StepwiseDataConfig(train=str(data), max_length=512, step_separator=SEPARATOR),
                       train=cfg.train.model_copy(update={"output_dir": str(out), "seed": cfg.seed}))
    return prm_algo.train(rm_cfg)


def run(cfg: PRMEvalConfig, resume: bool = False) -> dict:
    t0 = time.time()
    run_dir = prepare_run_dir(cfg, cfg.output_dir, resume, "prm-eval")
    set_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model.name_or_path, padding_side="left")
    policy = load_policy(cfg.model, tokenizer, trainable=False)
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, do_sample=True)
    kw = {"n_ops": cfg.n_ops, "max_operand": cfg.max_operand}
    train_probs = chain_arithmetic_problems("train", cfg.n_train_problems, cfg.seed, **kw)
    test_probs = chain_arithmetic_problems("test", cfg.n_test_problems, cfg.seed, **kw)

    # 1. the policy's own solutions to the training problems, labelled step by step and by outcome
    log(f"prm-eval: sampling {cfg.train_samples} solutions of {len(train_probs)} training problems")
    rollout = sample(policy, tokenizer, _prompts(train_probs, tokenizer), params, cfg.train_samples,
                     cfg.generation_batch_size, cfg.seed, desc="train samples")
    k = cfg.train_samples
    train_comps = [rollout.response_texts[i * k : (i + 1) * k] for i in range(len(train_probs))]
    if cfg.labels == "verifier":
        def step_labels(prob, steps):
            return verify_chain_steps(steps, prob["start"], prob["ops"])
    else:
        step_labels = mc_labeler(policy, tokenizer, cfg, cfg.labels)
    prm_rows, orm_rows = label_samples(train_probs, train_comps, step_labels)
    if not prm_rows:
        raise ValueError("prm-eval: no sampled training solution has any step; raise max_new_tokens or check the model")
    data_dir = run_dir / "data"
    prm_file = _write_jsonl(data_dir / "prm_train.jsonl", prm_rows)
    orm_file = _write_jsonl(data_dir / "orm_train.jsonl", orm_rows)
    n_steps = sum(len(r["labels"]) for r in prm_rows)
    label_stats = {"solutions": len(prm_rows), "steps": n_steps,
                   "steps_correct": sum(float(v) for r in prm_rows for v in r["labels"]) / n_steps,
                   "solutions_correct": sum(r["labels"][0] for r in orm_rows) / len(orm_rows)}
    log(f"prm-eval: {label_stats['solutions']} labelled solutions, {n_steps} steps; "
        f"{label_stats['steps_correct']:.1%} of steps and {label_stats['solutions_correct']:.1%} of solutions correct")

    # 2. PRM on the step labels, ORM on the outcomes
    prm_result = _train_rm(cfg, prm_file, run_dir / "prm")
    orm_result = _train_rm(cfg, orm_file, run_dir / "orm")
    prm = load_prm_scorer(str(run_dir / "prm" / "model"))
    orm = load_prm_scorer(str(run_dir / "orm" / "model"))

    # 3. held-out problems: N samples each, scored every way
    N = max(cfg.ns)
    test_prompts = _prompts(test_probs, tokenizer)
    log(f"prm-eval: sampling {N} solutions of {len(test_probs)} held-out problems")
    rollout = sample(policy, tokenizer, test_prompts, params, N, cfg.generation_batch_size, cfg.seed + 1,
                     desc="test samples")
    texts = rollout.response_texts
    prompts_rep = [p["prompt_text"] for p in test_prompts for _ in range(N)]
    steps = [split_steps(t, SEPARATOR) for t in texts]
    step_scores = prm.score_steps(prompts_rep, steps)
    orm_scores = orm.score_steps(prompts_rep, [[SEPARATOR.join(s)] if s else [] for s in steps])
    scores = {"orm": aggregate_steps(orm_scores, "last").view(-1, N)}
    for how in cfg.prm_aggregations:
        scores[f"prm_{how}"] = aggregate_steps(step_scores, how).view(-1, N)
    correct = [[is_correct_answer(texts[i * N + j], p["answer"]) for j in range(N)] for i, p in enumerate(test_probs)]
    answers = [[last_number(texts[i * N + j]) for j in range(N)] for i in range(len(test_probs))]
    targets = [last_number(p["answer"]) for p in test_probs]
    ns = sorted(set(cfg.ns))
    table = accuracy_table(correct, answers, targets, scores, ns, cfg.seed)
    _write_jsonl(data_dir / "test_samples.jsonl", [
        {"problem": p["problem"], "answer": p["answer"], "completion": texts[i * N + j], "correct": correct[i][j],
         "step_scores": step_scores[i * N + j], "orm_score": (orm_scores[i * N + j] or [None])[0]}
        for i, p in enumerate(test_probs) for j in range(N)])

    summary = {"accuracy": table, "labels": cfg.labels, "label_stats": label_stats,
               "prm_eval": prm_result.get("eval"), "orm_eval": orm_result.get("eval"),
               "n_train_problems": len(train_probs), "n_test_problems": len(test_probs), "samples_per_test_problem": N}

    # 4. PRM-guided step-level beam search (optional)
    if cfg.beam_width > 0:
        expand = sampled_step_expander(make_backend(GenerationSection(), policy, tokenizer), tokenizer,
                                       dataclasses.replace(params, max_new_tokens=24), SEPARATOR)

        def score(prompts, partial):
            return aggregate_steps(prm.score_steps(prompts, partial), "min").tolist()

        best = step_beam_search([p["prompt_text"] for p in test_prompts], expand, score, cfg.beam_width,
                                cfg.beam_expand, max_steps=cfg.n_ops + 2, separator=SEPARATOR)
        hits = [is_correct_answer(SEPARATOR.join(b.steps), p["answer"]) for b, p in zip(best, test_probs)]
        summary["beam_search"] = {"beam_width": cfg.beam_width, "expand_per_beam": cfg.beam_expand,
                                  "accuracy": sum(hits) / len(hits)}

    plot = plot_accuracy(table, run_dir / "accuracy_vs_n.png",
                         f"{cfg.model.name_or_path}: {len(test_probs)} held-out {cfg.n_ops}-step problems, "
                         f"labels: {cfg.labels}")
    summary.update(plot=str(plot), time_s=time.time() - t0)
    write_summary(run_dir, summary)
    log("prm-eval: accuracy against n\n" + format_table(table))
    return summary


def format_table(table: dict[str, list[float]]) -> str:
    names = [k for k in table if k != "n"]
    lines = ["n".rjust(4) + "".join(name.rjust(15) for name in names)]
    for i, n in enumerate(table["n"]):
        lines.append(str(n).rjust(4) + "".join(f"{table[name][i]:15.3f}" for name in names))
    return "\n".join(lines)
