"""``alignkit eval``: did alignment work?

    alignkit eval configs/eval_quickstart.yaml

1. Every policy samples the prompt set ONCE (batched); every scorer reuses those samples: gold function, reward
   model (proxy), judge (verdicts cached in ``judge_cache.json`` of the run directory, keyed by the texts).
2. Win rate of each policy against the baseline by gold / RM / judge (judge: both orders, ties ½), the
   length-controlled win rate, 95% bootstrap CIs over prompts (``eval.winrate``); a Bradley–Terry ranking of all
   policies from all pairs of policies on each prompt (by the judge if given, else gold, else RM).
3. Diagnostics of each policy's samples (``ops.diagnostics``: length, its correlation with the reward, distinct-n,
   repetition, entropy, KL to the reference, proxy–gold gap, no-EOS share) and warnings against the baseline.
4. Sycophancy (``eval.sycophancy``), over-refusal (``eval.overrefusal``, when ``refusal.prompts`` is set) and the
   alignment tax (``eval.tax``) of each policy, with greedy decoding, in a few batched calls (``eval.probes``),
   cached per policy by its weights fingerprint and the probe settings (``probe_cache``).
5. ``summary.json: timing``: seconds per policy and section (``tables.md`` ends with the same table).

Writes ``summary.json``, ``tables.md``, ``winrates.csv``, ``samples.jsonl``, ``plots/*.png`` (win rates, reward vs
KL, sycophancy, refusal) and ``report.html`` (``eval.html``) to ``output_dir``; ``policies/<name>.json`` holds each
policy's results as soon as it is done, and ``--resume`` (same config) reuses them, so a crashed eval continues with
the next policy instead of sampling everything again.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
import time
from itertools import combinations
from pathlib import Path

import numpy as np
import torch

from alignkit.config import DataConfig, EvalConfig, ModelConfig
from alignkit.data.builtin import BUILTIN_PREFIX, load_builtin
from alignkit.data.formats import load_examples
from alignkit.data.tokenize import tokenize_prompts
from alignkit.eval.overrefusal import DEFAULT_DETECTOR, check_records, subsample
from alignkit.eval.policy import kl_estimator_for, logprobs_with_reference, sample, sequence_kl
from alignkit.eval.probes import (ProbeCache, ProbePlan, SectionClock, default_cache_dir, probe_key, run_probes,
                                  weights_fingerprint)
from alignkit.eval.sycophancy import default_items
from alignkit.eval.winrate import bootstrap_ci, bradley_terry_ci, lc_win_rate, outcomes_from_scores, win_rate
from alignkit.io_utils import atomic_write_json, atomic_write_text
from alignkit.models.loading import load_policy, load_tokenizer
from alignkit.ops.diagnostics import diagnostic_warnings, response_diagnostics
from alignkit.rollout.engine import SamplingParams, response_logprobs
from alignkit.train.run import RunError, log, prepare_run_dir, resolve_mixed_precision, write_summary

EMBEDDED_ALIASES = {"embedded": "smollm2-135m-instruct"}


# ---------------------------------------------------------------- scorers
def gold_function(spec: str):
    """``texts -> [float]``: VADER compound sentiment (``vader``) or a user's ``file.py:function``."""
    if spec == "vader":
        from alignkit.rewards.gold import vader_scores

        return vader_scores
    from alignkit.rewards.base import load_callable

    return load_callable(spec)


class JudgeCache:
    """Debiased judge verdicts P(A ≻ B) keyed by sha256(prompt, A, B), persisted as JSON: a re-run (same seed, same
    samples) asks the judge nothing twice. Verdict(B, A) is read as 1 − verdict(A, B)."""

    def __init__(self, judge, path: Path):
        self.judge, self.path = judge, Path(path)
        self.data: dict[str, float] = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.hits = self.asked = 0

    @staticmethod
    def key(p: str, a: str, b: str) -> str:
        return hashlib.sha256(json.dumps([p, a, b]).encode()).hexdigest()

    def compare(self, prompts: list[str], a: list[str], b: list[str]) -> np.ndarray:
        out = np.full(len(prompts), np.nan)
        todo = []
        for i, (p, x, y) in enumerate(zip(prompts, a, b)):
            if x == y:
                out[i] = 0.5
            elif (k := self.key(p, x, y)) in self.data:
                out[i] = self.data[k]
            elif (k2 := self.key(p, y, x)) in self.data:
                out[i] = 1.0 - self.data[k2]
            else:
                todo.append(i)
        self.hits += len(prompts) - len(todo)
        if todo:
            comp = self.judge.compare([prompts[i] for i in todo], [a[i] for i in todo], [b[i] for i in todo])
            self.asked += len(todo)
            for i, p_a in zip(todo, comp.p_a.tolist()):
                out[i] = p_a
                self.data[self.key(prompts[i], a[i], b[i])] = p_a
            atomic_write_json(self.path, self.data)
        return out


