"""``alignkit overopt``: reward over-optimisation in miniature (Gao, Schulman & Hilton 2023).

On the quickstart's sentiment task, with VADER as the gold reward:

    policy --K samples/prompt--> every pair labelled by gold (ties dropped): the label pool
    pool --nested random subsets of label_sizes pairs--> one proxy reward model per size (``alignkit rm``)
    pool --ensemble_labels pairs--> an ensemble proxy (K members: seeds + bootstrap; ``rm.ensemble_size``)
    for each proxy:
      best-of-n on N held-out samples per prompt, n = 1..N: unbiased gold/proxy estimates (``eval.bon``),
          KL = log n - (n - 1)/n
      PPO against it (``alignkit ppo``, the quickstart's settings), a checkpoint every rl_eval_every iterations;
          each checkpoint sampled on the held-out prompts: gold, proxy and KL(pi || pi_init) measured from samples
    gold and proxy against d = sqrt(KL), relative to the initial policy, with Gao et al.'s functional forms fitted
    by least squares (:func:`fit_bon`, :func:`fit_rl`): BoN gold = d (alpha - beta d), RL gold = d (alpha - beta log d)
    and a statement, computed from the measured points, of whether the ensemble's gold peak came later (larger d)
    and/or higher than the single proxy's.

Every training stage is an ordinary alignkit run inside ``output_dir`` (``rm_<size>/``, ``ensemble/``, ``ppo_<proxy>/``).
Writes ``summary.json``, ``summary.md`` and ``overopt.png``.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from transformers import AutoConfig

from alignkit.config import (
    DataConfig, GenerationSection, LoraConfig, ModelConfig, OverOptConfig, PPOConfig, PPOSection, RewardComponent,
    RewardSection, RLDataConfig, RMConfig, RMSection, TrainConfig,
)
from alignkit.data.builtin import sentiment_prompts
from alignkit.eval.bon import bon_curve
from alignkit.eval.policy import evaluate_policy, sample, scores_in_chunks
from alignkit.io_utils import atomic_save_figure, atomic_write_json, atomic_write_text
from alignkit.models.loading import load_policy, load_tokenizer, resolve_path
from alignkit.pipelines.quickstart import LLAMA_LINEAR, gold_function, gold_pairs
from alignkit.rewards.combine import build_reward
from alignkit.rollout.engine import SamplingParams
from alignkit.rollout.prompts import load_prompts
from alignkit.train.checkpoint import WEIGHTS_NAME, list_checkpoints
from alignkit.train.run import RunError, log, prepare_run_dir, resolve_mixed_precision

MARKER = "overopt.json"


# ---------------------------------------------------------------- Gao et al.'s functional forms (pure)
def r_squared(y: np.ndarray, y_hat: np.ndarray) -> float:
    """R^2 = 1 - SS_res / SS_tot (1.0 for a perfect fit; nan when y is constant)."""
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return 1.0 - float(((y - y_hat) ** 2).sum()) / ss_tot if ss_tot > 0 else float("nan")


def _fit(design: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    (alpha, beta), *_ = np.linalg.lstsq(design, y, rcond=None)
    return float(alpha), float(beta), r_squared(y, design @ np.array([alpha, beta]))


def fit_bon(d, gold) -> dict:
    """Least squares of gold(d) - gold(0) = d (alpha - beta d) = alpha d - beta d^2 (Gao et al. 2023, eq. 1; d =
    sqrt(KL)). The peak (beta > 0) is at d* = alpha / (2 beta), gold* = alpha^2 / (4 beta)."""
    d, y = np.asarray(d, dtype=float), np.asarray(gold, dtype=float)
    alpha, beta, r2 = _fit(np.stack([d, -d * d], axis=1), y)
    out = {"alpha": alpha, "beta": beta, "r2": r2}
    if beta > 0:
        out.update(peak_d=alpha / (2 * beta), peak_gold=alpha * alpha / (4 * beta))
    return out


def fit_rl(d, gold) -> dict:
    """Least squares of gold(d) - gold(0) = d (alpha - beta log d) = alpha d - beta d log d (Gao et al. 2023, eq. 2;
    d log d -> 0 at d = 0). The peak (beta > 0) is at d* = exp(alpha / beta - 1), gold* = beta d*."""
    d, y = np.asarray(d, dtype=float), np.asarray(gold, dtype=float)
    dlogd = np.where(d > 0, d * np.log(np.where(d > 0, d, 1.0)), 0.0)
    alpha, beta, r2 = _fit(np.stack([d, -dlogd], axis=1), y)
    out = {"alpha": alpha, "beta": beta, "r2": r2}
    if beta > 0 and alpha / beta - 1 < 50:
        peak = math.exp(alpha / beta - 1)
        out.update(peak_d=peak, peak_gold=beta * peak)
    return out


def empirical_peak(points: list[dict]) -> dict:
    """The measured point with the highest gold: ``{"d", "gold", "at_end"}`` (``at_end``: it is the point of largest
    d, so gold was still rising where the measurements stop: no turnover seen)."""
    best = max(points, key=lambda p: p["gold"])
    return {"d": best["sqrt_kl"], "gold": best["gold"],
            "at_end": best["sqrt_kl"] >= max(p["sqrt_kl"] for p in points)}


def compare_peaks(single: dict, ensemble: dict, single_name: str, method: str) -> str:
    """A sentence from two empirical peaks ``{"d", "gold"}``: was the ensemble's later and/or higher?"""
    later = "later than" if ensemble["d"] > single["d"] else "earlier than" if ensemble["d"] < single["d"] else \
        "at the same sqrt KL as"
    higher = "higher" if ensemble["gold"] > single["gold"] else "lower" if ensemble["gold"] < single["gold"] else \
        "equally high"
    ends = [who for who, peak in (("the ensemble", ensemble), (single_name, single)) if peak.get("at_end")]
    note = f" ({' and '.join(ends)}: highest at the largest KL measured, no turnover seen)" if ends else ""
    return (f"{method}: the ensemble's measured gold peak came {later} {single_name}'s (sqrt KL {ensemble['d']:.2f} "
            f"vs {single['d']:.2f}) and was {higher} (gold {ensemble['gold']:+.3f} vs {single['gold']:+.3f}){note}.")


