"""PPO settings on a finished quickstart run: retrain only the PPO stage with other settings, then evaluate it
(and, once per run dir, the SFT and DPO policies) on the held-out prompts with more samples than the quickstart
draws, so that settings can be told apart. Gains over SFT are paired by prompt; the KL is the exact next-token KL
(``sequence_kl``), with the sampled-token k1 beside it as a check.

    .venv/bin/python benchmarks/quickstart_ppo.py runs/quickstart ep2it9 ppo_epochs=2 ppo_iterations=9
    .venv/bin/python benchmarks/quickstart_ppo.py runs/quickstart lam1 --ppo lam=1.0

Quickstart keys (``ppo_lr=...``) set the quickstart's PPO stage as ``alignkit quickstart`` would; ``--ppo k=v``
sets any ``ppo.*`` field on top. One JSON line per setting is appended to ``<run>/../ppo_sweep.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
import yaml

from alignkit.ops.threads import configure_allocator, configure_threads


def parse_pairs(pairs: list[str]) -> dict:
    out = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep:
            raise SystemExit(f"expected key=value, got {p!r}")
        out[key] = yaml.safe_load(value)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a finished quickstart run dir (runs/quickstart)")
    ap.add_argument("name", help="name of this setting (its PPO run goes to <run>/../ppo_sweep/<name>)")
    ap.add_argument("overrides", nargs="*", help="quickstart keys, key=value")
    ap.add_argument("--ppo", nargs="*", default=[], help="ppo.* fields, key=value")
    ap.add_argument("--samples", type=int, default=16, help="samples per held-out prompt")
    ap.add_argument("--kl-samples", type=int, default=8, help="of which the KL is estimated on")
    args = ap.parse_args()
    configure_allocator()
    configure_threads()

    from alignkit.algorithms import ppo
    from alignkit.config import ModelConfig, QuickstartConfig, RLDataConfig
    from alignkit.eval.policy import PolicyEval, evaluate_policy, mean_se, paired_difference, sequence_kl
    from alignkit.models.loading import load_policy, load_tokenizer, resolve_path
    from alignkit.pipelines import quickstart as Q
    from alignkit.rewards.gold import vader_scores
    from alignkit.rollout.engine import SamplingParams
    from alignkit.rollout.prompts import load_prompts
    from alignkit.train.run import native_bf16
    from transformers import AutoConfig

    base = args.run.resolve()
    q = QuickstartConfig(**parse_pairs(args.overrides))
    n_layers = AutoConfig.from_pretrained(resolve_path(q.policy)).num_hidden_layers
    lora = Q.policy_lora(q, n_layers)
    out = base.parent / "ppo_sweep" / args.name
    shutil.rmtree(out, ignore_errors=True)
    sft_dir = str(base / "sft/model")
    precision = "bf16" if native_bf16() else "no"
    cfg = Q.ppo_config(q, out, sft_dir, str(base / "rm_sentiment/model"), base / "data/train_prompts.jsonl", lora,
                       precision)
    cfg = cfg.model_copy(update={"ppo": cfg.ppo.model_copy(update=parse_pairs(args.ppo))})
    t0 = time.time()
    model_dir = ppo.train(cfg)["model_dir"]
    ppo_seconds = time.time() - t0

    tok = load_tokenizer(q.policy)
    data = RLDataConfig(train=str(base / "data/train_prompts.jsonl"), eval=str(base / "data/eval_prompts.jsonl"))
    prompts = load_prompts(data, tok, q.max_new_tokens, "eval")
    params = SamplingParams(max_new_tokens=q.max_new_tokens, temperature=1.0)
    sft = load_policy(ModelConfig(name_or_path=sft_dir), tok, trainable=False)
    amp = torch.bfloat16 if precision == "bf16" else None
    N, K = args.samples, args.kl_samples

    def evaluate(tag: str, path: str, seed: int) -> tuple[PolicyEval, list[float] | None]:
        cache = base.parent / "ppo_sweep" / f"eval_{tag}_{N}x{K}.json"
        if tag != "ppo" and cache.is_file():
            d = json.loads(cache.read_text())
            return PolicyEval(**d["eval"]), d["k1"]
        m = sft if tag == "sft" else load_policy(ModelConfig(name_or_path=path), tok, trainable=False)
        r, roll = evaluate_policy(tag, m, tok, prompts, vader_scores, params, N, reference=sft, kl_samples=K,
                                  batch_size=q.generation_batch_size, seed=seed, autocast_dtype=amp)
        rows = roll.select(torch.nonzero(torch.arange(len(roll)) % N < K).flatten())
        k1 = None if tag == "sft" else list(mean_se(sequence_kl(m, sft, rows, estimator="k1").tolist()))
        if tag != "ppo":
            cache.write_text(json.dumps({"eval": asdict(r), "k1": k1}))
        return r, k1

    e_sft, _ = evaluate("sft", sft_dir, q.seed + 103)
    row = {"run": str(base), "name": args.name, "overrides": args.overrides, "ppo": args.ppo, "samples": N,
           "kl_samples": K, "ppo_seconds": round(ppo_seconds)}
    for tag, path, seed in (("dpo", str(base / "dpo/model"), q.seed + 104), ("ppo", model_dir, q.seed + 105)):
        e, k1 = evaluate(tag, path, seed)
        gain, se, _ = paired_difference(e.samples, e_sft.samples)
        row[tag] = {"gold_vs_sft": round(gain, 4), "se": round(se, 4), "kl": round(e.kl_mean, 3),
                    "kl_se": round(e.kl_se, 3), "kl_estimator": e.kl_estimator,
                    "kl_k1": [round(x, 3) for x in k1]}
    print(json.dumps(row))
    with open(base.parent / "ppo_sweep.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
