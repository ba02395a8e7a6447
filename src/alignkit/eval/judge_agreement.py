"""``alignkit judge``: an AI judge's agreement with human preference labels, by default on the BIG-bench HHH
pairs (Askell et al. 2021): the "human spot-check" of AI feedback.

    alignkit judge                                   # the embedded model as judge, all 221 HHH pairs
    alignkit judge judge.kind=openai judge.model=gpt-4o-mini data.limit=50
    alignkit judge judge.kind=openai judge.base_url=http://127.0.0.1:8000/v1 judge.model=my-model

Writes to ``output_dir``: ``judgments.jsonl`` (per pair: category, p_chosen, both orders), ``summary.json``
(:func:`alignkit.judges.agreement.summarise_agreement` + the judge's usage + optional self-consistency),
``config.yaml``, ``log.txt``.
"""

from __future__ import annotations

import json
import time

from alignkit.config import JudgeRunConfig
from alignkit.data.io import DataError, read_records
from alignkit.io_utils import atomic_write_text
from alignkit.judges import DEFAULT_PRINCIPLE, make_judge, self_consistency
from alignkit.judges.agreement import judge_pairs, summarise_agreement
from alignkit.judges.remote import JudgeRequestError
from alignkit.train.run import RunError, log, prepare_run_dir, write_summary

CATEGORY_FIELDS = ("subset", "category")


def load_pairs(spec: str, split: str, limit: int | None) -> list[dict]:
    """``{"prompt", "chosen", "rejected", "category"}`` string records; errors name file, line and field.
    ``split`` picks a built-in dataset's split (``all``: train + test); a file is read whole."""
    builtin = spec.startswith("builtin:")
    splits = ("train", "test") if split == "all" and builtin else ("train" if split == "all" else split,)
    records = [r for s in splits for r in read_records(spec, s)]
    pairs = []
    for r in records:
        for key in ("prompt", "chosen", "rejected"):
            value = r.data.get(key)
            if not isinstance(value, str) or not value.strip():
                raise DataError(r.source, r.line, key, f"expected a non-empty string, got {type(value).__name__}"
                                " (alignkit judge reads text preference pairs {prompt, chosen, rejected})", r.unit)
        category = next((str(r.data[k]) for k in CATEGORY_FIELDS if r.data.get(k) is not None), "all")
        pairs.append({"prompt": r.data["prompt"], "chosen": r.data["chosen"], "rejected": r.data["rejected"],
                      "category": category})
    if not pairs:
        raise DataError(spec, None, None, "contains no preference pairs")
    return pairs[:limit] if limit else pairs


def format_table(summary: dict) -> str:
    rows = [("all", summary["pairs"], summary["agreement"], summary["position_bias_rate"])]
    rows += [(c, v["pairs"], v["agreement"], v["position_bias_rate"]) for c, v in summary["by_category"].items()]
    lines = [f"{'category':<12} {'pairs':>5} {'agreement':>9} {'pos.bias':>8}"]
    lines += [f"{c:<12} {n:>5} {a:>9.3f} {b:>8.3f}" for c, n, a, b in rows]
    return "\n".join(lines)


def run(cfg: JudgeRunConfig, resume: bool = False) -> dict:
    run_dir = prepare_run_dir(cfg, cfg.output_dir, resume, "judge")
    pairs = load_pairs(cfg.data.path, cfg.data.split, cfg.data.limit)
    judge = make_judge(cfg.judge)
    principle = cfg.principle or DEFAULT_PRINCIPLE
    log(f"judge: {judge.name} on {len(pairs)} pairs of {cfg.data.path} ({cfg.data.split}), both orders; principle: {principle!r}")
    t0 = time.time()
    try:
        comp = judge_pairs(judge, [p["prompt"] for p in pairs], [p["chosen"] for p in pairs],
                           [p["rejected"] for p in pairs], principle,
                           progress=lambda done, total: log(f"judge: {done}/{total} pairs ({time.time() - t0:.0f}s)"))
    except JudgeRequestError as e:  # answers obtained so far stay in the judge's cache: a rerun does not re-ask them
        raise RunError(f"{e} (answers received so far are cached; rerun to continue)") from None
    lines = [json.dumps({"category": p["category"], "p_chosen": float(comp.p_a[i]),
                         "p_chosen_first": float(comp.p_ab[i]), "p_chosen_second": float(comp.p_ba[i]),
                         "prompt": p["prompt"]}) + "\n" for i, p in enumerate(pairs)]
    atomic_write_text(run_dir / "judgments.jsonl", "".join(lines))
    summary = summarise_agreement(comp, [p["category"] for p in pairs])
    summary.update(judge=judge.name, data=cfg.data.path, split=cfg.data.split, principle=principle,
                   chain_of_thought=cfg.judge.chain_of_thought, usage=judge.usage(), time_s=time.time() - t0)
    if "option_mass" in summary["usage"] and summary["usage"].get("requests"):
        summary["mean_option_mass"] = summary["usage"]["option_mass"] / summary["usage"]["requests"]
    if cfg.self_consistency_repeats:
        summary["self_consistency"] = self_consistency(
            judge, [p["prompt"] for p in pairs], [p["chosen"] for p in pairs], [p["rejected"] for p in pairs],
            principle, repeats=cfg.self_consistency_repeats)
    write_summary(run_dir, summary)
    log("judge: agreement with the human labels\n" + format_table(summary)
        + f"\n  chosen shown first {summary['agreement_chosen_first']:.3f}, shown second "
          f"{summary['agreement_chosen_second']:.3f}; first-position preference "
          f"{summary['first_position_preference']:.3f}; usage {summary['usage']}")
    return summary