# ---------------------------------------------------------------- stages
def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def _load_lora_checkpoint(policy, checkpoint: Path) -> None:
    """The policy's trainable weights (LoRA adapters) from a PPO checkpoint (``policy.*`` in its weights file)."""
    weights = load_file(str(checkpoint / WEIGHTS_NAME))
    mine = {k[len("policy."):]: v for k, v in weights.items() if k.startswith("policy.")}
    names = {n for n, p in policy.named_parameters() if p.requires_grad}
    missing = sorted(names - set(mine))
    if missing:
        raise ValueError(f"{checkpoint}: no weights for {len(missing)} trainable tensors of the policy, e.g. "
                         f"{missing[0]}")
    policy.load_state_dict(mine, strict=False)


def _proxy_component(name: str, path: str, q: OverOptConfig) -> RewardComponent:
    if name == "ensemble":
        return RewardComponent(type="model", name=name, path=path, aggregate=q.ensemble_aggregate,
                               aggregate_lambda=q.ensemble_lambda)
    return RewardComponent(type="model", name=name, path=path)


def run(q: OverOptConfig, resume: bool = False) -> dict:
    if resume:
        raise ValueError("overopt has no --resume; rerun it (each stage is an ordinary run you can rerun alone)")
    out = Path(q.output_dir)
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise RunError(f"{out} exists and is not an overopt run dir; choose another output_dir")
        shutil.rmtree(out)  # a rerun starts afresh (its stages are ordinary runs that refuse old checkpoints)
    out = prepare_run_dir(q, out, False, "overopt")
    atomic_write_json(out / MARKER, {"status": "running"})
    t_start, timings = time.time(), {}

    def done(stage: str, t0: float) -> None:
        timings[stage] = time.time() - t0
        log(f"overopt: {stage} took {timings[stage]:.0f}s")

    precision = resolve_mixed_precision(q.mixed_precision)
    amp = torch.bfloat16 if precision == "bf16" else None
    gold_texts = gold_function(q.gold)
    tok = load_tokenizer(q.policy)
    params = SamplingParams(max_new_tokens=q.max_new_tokens, temperature=1.0)
    rng = random.Random(q.seed)
    train_records = sentiment_prompts("train")
    eval_records = sentiment_prompts("test")
    rng.shuffle(train_records)
    rng.shuffle(eval_records)
    train_records, eval_records = train_records[:q.n_collect_prompts], eval_records[:q.n_eval_prompts]
    train_file = _write_jsonl(out / "data/train_prompts.jsonl", train_records)
    eval_file = _write_jsonl(out / "data/eval_prompts.jsonl", eval_records)
    prompt_cfg = RLDataConfig(train=str(train_file), eval=str(eval_file))
    train_prompts = load_prompts(prompt_cfg, tok, q.max_new_tokens, "train", log=log)
    eval_prompts = load_prompts(prompt_cfg, tok, q.max_new_tokens, "eval", log=log)
    init = load_policy(ModelConfig(name_or_path=q.policy), tok, trainable=False)

    # 1. the gold-labelled pair pool, and N held-out samples per prompt (best-of-n; the initial policy's point)
    t = time.time()
    K, N = q.samples_per_prompt, q.bon_n
    roll = sample(init, tok, train_prompts, params, K, q.generation_batch_size, q.seed + 1, amp, desc="pool: sample")
    gold = scores_in_chunks(gold_texts, [roll.response_texts], q.generation_batch_size, "pool: gold")
    pool = gold_pairs([r["prompt"] for r in train_records],
                     [roll.response_texts[i * K:(i + 1) * K] for i in range(len(train_records))],
                     [gold[i * K:(i + 1) * K] for i in range(len(train_records))])
    rng.shuffle(pool)
    sizes = sorted(q.label_sizes)
    ens_labels = q.ensemble_labels or sizes[-1]
    if max(sizes + [ens_labels]) > len(pool):
        raise ValueError(f"overopt: the pool holds {len(pool)} gold-labelled pairs, fewer than the {max(sizes)} asked "
                         f"for; raise n_collect_prompts or samples_per_prompt, or lower label_sizes")
    heldout_roll = sample(init, tok, eval_prompts, params, N, q.generation_batch_size, q.seed + 2, amp,
                          desc="held-out: sample")
    heldout_gold = scores_in_chunks(gold_texts, [heldout_roll.response_texts], q.generation_batch_size,
                                    "held-out: gold")
    raw_eval = [r["prompt"] for r in eval_records]
    heldout_pairs = gold_pairs(raw_eval, [heldout_roll.response_texts[i * N:i * N + 4] for i in range(len(raw_eval))],
                              [heldout_gold[i * N:i * N + 4] for i in range(len(raw_eval))])
    heldout_file = _write_jsonl(out / "data/heldout_gold_pairs.jsonl", heldout_pairs)
    done("collect", t)
    log(f"overopt: pool of {len(pool)} gold-labelled pairs from {len(train_records)} prompts x {K} samples; "
        f"{len(heldout_pairs)} held-out pairs")

    # 2. proxies: one per label size (nested subsets), and the ensemble
    from alignkit.algorithms import reward_model

    def rm_run(name: str, n_labels: int, ensemble_size: int) -> dict:
        t0 = time.time()
        data = _write_jsonl(out / f"data/labels_{n_labels}.jsonl", pool[:n_labels])
        cfg = RMConfig(
            model=ModelConfig(name_or_path=q.reward_model, freeze_embeddings=True),
            data=DataConfig(train=str(data), eval=str(heldout_file), max_length=256),
            train=TrainConfig(output_dir=str(out / name), seed=q.seed, lr=q.rm_lr, epochs=q.rm_epochs,
                              max_steps=q.max_steps, batch_size=q.batch_size, scheduler="cosine", warmup_steps=0,
                              log_every=1, mixed_precision=precision),
            rm=RMSection(normalize=True, ensemble_size=max(ensemble_size, 1)),
        )
        res = reward_model.train(cfg)
        done(name, t0)
        return {"path": res["model_dir"], "n_labels": n_labels, "heldout": res.get("rm_eval")}

    proxies = {f"rm_{n}": rm_run(f"rm_{n}", n, 1) for n in sizes}
    if q.ensemble_size > 1:
        proxies["ensemble"] = rm_run("ensemble", ens_labels, q.ensemble_size)

    def proxy_reward(name: str):
        reward = build_reward(RewardSection(components=[_proxy_component(name, proxies[name]["path"], q)]), tok)
        return lambda p, r, e: reward(p, r, e)[0].tolist()

    # 3. best-of-n by each proxy on the held-out samples
    t = time.time()
    gold_pn = torch.tensor(heldout_gold).view(len(raw_eval), N)  # [P, N]
    bon: dict[str, dict] = {}
    for name in proxies:
        proxy = scores_in_chunks(proxy_reward(name), [heldout_roll.prompt_texts, heldout_roll.response_texts,
                                                      heldout_roll.extras], q.generation_batch_size, f"{name}: score")
        curve = bon_curve(torch.tensor(proxy).view(len(raw_eval), N), gold_pn)
        g0 = curve[0]["gold"]
        fit = fit_bon([c["sqrt_kl"] for c in curve], [c["gold"] - g0 for c in curve])
        bon[name] = {"curve": curve, "fit": fit, "peak": empirical_peak(curve)}
        log(f"overopt: best-of-n by {name}: gold {g0:+.3f} (n=1) -> {curve[-1]['gold']:+.3f} (n={N}); fit alpha "
            f"{fit['alpha']:.3f} beta {fit['beta']:.3f} R^2 {fit['r2']:.3f}")
    done("best_of_n", t)

    # 4. PPO against each RL proxy, its checkpoints evaluated on held-out samples
    from alignkit.algorithms import ppo

    n_layers = AutoConfig.from_pretrained(resolve_path(q.policy)).num_hidden_layers
    lora = LoraConfig(enabled=True, r=q.lora_r, alpha=2 * q.lora_r, target_modules=LLAMA_LINEAR,
                      layers_to_transform=list(range(max(n_layers - q.lora_layers, 0), n_layers)))
    init_point = {"iteration": 0, "kl": 0.0, "sqrt_kl": 0.0, "gold": float(gold_pn.mean())}
    rl: dict[str, dict] = {}
    for name in (q.rl_proxy_names() if q.rl_iterations > 0 else []):
        t0 = time.time()
        run_dir = out / f"ppo_{name}"
        cfg = PPOConfig(
            model=ModelConfig(name_or_path=q.policy, lora=lora),
            data=RLDataConfig(train=str(train_file)),
            train=TrainConfig(output_dir=str(run_dir), seed=q.seed, lr=q.ppo_lr, scheduler="constant",
                              mixed_precision=precision, keep_checkpoints=q.rl_iterations + 1),
            generation=GenerationSection(max_new_tokens=q.max_new_tokens, temperature=1.0,
                                         batch_size=q.generation_batch_size),
            reward=RewardSection(components=[_proxy_component(name, proxies[name]["path"], q)]),
            ppo=PPOSection(value_model=q.policy, value_layers=q.value_layers,
                           rollout_batch_size=q.ppo_rollout_batch_size, num_iterations=q.rl_iterations, ppo_epochs=2,
                           num_minibatches=2, micro_batch_size=q.batch_size, kl_coef=q.ppo_kl_coef, value_lr=5e-5,
                           missing_eos_penalty=None, save_every=q.rl_eval_every),
        )
        ppo.train(cfg)
        proxy_fn = proxy_reward(name)
        points = [dict(init_point, proxy=float(np.mean(proxy_fn(heldout_roll.prompt_texts, heldout_roll.response_texts,
                                                                 heldout_roll.extras))))]
        policy = load_policy(ModelConfig(name_or_path=q.policy, lora=lora), tok)
        for ckpt in list_checkpoints(run_dir):
            step = int(ckpt.name.split("-")[-1])
            _load_lora_checkpoint(policy, ckpt)
            ev, _ = evaluate_policy(f"{name} it {step}", policy, tok, eval_prompts, gold_texts, params,
                                    q.rl_eval_samples, proxy_fn=proxy_fn, reference=init,
                                    batch_size=q.generation_batch_size, seed=q.seed + 100 + step, autocast_dtype=amp)
            kl = max(ev.kl_mean, 0.0)  # k1 is unbiased, a small negative estimate means KL ~ 0
            points.append({"iteration": step, "kl": ev.kl_mean, "sqrt_kl": math.sqrt(kl), "gold": ev.gold_mean,
                           "gold_se": ev.gold_se, "proxy": ev.proxy_mean, "kl_se": ev.kl_se})
        del policy
        fit = fit_rl([p["sqrt_kl"] for p in points], [p["gold"] - init_point["gold"] for p in points])
        rl[name] = {"points": points, "fit": fit, "peak": empirical_peak(points)}
        log(f"overopt: PPO on {name}: " + ", ".join(f"it {p['iteration']} sqrtKL {p['sqrt_kl']:.2f} gold "
                                                   f"{p['gold']:+.3f}" for p in points))
        done(f"ppo_{name}", t0)

    # 5. the comparison, plot, summary
    statements = []
    if "ensemble" in proxies:
        single = f"rm_{ens_labels}" if f"rm_{ens_labels}" in proxies else f"rm_{sizes[-1]}"
        statements.append(compare_peaks(bon[single]["peak"], bon["ensemble"]["peak"], single, "best-of-n"))
        rl_single = [n for n in rl if n != "ensemble"]
        if "ensemble" in rl and rl_single:
            statements.append(compare_peaks(rl[rl_single[-1]]["peak"], rl["ensemble"]["peak"], rl_single[-1], "PPO"))
    total = time.time() - t_start
    summary = {"proxies": proxies, "best_of_n": bon, "rl": rl, "statements": statements, "timings_s": timings,
               "total_s": total, "n_pool_pairs": len(pool), "n_heldout_pairs": len(heldout_pairs)}
    summary["plot"] = str(plot_overopt(bon, rl, out / "overopt.png"))
    text = render_summary(summary, q)
    atomic_write_text(out / "summary.md", text)
    atomic_write_json(out / "summary.json", summary, indent=2)
    atomic_write_json(out / MARKER, {"status": "done", "total_s": total})
    print(text)
    return summary


