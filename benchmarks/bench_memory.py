"""Peak memory of a preference-training step against vocabulary size, with and without chunked log-probs.

    python benchmarks/bench_memory.py            # prints a table, writes results/<date>-memory.json

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocabs", default="5000,50000")
    ap.add_argument("--batch", type=int, default=4, help="pairs per step (2x sequences)")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--worker", nargs=2, metavar=("VOCAB", "PATH"))
    args = ap.parse_args()
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
