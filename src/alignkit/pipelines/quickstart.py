"""``alignkit quickstart``: the InstructGPT pipeline in miniature, on the embedded SmolLM2-135M, on a CPU.

    base --SFT (LoRA) on demonstrations--> SFT policy
    SFT policy --samples K reviews/prompt--> simulated annotators (3 votes per pair, Bradley–Terry noise
        around VADER) -> all K-choose-2 labelled pairs
    pairs -> reward model (MiniLM encoder; held-out accuracy vs gold);  BIG-bench HHH train pairs -> reward model
    best-vs-worst pairs by votes -> DPO (LoRA, reference = SFT policy)
    reward model -> PPO (LoRA, KL penalty to the SFT policy);  reward model -> best-of-n among SFT samples
    report: gold (VADER) and proxy reward of base / SFT / DPO / PPO / best-of-n on held-out prompts against
        KL to the SFT reference; gains over SFT paired by prompt; plot + HTML.

Every stage is an ordinary alignkit run (its own run dir, config.yaml, metrics.jsonl, model/) driven by
the same ``train(cfg)`` functions as the CLI, so each one can be re-run alone with ``alignkit <cmd>``.
The collected data (``data/``) and the evaluations (``eval/<policy>.json``) are written atomically, so
``alignkit quickstart --resume`` reuses every finished stage, continues an interrupted training stage from its
last checkpoint, and runs the rest."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import AutoConfig

from alignkit.config import (
    DataConfig, DPOConfig, DPOSection, GenerationSection, LoraConfig, ModelConfig, PPOConfig, PPOSection,
    QuickstartConfig, RLDataConfig, RMConfig, RMSection, SFTConfig, TrainConfig,
)
from alignkit.data.builtin import hhh_unavailable, sentiment_prompts
from alignkit.data.tokenize import render_prompt
from alignkit.eval.bon import best_indices, bon_curve, bon_kl
from alignkit.eval.report import html_report, plot_reward_vs_kl
from alignkit.eval.policy import PolicyEval, evaluate_policy, mean_se, paired_difference, sample, scores_in_chunks
from alignkit.io_utils import atomic_write_json, atomic_write_text
from alignkit.models.loading import load_policy, load_tokenizer, resolve_path
from alignkit.rewards.gold import vader_scores
from alignkit.rewards.reward_model import load_reward_model_scorer
from alignkit.rollout.engine import SamplingParams
from alignkit.rollout.prompts import load_prompts
from alignkit.train.checkpoint import latest_checkpoint
from alignkit.train.run import RunError, log, native_bf16, prepare_run_dir, resolve_mixed_precision

MARKER = "quickstart.json"
LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---------------------------------------------------------------- simulated annotators
def calibrate_temperature(gaps: list[float], target: float) -> float:
    """tau such that mean over pairs of sigma(|gap|/tau) == target (bisection on log tau)."""
    gaps = [abs(g) for g in gaps if g != 0.0]
    if not gaps:
        return 1.0

    def agreement(tau: float) -> float:
        return sum(1.0 / (1.0 + math.exp(-g / tau)) for g in gaps) / len(gaps)

    lo, hi = 1e-4, 1e4
    for _ in range(100):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if agreement(mid) > target else (lo, mid)
    return math.sqrt(lo * hi)


def annotate(groups: list[tuple[str, list[str], list[float]]], target_agreement: float, n_annotators: int,
             seed: int, votes_per_pair: int = 1) -> tuple[list[dict], dict]:
    """All K-choose-2 pairs of each prompt's samples, each labelled by ``votes_per_pair`` annotators of a pool.

    Annotator a prefers i over j with probability sigma((g_i - g_j) / tau_a) (Bradley–Terry around the
    gold score g); the pool's taus spread around a tau calibrated so that ONE annotator agrees with gold
    ``target_agreement`` of the time. With several votes (odd, <= pool size: distinct annotators) the
    pair's label is the majority and ``votes`` records how many of them chose ``chosen``.
    """
    if votes_per_pair < 1 or votes_per_pair % 2 == 0 or votes_per_pair > n_annotators:
        raise ValueError(f"votes_per_pair must be odd and in [1, n_annotators={n_annotators}], got {votes_per_pair}")
    rng = random.Random(seed)
    pairs = []
    for prompt, responses, gold in groups:
        uniq = {}
        for r, g in zip(responses, gold):
            uniq.setdefault(r.strip(), (r, g))
        items = list(uniq.values())
        for i in range(len(items)):
            for j in range(i + 1, len(items)):
                pairs.append((prompt, items[i], items[j]))
    tau = calibrate_temperature([a[1] - b[1] for _, a, b in pairs], target_agreement)
    taus = [tau * f for f in torch.linspace(0.6, 1.4, n_annotators).tolist()]
    records, agree, majority_agree, votes_cast, decided = [], 0, 0, 0, 0
    for prompt, (ri, gi), (rj, gj) in pairs:
        voters = rng.sample(range(n_annotators), votes_per_pair)
        i_votes = sum(rng.random() < 1.0 / (1.0 + math.exp(-(gi - gj) / taus[a])) for a in voters)
        i_wins = 2 * i_votes > votes_per_pair
        chosen, rejected = ((ri, gi), (rj, gj)) if i_wins else ((rj, gj), (ri, gi))
        if gi != gj:
            decided += 1
            votes_cast += votes_per_pair
            agree += i_votes if gi > gj else votes_per_pair - i_votes
            majority_agree += chosen[1] > rejected[1]
        records.append({"prompt": prompt, "chosen": chosen[0], "rejected": rejected[0], "annotators": voters,
                        "votes": max(i_votes, votes_per_pair - i_votes), "n_votes": votes_per_pair,
                        "gold_chosen": chosen[1], "gold_rejected": rejected[1]})
    stats = {"n_pairs": len(records), "tau": tau, "votes_per_pair": votes_per_pair,
             "agreement_with_gold": agree / max(votes_cast, 1),
             "majority_agreement_with_gold": majority_agree / max(decided, 1), "n_gold_ties": len(records) - decided}
    return records, stats


def vote_counts(records: list[dict]) -> dict[str, dict[str, tuple[int, float]]]:
    """Per prompt, each response's (votes received over all its pairs, gold score): a Borda-style ranking."""
    out: dict[str, dict[str, tuple[int, float]]] = {}
    for r in records:
        tally = out.setdefault(r["prompt"], {})
        for text, gold, votes in ((r["chosen"], r["gold_chosen"], r["votes"]),
                                  (r["rejected"], r["gold_rejected"], r["n_votes"] - r["votes"])):
            tally[text] = (tally.get(text, (0, gold))[0] + votes, gold)
    return out