# ---------------------------------------------------------------- report
def plot_overopt(bon: dict, rl: dict, path: Path) -> Path:
    """Two panels (best-of-n, PPO): gold (solid, markers) and proxy (dashed) against sqrt(KL), per proxy, with the
    fitted gold curve (dotted) relative to the initial gold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {name: f"C{i}" for i, name in enumerate(dict.fromkeys([*bon, *rl]))}  # one colour per proxy
    for ax, (title, data, key, form) in zip(axes, (("best-of-n", bon, "curve", "bon"), ("PPO", rl, "points", "rl"))):
        for name, r in data.items():
            pts = r[key]
            d = np.array([p["sqrt_kl"] for p in pts])
            color = colors[name]
            ax.plot(d, [p["gold"] for p in pts], "o-", color=color, ms=3, label=f"{name} gold")
            if all(p.get("proxy") is not None for p in pts):
                ax.plot(d, [p["proxy"] for p in pts], "--", color=color, alpha=0.6, label=f"{name} proxy")
            grid = np.linspace(0, max(float(d.max()), 1e-6), 50)
            a, b = r["fit"]["alpha"], r["fit"]["beta"]
            g0 = pts[0]["gold"]
            fitted = grid * (a - b * grid) if form == "bon" else grid * (a - b * np.log(np.maximum(grid, 1e-9)))
            ax.plot(grid, g0 + fitted, ":", color=color, alpha=0.9)
        ax.set_title(f"{title}: gold (solid), proxy (dashed), fit (dotted)")
        ax.set_xlabel("sqrt(KL to the initial policy)")
        ax.set_ylabel("reward")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return atomic_save_figure(fig, path, dpi=110)


def render_summary(s: dict, q: OverOptConfig) -> str:
    lines = ["# alignkit overopt", "",
             f"Gold = {q.gold}; {s['n_pool_pairs']} gold-labelled pairs in the pool; held-out: {q.n_eval_prompts} "
             f"prompts x {q.bon_n} samples. d = sqrt(KL to the initial policy), gold relative to the initial policy.",
             "", "| proxy | labels | held-out acc | BoN alpha | BoN beta | BoN R^2 | BoN peak (d, gold) | RL alpha | "
             "RL beta | RL R^2 | RL peak (d, gold) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, p in s["proxies"].items():
        acc = (p.get("heldout") or {}).get("accuracy")
        b = s["best_of_n"][name]
        row = [name, str(p["n_labels"]), "-" if acc is None else f"{acc:.1%}", f"{b['fit']['alpha']:.3f}",
               f"{b['fit']['beta']:.3f}", f"{b['fit']['r2']:.3f}", f"{b['peak']['d']:.2f}, {b['peak']['gold']:+.3f}"]
        r = s["rl"].get(name)
        row += [f"{r['fit']['alpha']:.3f}", f"{r['fit']['beta']:.3f}", f"{r['fit']['r2']:.3f}",
                f"{r['peak']['d']:.2f}, {r['peak']['gold']:+.3f}"] if r else ["-"] * 4
        lines.append("| " + " | ".join(row) + " |")
    lines += [""] + [f"- {t}" for t in s["statements"]]
    few = [n for n, r in s["rl"].items() if len(r["points"]) <= 3]
    if few:
        lines.append(f"- Note: the RL fits of {few} have 3 or fewer points for 2 parameters (R^2 near 1 by "
                     "construction); raise rl_iterations / lower rl_eval_every for a curve.")
    for name, r in s["rl"].items():
        lines.append(f"- PPO on {name}: " + "; ".join(
            f"it {p['iteration']}: sqrt KL {p['sqrt_kl']:.2f}, gold {p['gold']:+.3f}, proxy {p['proxy']:+.3f}"
            for p in r["points"]))
    lines += ["", f"Plot: {s['plot']}", "", "Time: " + ", ".join(f"{k} {v:.0f}s" for k, v in s["timings_s"].items())
              + f"; total {s['total_s']:.0f}s"]
    return "\n".join(lines) + "\n"