# ---------------------------------------------------------------- helpers
def _load_model(path: str, tokenizer):
    return load_policy(ModelConfig(name_or_path=EMBEDDED_ALIASES.get(path, path)), tokenizer, trainable=False)


@torch.no_grad()
def _token_stats(model, rollout, temperature: float, batch_size: int, reference=None, kl_estimator: str = "exact"):
    """Per response: summed entropy, token count, KL to ``reference`` (None without one; ``sequence_kl`` with
    ``kl_estimator``).

    The policy's log-probs and entropies come from the sampling loop when it recorded them
    (``Rollout.logprobs``); the k1 KL then needs only the reference's forward pass."""
    mask = rollout.response_mask.float()  # [B, R]
    ratio = None
    exact = reference is not None and kl_estimator_for(model, reference, kl_estimator) == "exact"
    if rollout.logprobs is not None:
        logp, ent = rollout.logprobs, rollout.entropy
        if reference is not None and not exact:
            ref = response_logprobs(reference, rollout, temperature, micro_batch_size=batch_size)
            ratio = ((logp - ref) * mask).sum(-1).tolist()  # [B]
    elif reference is None or exact:
        logp, ent = response_logprobs(model, rollout, temperature, return_entropy=True, micro_batch_size=batch_size)
    else:  # layers the two share run once
        logp, ent, ref = logprobs_with_reference(model, reference, rollout, temperature, batch_size, entropy=True)
        ratio = ((logp - ref) * mask).sum(-1).tolist()  # [B]
    if exact:
        ratio = sequence_kl(model, reference, rollout, temperature, batch_size, estimator="exact").tolist()  # [B]
    return (ent * mask).sum(-1).tolist(), mask.sum(-1).long().tolist(), ratio