def best_vs_worst_pairs(records: list[dict], per_prompt: int) -> list[dict]:
    """DPO pairs from the annotators' votes: per prompt, rank responses by votes received (over all K-choose-2
    comparisons) and pair 1st with last, 2nd with 2nd-last, ... (at most ``per_prompt`` pairs, only strict
    vote differences). Extreme pairs carry the largest preference signal per pair, the usual way to turn
    rankings into DPO data (e.g. Yuan et al. 2024, self-rewarding LMs: highest vs lowest scored); every pair
    still reaches the reward model. Gold scores are carried for reporting only.
    """
    out = []
    for prompt, tally in vote_counts(records).items():
        order = sorted(tally, key=lambda t: -tally[t][0])  # stable: ties keep first-seen order
        for i in range(min(per_prompt, len(order) // 2)):
            best, worst = order[i], order[-1 - i]
            if tally[best][0] > tally[worst][0]:
                out.append({"prompt": prompt, "chosen": best, "rejected": worst,
                            "gold_chosen": tally[best][1], "gold_rejected": tally[worst][1]})
    return out


def add_proxy_scores(result: PolicyEval, proxy, raw_prompts: list[str], chunk: int = 128) -> None:
    """Score samples with the reward model in its training format (plain user text, no chat markup)."""
    prompts = [render_prompt(proxy.tokenizer, [{"role": "user", "content": p}]) for p in raw_prompts]
    scores = scores_in_chunks(lambda p, r: proxy(p, r, [{}] * len(p)).tolist(),
                              [prompts, [s["response"] for s in result.samples]], chunk, f"{result.name}: proxy")
    result.proxy_mean, result.proxy_se = mean_se(scores)
    for s, v in zip(result.samples, scores):
        s["proxy"] = v


def best_of_n_from_samples(sft: PolicyEval, n_prompts: int, n_samples: int, n: int) -> tuple[PolicyEval, list[dict]]:
    """Best-of-n by proxy among the first n of the SFT policy's samples per prompt (the first on ties);
    KL = log n - (n-1)/n (analytic). The curve uses all ``n_samples`` through the unbiased estimator."""
    proxy = torch.tensor([s["proxy"] for s in sft.samples]).view(n_prompts, n_samples)
    gold = torch.tensor([s["gold"] for s in sft.samples]).view(n_prompts, n_samples)
    best = best_indices(proxy[:, :n])
    picks = [sft.samples[i * n_samples + int(b)] for i, b in enumerate(best)]
    g_mean, g_se = mean_se([p["gold"] for p in picks])
    p_mean, p_se = mean_se([p["proxy"] for p in picks])
    result = PolicyEval(f"best-of-{n}", g_mean, g_se, p_mean, p_se, kl_mean=bon_kl(n), kl_se=0.0, samples=picks,
                        response_length=sum(p["length"] for p in picks) / len(picks),
                        no_eos_frac=sum(not p["eos"] for p in picks) / len(picks))
    return result, bon_curve(proxy, gold)


def gold_pairs(prompts: list[str], responses: list[list[str]], gold: list[list[float]]) -> list[dict]:
    """Held-out pairs labelled by the gold score itself (ties dropped): the RM's accuracy target."""
    out = []
    for p, rs, gs in zip(prompts, responses, gold):
        for i in range(len(rs)):
            for j in range(i + 1, len(rs)):
                if gs[i] != gs[j] and rs[i].strip() != rs[j].strip():
                    w, lo = (i, j) if gs[i] > gs[j] else (j, i)
                    out.append({"prompt": p, "chosen": rs[w], "rejected": rs[lo]})
    return out


def policy_lora(q: QuickstartConfig, n_layers: int) -> LoraConfig:
    """LoRA of rank ``q.lora_r`` on every linear layer of the policy's last ``q.lora_layers`` decoder layers."""
    return LoraConfig(enabled=True, r=q.lora_r, alpha=2 * q.lora_r, target_modules=LLAMA_LINEAR,
                      layers_to_transform=list(range(n_layers - q.lora_layers, n_layers)))


def ppo_config(q: QuickstartConfig, out: Path, sft_dir: str, reward_model_dir: str, train_file: Path,
               lora: LoraConfig, precision: str) -> PPOConfig:
    """The quickstart's PPO stage in ``out``: LoRA from the SFT policy with a KL penalty to it, the sentiment
    reward model as the reward, and a critic made of the SFT backbone's first layers (the MiniLM reward model
    has another tokenizer)."""
    return PPOConfig(
        model=ModelConfig(name_or_path=sft_dir, lora=lora),
        data=RLDataConfig(train=str(train_file)),
        train=TrainConfig(output_dir=str(out), seed=q.seed, lr=q.ppo_lr, scheduler="constant",
                          mixed_precision=precision),
        generation=GenerationSection(max_new_tokens=q.max_new_tokens, temperature=1.0,
                                     batch_size=q.generation_batch_size),
        ppo=PPOSection(reward_model=reward_model_dir, value_model=sft_dir, value_layers=q.value_layers,
                       rollout_batch_size=q.ppo_rollout_batch_size, samples_per_prompt=q.ppo_samples_per_prompt,
                       score_baseline="loo" if q.ppo_samples_per_prompt > 1 else "none",
                       num_iterations=q.ppo_iterations, ppo_epochs=q.ppo_epochs, num_minibatches=2,
                       micro_batch_size=q.batch_size, kl_coef=q.ppo_kl_coef, value_lr=q.value_lr,
                       missing_eos_penalty=None),
    )


# ---------------------------------------------------------------- run dir, stages and resume
def gold_function(spec: str):
    """The gold reward ``texts -> [float]``: VADER compound sentiment (``vader``), or a user function given as
    ``file.py:function`` / ``module:function`` (it runs your code)."""
    if spec == "vader":
        return vader_scores
    from alignkit.rewards.base import load_callable

    return load_callable(spec)


def _processes():
    """This launch's processes. Under ``accelerate launch`` every process runs the whole pipeline: the training
    stages share the work (data parallel), the collection and evaluation are computed by every process alike
    (seeded), and only the main process writes; ``_sync()`` makes the others wait for its files."""
    from accelerate import PartialState

    several = int(os.environ.get("WORLD_SIZE", "1") or 1) > 1
    return PartialState(cpu=several and not torch.cuda.is_available())


def _is_main() -> bool:
    return _processes().is_main_process


def _sync() -> None:
    _processes().wait_for_everyone()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    if _is_main():
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def _prompt_records(split: str, n: int, seed: int) -> list[dict]:
    items = sentiment_prompts(split)
    random.Random(seed).shuffle(items)
    return items[:n]


def _open_run_dir(q: QuickstartConfig, out: Path, resume: bool) -> dict:
    """Start a fresh run in ``out`` (a previous quickstart run there is deleted), or with ``resume`` continue
    the one there (same config required). Returns the state of ``quickstart.json`` (earlier stage timings)."""
    marker = out / MARKER
    if resume:
        if not marker.is_file():
            raise RunError(f"--resume: {out} holds no quickstart run ({MARKER} is missing); "
                           "run `alignkit quickstart` without --resume")
        state = json.loads(marker.read_text(encoding="utf-8"))
        prepare_run_dir(q, out, resume=True, name="quickstart")
        return state
    if not _is_main():  # the main process starts the run dir
        _sync()
        return {"status": "running", "timings_s": {}, "elapsed_s": 0.0}
    if out.exists():
        if not marker.exists() and any(out.iterdir()):
            raise RunError(f"{out} exists and is not a quickstart run dir; choose another output_dir")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    state = {"status": "running", "timings_s": {}, "elapsed_s": 0.0}
    atomic_write_json(marker, state)
    prepare_run_dir(q, out, resume=False, name="quickstart")
    _sync()
    return state


def finished_stage(run_dir: Path) -> dict | None:
    """The result of a training stage that ran to the end: its ``summary.json`` (written last, atomically,
    after ``model/``), or None."""
    summary = Path(run_dir) / "summary.json"
    if not summary.is_file():
        return None
    result = json.loads(summary.read_text(encoding="utf-8"))
    model_dir = result.get("model_dir")
    return result if model_dir and Path(model_dir).is_dir() else None


def train_stage(train_fn, cfg, resume: bool) -> tuple[dict, bool]:
    """``train_fn(cfg)``: an ordinary alignkit run in ``cfg.train.output_dir``. With ``resume`` a finished stage
    is reused as it is, and an interrupted one continues from its last checkpoint (if it wrote one).
    Returns (the stage's result, whether it ran now)."""
    run_dir = Path(cfg.train.output_dir)
    _sync()  # the stage's data files are written
    try:
        return _train_stage(train_fn, cfg, resume, run_dir)
    finally:
        _sync()  # its model/ and summary.json are written


def _train_stage(train_fn, cfg, resume: bool, run_dir: Path) -> tuple[dict, bool]:
    if resume:
        done = finished_stage(run_dir)
        if done is not None:
            log(f"quickstart --resume: {run_dir.name} already finished; reusing {run_dir}")
            return done, False
        checkpoint = latest_checkpoint(run_dir)
        if checkpoint is not None:
            log(f"quickstart --resume: continuing {run_dir.name} from {checkpoint}")
            return train_fn(cfg, resume=True), True
    return train_fn(cfg), True


def _save_eval(out: Path, key: str, result: PolicyEval) -> None:
    if _is_main():
        atomic_write_json(out / "eval" / f"{key}.json", asdict(result), ensure_ascii=False)


def _load_eval(out: Path, name: str) -> PolicyEval | None:
    path = out / "eval" / f"{name}.json"
    return PolicyEval(**json.loads(path.read_text(encoding="utf-8"))) if path.is_file() else None


def _train_cfg(q: QuickstartConfig, out: Path, lr: float, epochs: int) -> TrainConfig:
    return TrainConfig(output_dir=str(out), seed=q.seed, lr=lr, epochs=epochs, max_steps=q.max_steps,
                       batch_size=q.batch_size, scheduler="cosine", warmup_steps=0, log_every=1,
                       mixed_precision=resolve_mixed_precision(q.mixed_precision))


def _fmt(x: float | None, se: float | None = None, digits: int = 3) -> str:
    if x is None:
        return "-"
    return f"{x:+.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None and not math.isnan(se) else "")


# ---------------------------------------------------------------- the pipeline
def run(q: QuickstartConfig, resume: bool = False) -> dict:
    """The whole pipeline in ``q.output_dir``. ``resume``: continue an interrupted run there: finished stages
    (training run dirs with ``summary.json``; collected data and evaluations, written atomically) are reused,
    an interrupted training stage continues from its checkpoint, and everything after it runs."""
    t_start = time.time()
    gold_scores = gold_function(q.gold)  # checked before anything is written
    out = Path(q.output_dir)
    state = _open_run_dir(q, out, resume)
    timings: dict[str, float] = dict(state.get("timings_s", {}))
    elapsed_before = float(state.get("elapsed_s", 0.0))

    def stage_done(name: str, t0: float) -> None:
        timings[name] = time.time() - t0
        if _is_main():
            atomic_write_json(out / MARKER, {"status": "running", "timings_s": timings,
                                             "elapsed_s": elapsed_before + time.time() - t_start})

    def train(name: str, train_fn, cfg) -> dict:
        t0 = time.time()
        result, ran = train_stage(train_fn, cfg, resume)
        if ran:
            stage_done(name, t0)
        return result

    torch.manual_seed(q.seed)
    n_layers = AutoConfig.from_pretrained(resolve_path(q.policy)).num_hidden_layers
    lora = policy_lora(q, n_layers)
    params = SamplingParams(max_new_tokens=q.max_new_tokens, temperature=1.0)
    precision = resolve_mixed_precision(q.mixed_precision)
    log(f"quickstart: mixed precision {precision} ({q.mixed_precision}; native bf16: {native_bf16()})")
    amp = torch.bfloat16 if precision == "bf16" else None  # sampling under bf16 autocast: ~1.6x faster where native
    tok = load_tokenizer(q.policy)
    eval_records = _prompt_records("test", q.n_eval_prompts, q.seed)
    train_records = _prompt_records("train", q.n_train_prompts, q.seed)
    eval_file = write_jsonl(out / "data/eval_prompts.jsonl", eval_records)  # deterministic: the same on resume
    train_file = write_jsonl(out / "data/train_prompts.jsonl", train_records)
    _sync()
    prompt_data = RLDataConfig(train=str(train_file), eval=str(eval_file))
    train_prompts = load_prompts(prompt_data, tok, q.max_new_tokens, "train", log=log)
    eval_prompts = load_prompts(prompt_data, tok, q.max_new_tokens, "eval", log=log)
    raw_eval = [r["prompt"] for r in eval_records]

    # 1. SFT (LoRA on the last layers) on our demonstrations
    from alignkit.algorithms import sft
    sft_cfg = SFTConfig(model=ModelConfig(name_or_path=q.policy, lora=lora),
                        data=DataConfig(train="builtin:sft_demos", max_length=256),
                        train=_train_cfg(q, out / "sft", q.sft_lr, q.sft_epochs))
    sft_dir = train("sft", sft.train, sft_cfg)["model_dir"]
    loaded: dict = {}

    def sft_model():
        if "sft" not in loaded:
            loaded["sft"] = load_policy(ModelConfig(name_or_path=sft_dir), tok, trainable=False)
        return loaded["sft"]

    # 2. preference collection from the SFT policy + simulated annotators (collect.json, written last, marks it done)
    t = time.time()
    pref_file, dpo_file, collect_file = (out / "data/preferences.jsonl", out / "data/preferences_dpo.jsonl",
                                         out / "data/collect.json")
    if resume and collect_file.is_file() and pref_file.is_file() and dpo_file.is_file():
        ann = json.loads(collect_file.read_text(encoding="utf-8"))["annotators"]
        log(f"quickstart --resume: reusing the {ann['n_pairs']} collected pairs in {pref_file}")
    else:
        K = q.samples_per_prompt
        roll = sample(sft_model(), tok, train_prompts, params, K, q.generation_batch_size, q.seed + 1, amp,
                      desc="collect: sample")
        gold = scores_in_chunks(gold_scores, [roll.response_texts], q.generation_batch_size, "collect: gold")
        groups = [(train_records[i]["prompt"], roll.response_texts[i * K:(i + 1) * K], gold[i * K:(i + 1) * K])
                  for i in range(len(train_records))]
        pref_records, ann = annotate(groups, q.annotator_agreement, q.n_annotators, q.seed, q.votes_per_pair)
        write_jsonl(pref_file, pref_records)
        write_jsonl(dpo_file, best_vs_worst_pairs(pref_records, q.dpo_pairs_per_prompt))
        if _is_main():
            atomic_write_json(collect_file, {"annotators": ann}, indent=2)
        _sync()
        log(f"collected {ann['n_pairs']} pairs from {len(train_prompts)} prompts x {K} samples; each simulated "
            f"annotator agrees with gold on {ann['agreement_with_gold']:.1%} of pairs (tau={ann['tau']:.3f}), the "
            f"majority of {q.votes_per_pair} on {ann['majority_agreement_with_gold']:.1%}")
        stage_done("collect", t)

    # 3. held-out evaluation of base and SFT, KL to the SFT reference measured for both (exactly 0 for the SFT
    #    policy itself: a check of the estimator). SFT draws bon_n samples per prompt (best-of-n picks from them
    #    later), and its samples, labelled by gold, are the reward model's held-out pairs
    n_sft = max(q.eval_samples, q.bon_n)
    ev: dict[str, PolicyEval] = {}
    for name in ("base", "sft"):
        t = time.time()
        ev[name] = _load_eval(out, name) if resume else None
        if ev[name] is not None:
            log(f"quickstart --resume: reusing the evaluation of {name} in {out / 'eval'}")
            continue
        model = sft_model() if name == "sft" else load_policy(ModelConfig(name_or_path=q.policy), tok, trainable=False)
        ev[name], _ = evaluate_policy(name, model, tok, eval_prompts, gold_scores, params,
                                      n_sft if name == "sft" else q.eval_samples, reference=sft_model(),
                                      kl_samples=q.kl_samples, batch_size=q.generation_batch_size,
                                      seed=q.seed + (3 if name == "sft" else 2), autocast_dtype=amp)
        _save_eval(out, name, ev[name])
        del model
        stage_done(f"eval_{name}", t)
    sft_gold = [[s["gold"] for s in ev["sft"].samples[i * n_sft:(i + 1) * n_sft]] for i in range(len(raw_eval))]
    sft_texts = [[s["response"] for s in ev["sft"].samples[i * n_sft:(i + 1) * n_sft]] for i in range(len(raw_eval))]
    n_test = min(q.rm_test_samples, n_sft)
    test_pairs = gold_pairs(raw_eval, [t_[:n_test] for t_ in sft_texts], [g[:n_test] for g in sft_gold])
    test_pair_file = write_jsonl(out / "data/preferences_test_gold.jsonl", test_pairs)
    _sync()

    # 4. reward models: sentiment (from our labels) and HHH (real human preferences)
    from alignkit.algorithms import reward_model
    rm_cfg = RMConfig(model=ModelConfig(name_or_path=q.reward_model, freeze_embeddings=True),
                      data=DataConfig(train=str(pref_file), eval=str(test_pair_file), max_length=256),
                      train=_train_cfg(q, out / "rm_sentiment", q.rm_lr, q.rm_epochs), rm=RMSection(normalize=True))
    rm_res = train("rm_sentiment", reward_model.train, rm_cfg)
    hhh_missing = hhh_unavailable()
    if hhh_missing is None:
        hhh_cfg = RMConfig(model=ModelConfig(name_or_path=q.hhh_reward_model, freeze_embeddings=True),
                           data=DataConfig(train="builtin:hhh", eval="builtin:hhh", max_length=384,
                                           max_prompt_length=256),
                           train=_train_cfg(q, out / "rm_hhh", q.hhh_lr, q.hhh_epochs))
        hhh_res = train("rm_hhh", reward_model.train, hhh_cfg)
    else:  # optional: the rest of the pipeline does not use it
        log(f"quickstart: WARNING: skipping the HHH reward model: {hhh_missing}")
        hhh_res = {"skipped": hhh_missing}

    # 5. DPO from the SFT policy on the annotated pairs
    from alignkit.algorithms import dpo
    dpo_cfg = DPOConfig(model=ModelConfig(name_or_path=sft_dir, lora=lora),
                        data=DataConfig(train=str(dpo_file), max_length=256),
                        train=_train_cfg(q, out / "dpo", q.dpo_lr, q.dpo_epochs),
                        dpo=DPOSection(loss="dpo", beta=q.dpo_beta))
    dpo_dir = train("dpo", dpo.train, dpo_cfg)["model_dir"]

    # 6. PPO from the SFT policy against the sentiment reward model (KL penalty to the SFT reference;
    #    the critic is the SFT backbone's first layers, since the MiniLM reward model has another tokenizer)
    ppo_dir = None
    if q.ppo_iterations > 0:
        from alignkit.algorithms import ppo
        ppo_cfg = ppo_config(q, out / "ppo", sft_dir, rm_res["model_dir"], train_file, lora, precision)
        ppo_dir = train("ppo", ppo.train, ppo_cfg)["model_dir"]

    # 7. evaluate DPO and PPO; proxy reward for every policy; best-of-n from the SFT samples by the proxy
    for name, model_dir, seed in (("dpo", dpo_dir, q.seed + 4), ("ppo", ppo_dir, q.seed + 5)):
        if model_dir is None:
            continue
        t = time.time()
        ev[name] = _load_eval(out, name) if resume else None
        if ev[name] is not None:
            log(f"quickstart --resume: reusing the evaluation of {name} in {out / 'eval'}")
            continue
        model = load_policy(ModelConfig(name_or_path=model_dir), tok, trainable=False)
        ev[name], _ = evaluate_policy(name, model, tok, eval_prompts, gold_scores, params, q.eval_samples,
                                      reference=sft_model(), kl_samples=q.kl_samples,
                                      batch_size=q.generation_batch_size, seed=seed, autocast_dtype=amp)
        _save_eval(out, name, ev[name])
        del model
        stage_done(f"eval_{name}", t)
    t = time.time()
    proxy = load_reward_model_scorer(rm_res["model_dir"], batch_size=32)
    for name in ev:
        n = n_sft if name == "sft" else q.eval_samples
        add_proxy_scores(ev[name], proxy, [p for p in raw_eval for _ in range(n)])
    ev["bon"], bon_curve_rows = best_of_n_from_samples(ev["sft"], len(raw_eval), n_sft, q.bon_n)
    for name, result in ev.items():
        _save_eval(out, name, result)  # now with the proxy scores
    stage_done("proxy_bon", t)

    total = elapsed_before + time.time() - t_start
    summary = {
        "policies": {k: v.row() for k, v in ev.items()},
        "vs_sft": {k: dict(zip(("gold_diff", "gold_diff_se", "n_prompts"), paired_difference(v.samples, ev["sft"].samples)))
                   for k, v in ev.items() if k != "sft"},
        "annotators": ann,
        "reward_model_sentiment": {"heldout_accuracy_vs_gold": (rm_res.get("eval") or {}).get("accuracy"),
                                   "heldout_margin": (rm_res.get("eval") or {}).get("margin"),
                                   "n_train_pairs": ann["n_pairs"], "n_test_pairs": len(test_pairs)},
        "reward_model_hhh": {"test_accuracy": (hhh_res.get("eval") or {}).get("accuracy"),
                             "test_margin": (hhh_res.get("eval") or {}).get("margin"),
                             **({"skipped": hhh_res["skipped"]} if "skipped" in hhh_res else {})},
        "timings_s": timings, "total_s": total, "resumed": resume,
        "n_dpo_pairs": sum(1 for _ in open(dpo_file, encoding="utf-8")),
        "artifacts": {"sft_model": sft_dir, "dpo_model": dpo_dir, "ppo_model": ppo_dir, "reward_model": rm_res["model_dir"],
                      "hhh_reward_model": hhh_res.get("model_dir"), "preferences": str(pref_file),
                      "heldout_gold_pairs": str(test_pair_file), "evaluations": str(out / "eval")},
        "best_of_n_curve": bon_curve_rows,
        "samples": {k: _first_per_prompt(v, q.show_samples) for k, v in ev.items()},
    }
    text = render_summary(summary, q)
    if not _is_main():  # the main process writes the report
        _sync()
        return summary
    plot = plot_reward_vs_kl(summary["policies"], out / "reward_vs_kl.png", bon_curve_rows)
    summary["artifacts"]["plot"] = str(plot)
    atomic_write_text(out / "summary.md", text)
    rows = [{"policy": k, **{c: v[c] for c in ("gold_mean", "gold_se", "proxy_mean", "kl_mean")}}
            for k, v in summary["policies"].items()]
    report = out / "report.html"
    atomic_write_text(report, html_report("alignkit quickstart", text, plot,
                                          [("Policies on held-out prompts", rows),
                                           ("Best-of-n curve (SFT samples)", bon_curve_rows)]))
    summary["artifacts"]["report"] = str(report)
    atomic_write_json(out / "summary.json", summary, indent=2)
    atomic_write_json(out / MARKER, {"status": "done", "timings_s": timings, "elapsed_s": total, "total_s": total})
    print(text)
    _sync()
    return summary


def render_summary(s: dict, q: QuickstartConfig) -> str:
    lines = ["# alignkit quickstart", "",
             f"Held-out prompts: {q.n_eval_prompts}, {q.eval_samples} samples each (SFT: {max(q.eval_samples, q.bon_n)}), "
             "temperature 1. Gold = VADER compound sentiment in [-1, 1]; proxy = our reward model; "
             "KL = KL(policy || SFT) in nats: the next-token KL over the whole vocabulary, summed over each sampled "
             f"response, on {q.kl_samples} samples per prompt (best-of-{q.bon_n}: analytic log n - (n-1)/n).", "",
             "| policy | gold reward | proxy reward | KL to SFT | length | no EOS |",
             "|---|---|---|---|---|---|"]
    for name, r in s["policies"].items():
        lines.append(f"| {name} | {_fmt(r['gold_mean'], r['gold_se'])} | {_fmt(r['proxy_mean'], r['proxy_se'])} | "
                     f"{_fmt(r['kl_mean'], r['kl_se'], 2)} | {r['response_length']:.1f} | {r['no_eos_frac']:.0%} |")
    a = s["annotators"]
    lines += ["", "Gold reward minus the SFT policy's, paired by prompt (mean ± s.e. over prompts): " + ", ".join(
        f"{k} {d['gold_diff']:+.3f} ± {d['gold_diff_se']:.3f}" for k, d in s["vs_sft"].items()) + ".",
              f"Simulated annotators: {a['n_pairs']} pairs, {a['votes_per_pair']} votes each; one annotator agrees with gold "
              f"{a['agreement_with_gold']:.1%} of the time, the majority label {a['majority_agreement_with_gold']:.1%}.",
              f"Sentiment reward model: held-out accuracy vs gold {_pct(s['reward_model_sentiment']['heldout_accuracy_vs_gold'])}"
              f" on {s['reward_model_sentiment']['n_test_pairs']} pairs.",
              f"HHH reward model (BIG-bench hhh_alignment): test accuracy {_pct(s['reward_model_hhh']['test_accuracy'])}."
              if "skipped" not in s["reward_model_hhh"] else
              f"HHH reward model: not trained ({s['reward_model_hhh']['skipped']}).",
              "", "## Samples (first held-out prompts)"]
    names = list(s["samples"])
    for i in range(min(len(v) for v in s["samples"].values())):
        lines.append("")
        lines.append(f"**Prompt:** {_user_text(s['samples'][names[0]][i]['prompt'])}")
        for n in names:
            x = s["samples"][n][i]
            lines.append(f"- *{n}* (gold {x['gold']:+.2f}): {x['response'].strip()[:300]}")
    lines += ["", "## Artifacts"] + [f"- {k}: {v}" for k, v in s["artifacts"].items()]
    lines += ["", "Time: " + ", ".join(f"{k} {v:.0f}s" for k, v in s["timings_s"].items()) + f"; total {s['total_s']:.0f}s"]
    return "\n".join(lines) + "\n"


def _first_per_prompt(result: PolicyEval, k: int) -> list[dict]:
    """The first sample of each of the first k prompts (policies draw different numbers of samples per prompt)."""
    seen, out = set(), []
    for s in result.samples:
        if s["prompt"] not in seen:
            seen.add(s["prompt"])
            out.append(s)
    return out[:k]


def _pct(x) -> str:
    return "-" if x is None else f"{x:.1%}"


def _user_text(prompt_text: str) -> str:
    marker = "<|im_start|>user\n"
    if marker in prompt_text:
        return prompt_text.split(marker)[-1].split("<|im_end|>")[0]
    return prompt_text
