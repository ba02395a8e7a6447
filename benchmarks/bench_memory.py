"""Peak memory: (1) a preference-training step against vocabulary size, with and without chunked log-probs;
(2) PPO against SFT with LoRA on the embedded model, on the same prompts and response length.

    python benchmarks/bench_memory.py            # (1): prints a table, writes results/<date>-memory.json
    python benchmarks/bench_memory.py --ppo      # (2): writes results/<date>-memory-ppo.json

Each (vocab, path) pair runs a DPO-shaped step (policy forward + backward over 2B sequences, summed response
log-probs, AdamW) in its own subprocess, and reports the process's peak RSS minus the RSS after the model and
optimizer state exist: the activation + logits memory a step adds. ``plain`` materialises the [2B, T, V] fp32
logits (and autograd keeps them for the backward); ``chunked`` (``token_logprobs`` over its logits budget) runs
the LM head on token chunks and never holds them. Memory, not time: the numbers do not depend on load.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, peak_rss_mb, results_path, write_json  # noqa: E402


def worker(vocab: int, path: str, batch: int, seq: int, hidden: int, layers: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from alignkit.ops.logprobs import sequence_logprobs
    import alignkit.ops.logprobs as lp

    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
                      max_position_embeddings=seq, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(0, vocab, (2 * batch, seq))
    mask = torch.ones_like(ids)
    response = torch.zeros_like(ids)
    response[:, seq // 4:] = 1
    budget = 64 << 20 if path == "chunked" else 1 << 60
    lp.LOGITS_BUDGET_BYTES = budget
    for p in model.parameters():  # create AdamW's state up front, so the baseline holds it
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    base = peak_rss_mb()
    logps = sequence_logprobs(model, ids, mask, response)  # [2B]
    loss = -torch.nn.functional.logsigmoid(logps[:batch] - logps[batch:]).mean()
    loss.backward()
    opt.step()
    peak = peak_rss_mb()
    logits_mb = 2 * batch * seq * vocab * 4 / 2**20
    return {"vocab": vocab, "path": path, "baseline_mb": round(base, 1), "peak_mb": round(peak, 1),
            "step_mb": round(peak - base, 1), "fp32_logits_mb": round(logits_mb, 1), "loss": float(loss)}


LORA = ["model.lora.enabled=true", "model.lora.r=16",
        "model.lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]",
        "model.lora.layers_to_transform=[24,25,26,27,28,29]"]  # the quickstart's LoRA: the last 6 of 30 layers


def ppo_vs_sft_worker(job: str, workdir: Path, batch: int, new_tokens: int, extra: list[str]) -> dict:
    """One alignkit command in this process; returns its peak RSS (model loading included: what a user needs)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from alignkit.cli import main as cli
    from alignkit.data.builtin import sentiment_prompts
    from alignkit.models.loading import resolve_path

    torch.manual_seed(0)
    prompts = [r["prompt"] for r in sentiment_prompts("train")[:batch]]
    common = ["model.name_or_path=smollm2-135m-instruct", *LORA, "train.mixed_precision=no", "train.save_model=false",
              f"train.output_dir={workdir / job}"]
    if job == "sft":  # the same prompts, each with a completion of exactly new_tokens tokens
        tok = AutoTokenizer.from_pretrained(resolve_path("smollm2-135m-instruct"))
        words = tok.decode(list(range(1000, 1000 + new_tokens)))
        data = workdir / "sft.jsonl"
        data.write_text("".join(json.dumps({"prompt": p, "completion": words}) + "\n" for p in prompts))
        args = ["sft", f"data.train={data}", f"train.batch_size={batch}", "train.max_steps=2", "data.max_length=512"]
    else:  # PPO as the quickstart runs it: a 4-layer critic cut from the policy, a MiniLM reward model
        rm = workdir / "rm"
        if not rm.exists():
            src = resolve_path("minilm")
            AutoModelForSequenceClassification.from_pretrained(src, num_labels=1).save_pretrained(rm)
            AutoTokenizer.from_pretrained(src).save_pretrained(rm)
        data = workdir / "prompts.jsonl"
        data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
        args = ["ppo", f"data.train={data}", f"ppo.reward_model={rm}", "ppo.value_model=smollm2-135m-instruct",
                "ppo.value_layers=4", f"ppo.rollout_batch_size={batch}", "ppo.num_iterations=2", "ppo.ppo_epochs=1",
                "ppo.num_minibatches=1", f"ppo.micro_batch_size={batch}", f"generation.max_new_tokens={new_tokens}",
                "generation.temperature=1.0"]
    rc = cli([*args, *common, *extra])
    return {"job": job, "rc": rc, "peak_mb": round(peak_rss_mb(), 1), "extra": extra}


def ppo_vs_sft(batch: int, new_tokens: int, extra: list[str]) -> None:
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory(prefix="alignkit-bench-memory-") as tmp:
        for job in ("sft", "ppo"):
            out = subprocess.run([sys.executable, __file__, "--ppo-worker", job, tmp, "--batch", str(batch),
                                  "--new-tokens", str(new_tokens), *[f"--set={x}" for x in extra]],
                                 check=True, capture_output=True, text=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    ratio = rows[1]["peak_mb"] / rows[0]["peak_mb"]
    print(markdown_table(["job", "peak RSS MiB"], [[r["job"], r["peak_mb"]] for r in rows]))
    print(f"PPO / SFT peak memory: {ratio:.2f}x (target <= 1.5x)")
    write_json(results_path("memory-ppo"), {"batch": batch, "new_tokens": new_tokens, "extra": extra, "rows": rows,
                                            "ratio": ratio})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocabs", default="5000,50000")
    ap.add_argument("--batch", type=int, default=None,
                    help="pairs per step (2x sequences; default 4), or --ppo: prompts per batch (default 8)")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--worker", nargs=2, metavar=("VOCAB", "PATH"))
    ap.add_argument("--ppo", action="store_true", help="PPO vs SFT with LoRA on the embedded model")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--set", action="append", default=[], help="extra config override for both jobs (--ppo)")
    ap.add_argument("--ppo-worker", nargs=2, metavar=("JOB", "DIR"))
    args = ap.parse_args()
    if args.ppo_worker:
        print(json.dumps(ppo_vs_sft_worker(args.ppo_worker[0], Path(args.ppo_worker[1]), args.batch or 8, args.new_tokens,
                                           args.set)))
        return
    if args.ppo:
        ppo_vs_sft(args.batch or 8, args.new_tokens, args.set)
        return
    args.batch = args.batch or 4
    if args.worker:
        print(json.dumps(worker(int(args.worker[0]), args.worker[1], args.batch, args.seq, args.hidden, args.layers)))
        return
    rows = []
    for vocab in [int(v) for v in args.vocabs.split(",")]:
        for path in ("plain", "chunked"):
            out = subprocess.run([sys.executable, __file__, "--worker", str(vocab), path, "--batch", str(args.batch),
                                  "--seq", str(args.seq), "--hidden", str(args.hidden), "--layers", str(args.layers)],
                                 check=True, capture_output=True, text=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(markdown_table(["vocab", "path", "fp32 logits MiB", "step peak over baseline MiB", "loss"],
                         [[r["vocab"], r["path"], r["fp32_logits_mb"], r["step_mb"], round(r["loss"], 4)] for r in rows]))
    write_json(results_path("memory"), {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