# ---------------------------------------------------------------- comparisons
def compare_to_baseline(outcomes: np.ndarray, len_diff: np.ndarray, n_boot: int, seed: int) -> dict:
    """Win rate and LC win rate with 95% bootstrap CIs over prompts (LC refits the GLM n_boot/5 times)."""
    wr = win_rate(outcomes)
    lo, hi = bootstrap_ci(outcomes, n_boot=n_boot, seed=seed)
    rows = np.column_stack([outcomes, len_diff])  # [N, 2]
    lc = lc_win_rate(outcomes, len_diff)
    lc_lo, lc_hi = bootstrap_ci(rows, stat=lambda r: lc_win_rate(r[:, 0], r[:, 1]), n_boot=max(n_boot // 5, 20),
                                seed=seed)
    return {"win_rate": wr, "ci": [lo, hi], "lc_win_rate": lc, "lc_ci": [lc_lo, lc_hi], "n": int(len(outcomes))}


def _pairwise_outcomes(results: dict, names: list[str], scorer: str, judge: JudgeCache | None,
                       prompts: list[str]) -> dict[tuple[int, int], np.ndarray]:
    out = {}
    for i, j in combinations(range(len(names)), 2):
        a, b = results[names[i]], results[names[j]]
        if scorer == "judge":
            out[(i, j)] = judge.compare(prompts, a["texts"], b["texts"])
        else:
            out[(i, j)] = outcomes_from_scores(a[scorer], b[scorer])
    return out


def policy_warnings(policies, baseline: str, diagnostics: dict[str, dict]) -> dict[str, list[str]]:
    """``ops.diagnostics.diagnostic_warnings`` of every policy but the baseline, against the policy it was
    trained from (``trained_from``: the baseline by default; None: only the absolute checks)."""
    out = {}
    for p in policies:
        if p.name == baseline:
            continue
        start = baseline if p.trained_from == "baseline" else p.trained_from
        out[p.name] = diagnostic_warnings(diagnostics[p.name], None if start is None else diagnostics[start])
    return out


# ---------------------------------------------------------------- the command
def run(cfg: EvalConfig, resume: bool = False) -> dict:
    t_start = time.time()
    if not cfg.policies:
        raise RunError("policies: give at least one {name, path} (a checkpoint dir, hub id or smollm2-135m-instruct)")
    names = [p.name for p in cfg.policies]
    baseline = cfg.baseline or names[0]
    reference_name = cfg.reference or baseline
    gold_fn = gold_function(cfg.gold) if cfg.gold else None
    detector = None
    refusal_prompts: list[dict] = []
    if cfg.refusal.prompts:
        if cfg.refusal.prompts.startswith(BUILTIN_PREFIX):
            refusal_prompts = load_builtin(cfg.refusal.prompts, "test")
        else:
            refusal_prompts = [dict(r) for r in _read_jsonl(cfg.refusal.prompts)]
        check_records(refusal_prompts, cfg.refusal.prompts)
        refusal_prompts = subsample(refusal_prompts, cfg.refusal.per_side)
        spec = cfg.refusal.detector or DEFAULT_DETECTOR
        if spec is None:
            raise RunError("refusal.prompts is set but no refusal.detector: give 'module:function' (is_refusal(text) "
                           "-> bool)")
        from alignkit.rewards.base import load_callable

        detector = load_callable(spec)
    tokenizer = load_tokenizer(EMBEDDED_ALIASES.get(cfg.policies[0].path, cfg.policies[0].path))
    raw, _ = load_examples(cfg.prompts, "prompt", split=cfg.split, limit=cfg.n_prompts)
    data_cfg = DataConfig(train=cfg.prompts, max_length=cfg.max_prompt_length + cfg.generation.max_new_tokens,
                          max_prompt_length=cfg.max_prompt_length, system_prompt=cfg.system_prompt)
    prompts, _ = tokenize_prompts(raw, tokenizer, data_cfg)
    # what a judge and a reader see: the user's text, not the chat markup (the last user turn of a conversation)
    prompt_texts = [_user_text(r["prompt"]) for r in raw]
    out = prepare_run_dir(cfg, cfg.output_dir, resume, "eval")  # inputs checked: nothing is written before
    log(f"eval: {len(names)} policies x {len(prompts)} prompts from {cfg.prompts}; baseline {baseline}, "
        f"reference {reference_name}")
    proxy = None
    if cfg.reward_model:  # scored on the prompt in the reward model's own format when its tokenizer differs
        from alignkit.config import RewardComponent
        from alignkit.rewards.combine import build_component

        proxy = build_component(RewardComponent(type="model", path=cfg.reward_model, name="rm"), tokenizer, {})
    judge = None
    if cfg.judge is not None:
        from alignkit.judges import make_judge

        judge = JudgeCache(make_judge(cfg.judge), out / "judge_cache.json")
    params = SamplingParams.from_section(cfg.generation, do_sample=not cfg.greedy)
    paths = {p.name: p.path for p in cfg.policies}
    reference = _load_model(paths[reference_name], tokenizer)
    plan = ProbePlan(refusal=refusal_prompts, detector=(cfg.refusal.detector or DEFAULT_DETECTOR) if detector else None,
                     perplexity=cfg.tax, short_tokens=cfg.probe_max_new_tokens,
                     refusal_tokens=cfg.refusal.max_new_tokens, hhh_max_length=cfg.tax_max_length,
                     batch_size=cfg.generation.batch_size, seed=cfg.seed,
                     precision=resolve_mixed_precision(cfg.probe_precision))
    if cfg.sycophancy:
        plan.sycophancy = default_items(cfg.sycophancy_arithmetic, cfg.seed, cfg.sycophancy_facts)
    if cfg.tax and cfg.tax_task_items:
        from alignkit.data.builtin import arithmetic_prompts

        plan.task = arithmetic_prompts("test", cfg.tax_task_items, seed=cfg.seed)
    skipped: list[str] = []
    if cfg.tax and cfg.tax_hhh:
        from alignkit.data.builtin import hhh_unavailable, load_hhh

        if (missing := hhh_unavailable()) is None:
            plan.hhh = load_hhh("test")
        else:  # optional: the other probes still run; the summary and tables say why this one did not
            skipped.append(f"HHH accuracy (alignment tax) not measured: {missing}")
            log(f"eval: WARNING: {skipped[-1]}")
    cache = None
    if cfg.probe_cache and not plan.empty():
        cache = ProbeCache(cfg.probe_cache_dir or default_cache_dir())
    results: dict[str, dict] = {}
    timings: dict[str, float] = {}
    timing: dict[str, dict[str, float]] = {}
    bs = cfg.generation.batch_size
    done_dir = out / "policies"  # each finished policy's results: what --resume reuses after a crash
    if not resume and done_dir.is_dir():
        shutil.rmtree(done_dir)
    for name in names:
        done = done_dir / f"{name}.json"
        if resume and done.is_file():
            saved = json.loads(done.read_text(encoding="utf-8"))
            results[name], timings[name], timing[name] = saved["result"], saved["seconds"], saved["timing"]
            log(f"eval --resume: {name} from {done} (sampled, scored and probed before)")
            continue
        t0 = time.time()
        clock = SectionClock()
        with clock("load"):
            model = reference if name == reference_name else _load_model(paths[name], tokenizer)
        with clock("sample"):
            roll = sample(model, tokenizer, prompts, params, 1, bs, cfg.seed, desc=f"{name}: sample",
                          backend=cfg.generation.backend, record_logprobs=True)
        with clock("token_stats"):
            ent, ntok, ratio = _token_stats(model, roll, cfg.generation.temperature, bs,
                                            None if model is reference else reference, cfg.kl_estimator)
        if model is reference:
            ratio = [0.0] * len(roll)
        texts = roll.response_texts
        r = {"texts": texts, "lengths": roll.response_lengths.tolist(), "eos": roll.has_eos.tolist(),
             "kl_estimator": "exact" if model is reference else kl_estimator_for(model, reference, cfg.kl_estimator)}
        with clock("score"):
            if gold_fn is not None:
                r["gold"] = [float(x) for x in gold_fn(texts)]
            if proxy is not None:
                r["rm"] = [float(x) for x in proxy(roll.prompt_texts, texts, roll.extras).tolist()]
        tokens = [row[m.bool()].tolist() for row, m in zip(roll.response_ids, roll.response_mask)]
        reward = r.get("rm", r.get("gold", [0.0] * len(texts)))
        r["diagnostics"] = response_diagnostics(tokens, reward, r["eos"], entropy=ent, entropy_tokens=ntok,
                                                logratio=ratio, gold=r.get("gold") if "rm" in r else None)
        if not plan.empty():
            key = cached = None
            if cache is not None:
                with clock("probe_cache"):  # the weights fingerprint (a second for 135M parameters) and the lookup
                    key = probe_key(weights_fingerprint(model), plan, tokenizer)
                    cached = cache.get(key)
            if cached is None:
                cached = run_probes(model, tokenizer, plan, detector, clock, name)
                if cache is not None:
                    cache.put(key, cached)
            else:
                log(f"eval: {name}: probe results from the cache {cache.dir / key}.json")
            r.update(cached)
        results[name] = r
        timings[name] = time.time() - t0
        timing[name] = {k: round(v, 2) for k, v in clock.seconds.items()}
        atomic_write_json(done, {"result": r, "seconds": timings[name], "timing": timing[name]})
        if model is not reference:
            del model
        log(f"eval: {name} done in {timings[name]:.0f}s ("
            + ", ".join(f"{k} {v:.0f}s" for k, v in timing[name].items()) + ")")

    # win rates against the baseline, by each scorer
    scorers = [s for s in ("gold", "rm") if s in results[baseline]] + (["judge"] if judge is not None else [])
    base = results[baseline]
    winrates: dict[str, dict] = {}
    for name in names:
        if name == baseline:
            continue
        len_diff = np.asarray(results[name]["lengths"], float) - np.asarray(base["lengths"], float)
        winrates[name] = {}
        for s in scorers:
            o = (judge.compare(prompt_texts, results[name]["texts"], base["texts"]) if s == "judge"
                 else outcomes_from_scores(results[name][s], base[s]))
            winrates[name][s] = compare_to_baseline(o, len_diff, cfg.bootstrap, cfg.seed)

    # Bradley–Terry ranking over all policies
    ranking = None
    if len(names) >= 2 and scorers:
        primary = "judge" if judge is not None else scorers[0]
        pair = _pairwise_outcomes(results, names, primary, judge, prompt_texts)
        per_prompt = [[(i, j, float(o[k])) for (i, j), o in pair.items()] for k in range(len(prompts))]
        beta, lo, hi = bradley_terry_ci(len(names), per_prompt, n_boot=max(cfg.bootstrap // 5, 20), seed=cfg.seed)
        order = np.argsort(-beta)
        ranking = {"scorer": primary, "anchor": names[0],
                   "systems": [{"policy": names[k], "beta": float(beta[k]), "ci": [float(lo[k]), float(hi[k])]}
                               for k in order]}

    warnings = policy_warnings(cfg.policies, baseline, {n: results[n]["diagnostics"] for n in names})
    policies = {}
    for n in names:
        r = results[n]
        row = {"diagnostics": r["diagnostics"], "kl_estimator": r.get("kl_estimator", "k1")}
        for s in ("gold", "rm"):
            if s in r:
                row[f"{s}_mean"] = float(np.mean(r[s]))
                row[f"{s}_ci"] = list(bootstrap_ci(r[s], n_boot=cfg.bootstrap, seed=cfg.seed))
        for k in ("sycophancy", "refusal", "tax"):
            if k in r:
                row[k] = r[k]
        policies[n] = row
    tax_table = _tax_table(policies, baseline, winrates)
    summary = {
        "baseline": baseline, "reference": reference_name, "prompts": cfg.prompts, "n_prompts": len(prompts),
        "scorers": scorers, "policies": policies, "winrates": winrates, "ranking": ranking,
        "warnings": warnings, "alignment_tax": tax_table, "skipped": skipped,
        "judge_cache": None if judge is None else {"asked": judge.asked, "hits": judge.hits},
        "probe_cache": None if cache is None else {"dir": str(cache.dir), "hits": cache.hits, "misses": cache.misses},
        "samples": [{"prompt": prompt_texts[i], **{n: results[n]["texts"][i] for n in names}}
                    for i in range(min(cfg.show_samples, len(prompts)))],
        "timings_s": timings, "timing": timing, "total_s": time.time() - t_start,
    }
    with open(out / "samples.jsonl", "w", encoding="utf-8") as f:
        for i, p in enumerate(prompt_texts):
            row = {"prompt": p}
            for n in names:
                row[n] = {"response": results[n]["texts"][i], "length": results[n]["lengths"][i],
                          **{s: results[n][s][i] for s in ("gold", "rm") if s in results[n]}}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    atomic_write_text(out / "winrates.csv", winrates_csv(winrates))
    text = render_tables(summary)
    atomic_write_text(out / "tables.md", text)
    write_summary(out, summary)
    from alignkit.eval.html import write_report

    write_report([out], out / "report.html", png_dir=out / "plots")
    for n, ws in warnings.items():
        for w in ws:
            log(f"eval: WARNING {n}: {w}")
    print(text)
    log(f"eval done in {summary['total_s']:.0f}s: {out}")
    return summary


def _user_text(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    users = [m.get("content", "") for m in prompt if m.get("role") == "user"]
    return users[-1] if users else str(prompt[-1].get("content", "")) if prompt else ""


def _read_jsonl(path: str) -> list[dict]:
    rows = []
    p = Path(path)
    if not p.is_file():
        raise RunError(f"refusal.prompts: no such file {path}")
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise RunError(f"{path}: line {i}: not valid JSON ({e.msg})") from None
    return rows


def _tax_table(policies: dict, baseline: str, winrates: dict) -> list[dict]:
    """Per policy: capability metrics minus the baseline's, beside the gain (the first scorer's win rate)."""
    b = policies[baseline].get("tax") or {}
    rows = []
    for n, row in policies.items():
        t = row.get("tax") or {}
        gain = next(iter(winrates.get(n, {}).values()), {}).get("win_rate") if n != baseline else None
        rows.append({"policy": n, "win_rate_vs_baseline": gain,
                     **{f"{k}": v for k, v in t.items()},
                     **{f"{k}_change": v - b[k] for k, v in t.items() if k in b}})
    return rows


def winrates_csv(winrates: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["policy", "scorer", "win_rate", "ci_low", "ci_high", "lc_win_rate", "lc_ci_low", "lc_ci_high", "n"])
    for n, by in winrates.items():
        for s, r in by.items():
            w.writerow([n, s, r["win_rate"], *r["ci"], r["lc_win_rate"], *r["lc_ci"], r["n"]])
    return buf.getvalue()


def _f(x, digits: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.{digits}f}"


def render_tables(s: dict) -> str:
    """The markdown tables of ``tables.md``."""
    lines = [f"# alignkit eval ({s['n_prompts']} prompts from {s['prompts']}; baseline {s['baseline']})", "",
             "## Win rate against the baseline (95% bootstrap CI over prompts; ties ½)", "",
             "| policy | scorer | win rate | CI | LC win rate | LC CI |", "|---|---|---|---|---|---|"]
    for n, by in s["winrates"].items():
        for sc, r in by.items():
            lines.append(f"| {n} | {sc} | {_f(r['win_rate'])} | [{_f(r['ci'][0])}, {_f(r['ci'][1])}] | "
                         f"{_f(r['lc_win_rate'])} | [{_f(r['lc_ci'][0])}, {_f(r['lc_ci'][1])}] |")
    if s["ranking"]:
        lines += ["", f"## Bradley–Terry ranking (by {s['ranking']['scorer']}; β of {s['ranking']['anchor']} = 0)", "",
                  "| rank | policy | β | 95% CI |", "|---|---|---|---|"]
        for k, r in enumerate(s["ranking"]["systems"], 1):
            lines.append(f"| {k} | {r['policy']} | {_f(r['beta'], 2)} | [{_f(r['ci'][0], 2)}, {_f(r['ci'][1], 2)}] |")
    keys = ["length", "length_reward_corr", "distinct_1", "distinct_2", "repetition", "entropy", "kl",
            "proxy_gold_gap", "no_eos_frac"]
    lines += ["", "## Diagnostics", "", "KL to the reference per response (" + ", ".join(
        sorted({r.get("kl_estimator", "k1") for r in s["policies"].values()})) + " estimator; docs/eval.md).", "",
              "| policy | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for n, row in s["policies"].items():
        d = row["diagnostics"]
        lines.append(f"| {n} | " + " | ".join(_f(d.get(k)) for k in keys) + " |")
    for n, ws in s["warnings"].items():
        lines += [f"- **{n}**: {w}" for w in ws]
    if any("sycophancy" in r for r in s["policies"].values()):
        lines += ["", "## Sycophancy (rates per category)", "",
                  "| policy | category | accuracy | flip under pushback | agrees with wrong opinion | swayed |",
                  "|---|---|---|---|---|---|"]
        for n, row in s["policies"].items():
            sy = row.get("sycophancy")
            if not sy:
                continue
            for cat in sy["pushback"]["flip_rate"]:
                lines.append(f"| {n} | {cat} | {_f(sy['pushback']['accuracy'][cat]['rate'])} | "
                             f"{_f(sy['pushback']['flip_rate'][cat]['rate'])} | "
                             f"{_f(sy['opinion']['agree_rate'][cat]['rate'])} | "
                             f"{_f(sy['opinion']['swayed_rate'][cat]['rate'])} |")
    if any("refusal" in r for r in s["policies"].values()):
        lines += ["", "## Refusal", "", "| policy | refusal rate (harmful) | over-refusal rate (benign) |", "|---|---|---|"]
        for n, row in s["policies"].items():
            if "refusal" in row:
                lines.append(f"| {n} | {_f(row['refusal']['refusal_rate'])} | {_f(row['refusal']['overrefusal_rate'])} |")
    if s["alignment_tax"] and any(len(r) > 2 for r in s["alignment_tax"]):
        cols = [c for c in s["alignment_tax"][0] if c != "policy"]
        lines += ["", "## Alignment tax (capabilities; change against the baseline) beside the gain", "",
                  "| policy | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for r in s["alignment_tax"]:
            lines.append(f"| {r['policy']} | " + " | ".join(_f(r.get(c)) for c in cols) + " |")
    if s.get("skipped"):
        lines += ["", "## Not measured", ""] + [f"- {x}" for x in s["skipped"]]
    if s.get("timing"):
        sections = list(dict.fromkeys(k for t in s["timing"].values() for k in t))
        lines += ["", "## Time per policy and section (seconds; a missing section did not run, e.g. probes read "
                  "from the cache)", "", "| policy | " + " | ".join(sections) + " | total |",
                  "|---" * (len(sections) + 2) + "|"]
        for n, t in s["timing"].items():
            lines.append(f"| {n} | " + " | ".join(_f(t.get(k), 1) for k in sections)
                         + f" | {_f(s['timings_s'].get(n), 1)} |")
    return "\n".join(lines) + "\n"
