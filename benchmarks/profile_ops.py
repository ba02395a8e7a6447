"""Op-level profiles (torch.profiler, self CPU time) of the rows where `make bench` shows alignkit not ahead of TRL
or below the machine's bound:

- ``rm``: a reward-model step on the 4-layer cut (8 x 128 tokens);
- ``decode``: batch-1 greedy decoding with the full model (24 tokens);
- ``gemv``: what batch-1 decoding could reach: each weight shape as bare ``F.linear`` GEMVs at 1 and 2 threads (GB/s),
  all 211 weight matrices in a row (ms/token, no other op), a read-only ``sum`` of 256 MiB, and ``generate`` with the
  weights in fp32 and in bf16 (ms/token, share of greedy tokens that agree);
- ``lora``: a full-model LoRA SFT step (LoRA r=16 on every linear, as `make bench`; 4 x 128 tokens), in fp32 and
  under bf16 autocast;
- ``grpo``: one GRPO iteration with the same LoRA (2 prompts x G=4 samples of 32 tokens: sampling, old log-probs,
  one update), split into its phases.

Run: OMP_NUM_THREADS=2 .venv/bin/python benchmarks/profile_ops.py [rm] [decode] [gemv] [lora] [grpo]   (default: all)
"""
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from alignkit.models.loading import load_tokenizer, resolve_path

MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
              "aten::_scaled_dot_product_flash_attention_for_cpu_backward", "aten::linear")
N_LAYER = 3.54e6  # matmul weights of one SmolLM2-135M decoder layer
N_HEAD = 576 * 49152  # the LM head (tied to the embedding)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

torch.manual_seed(0)
PATH = resolve_path("smollm2-135m-instruct")
TOK = load_tokenizer("smollm2-135m-instruct")


def table(p, title: str, n: int = 8) -> None:
    ev = p.key_averages()
    tot = sum(e.self_cpu_time_total for e in ev)
    rows = sorted(ev, key=lambda e: -e.self_cpu_time_total)[:n]
    mm = sum(e.self_cpu_time_total for e in ev if e.key in MATMUL_OPS)
    print(f"\n## {title}: self CPU total {tot / 1e6:.2f} s, matmul-type ops {mm / tot:.0%}")
    for e in rows:
        print(f"  {e.key:60s} {e.self_cpu_time_total / 1e6:7.3f} s  {e.self_cpu_time_total / tot:5.1%}  calls {e.count}")


def timed_profile(fn, repeats: int = 2):
    fn()  # warm-up
    t = time.time()
    with profile(activities=[ProfilerActivity.CPU]) as p:
        for _ in range(repeats):
            fn()
    return p, (time.time() - t) / repeats


def rm_step_profile() -> None:
    rm = AutoModelForSequenceClassification.from_pretrained(PATH, num_labels=1, num_hidden_layers=4)
    rm.config.pad_token_id = TOK.pad_token_id
    opt = torch.optim.AdamW(rm.parameters(), lr=1e-5)
    ids = torch.randint(100, 40000, (8, 128))
    mask = torch.ones_like(ids)

    def step():
        s = rm(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
        loss = -torch.nn.functional.logsigmoid(s[:4] - s[4:]).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()

    p, w = timed_profile(step)
    flops = 6 * 4 * N_LAYER * ids.numel()
    print(f"\nRM step wall {w:.2f} s; 6*N*tokens = {flops / 1e9:.1f} GFLOP -> {flops / w / 1e9:.0f} GFLOP/s")
    table(p, "RM step (4-layer cut, 8 x 128 tokens)")


def decode_profile() -> None:
    lm = AutoModelForCausalLM.from_pretrained(PATH).eval()
    x = TOK("Write a short review of a smartwatch.", return_tensors="pt")
    with torch.no_grad():
        p, w = timed_profile(lambda: lm.generate(**x, max_new_tokens=24, min_new_tokens=24, do_sample=False), 1)
    print(f"\nbatch-1 generate 24 tokens wall {w:.2f} s ({w / 24 * 1e3:.0f} ms/token)")
    table(p, "batch-1 decode (full model)", 10)


def lora_model():
    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(PATH)
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS))


def lora_sft_profile() -> None:
    from alignkit.ops.logprobs import token_logprobs

    model = lora_model()
    model.train()
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(100, 40000, (4, 128))
    mask = torch.ones_like(ids)
    # the frozen weights: forward 2N + input gradients 2N; the adapters 6 N_lora (common.training_flops_per_token)
    flops = (4 * (30 * N_LAYER + N_HEAD) + 6 * n_lora) * ids.numel()
    for dtype in (None, torch.bfloat16):
        def step():
            with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                logp = token_logprobs(model, ids, mask)  # [B, T]
            loss = -logp[:, 1:].mean()
            loss.backward()
            opt.step()
            opt.zero_grad()

        p, w = timed_profile(step)
        name = "bf16 autocast" if dtype else "fp32"
        print(f"\nLoRA SFT step ({name}) wall {w:.2f} s; (4N + 6N_lora)*tokens = {flops / 1e9:.0f} GFLOP -> "
              f"{flops / w / 1e9:.0f} GFLOP/s")
        table(p, f"full-model LoRA SFT step, {name} (4 x 128 tokens)", 10)


def grpo_profile() -> None:
    """One GRPO iteration, phase by phase, on the live LoRA model (what alignkit's harness does per iteration)."""
    from alignkit.losses.grpo import grpo_token_loss
    from alignkit.rollout.engine import HFGenerateBackend, SamplingParams, generate_rollouts, response_logprobs

    model = lora_model()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    prompts = [TOK.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in ("What is 17 + 25?", "What is 9 * 7?")]
    enc = TOK(prompts, return_tensors="pt", padding=True, padding_side="left")
    params = SamplingParams(max_new_tokens=32, temperature=1.0)
    phases: dict[str, float] = {}

    def iteration():
        t = time.time()
        roll = generate_rollouts(HFGenerateBackend(model, TOK), TOK, enc["input_ids"], enc["attention_mask"], params,
                                 num_samples=4)
        phases["sample"] = time.time() - t
        t = time.time()
        with torch.no_grad():
            old = response_logprobs(model, roll, 1.0)  # [B, R]
        phases["old_logprobs"] = time.time() - t
        t = time.time()
        adv = torch.randn(len(roll))  # [B] stands in for the group-normalised rewards
        model.train()
        new = response_logprobs(model, roll, 1.0)  # [B, R]
        mask = roll.response_mask.float()
        loss = (grpo_token_loss(new, old, None, adv, beta=0.0) * mask).sum() / mask.sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
        phases["update"] = time.time() - t

    p, w = timed_profile(iteration, 1)
    print(f"\nGRPO iteration wall {w:.2f} s: " + ", ".join(f"{k} {v:.2f} s ({v / w:.0%})" for k, v in phases.items()))
    table(p, "GRPO iteration with LoRA (2 prompts x 4 samples x 32 tokens)", 12)


def _median_s(fn, n: int = 10) -> float:
    fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def gemv_profile() -> None:
    import copy

    import torch.nn.functional as F

    lm = AutoModelForCausalLM.from_pretrained(PATH).eval()
    weights = [m.weight for m in lm.modules() if isinstance(m, torch.nn.Linear)]
    nbytes = sum(w.numel() * 4 for w in weights)
    threads = torch.get_num_threads()
    with torch.no_grad():
        for t in sorted({1, threads}):
            torch.set_num_threads(t)
            for shape in sorted({tuple(w.shape) for w in weights}):
                ws = [w for w in weights if tuple(w.shape) == shape]
                x = torch.randn(1, shape[1])
                s = _median_s(lambda: [F.linear(x, w) for w in ws])
                print(f"{t} thread(s): F.linear [1, {shape[1]}] x {list(shape)} (x{len(ws)}): "
                      f"{sum(w.numel() * 4 for w in ws) / s / 1e9:.1f} GB/s")
        torch.set_num_threads(threads)
        xs = {d: torch.randn(1, d) for d in {w.shape[1] for w in weights}}
        s = _median_s(lambda: [F.linear(xs[w.shape[1]], w) for w in weights])
        print(f"all {len(weights)} weight matrices as bare GEMVs: {s * 1e3:.1f} ms/token ({nbytes / s / 1e9:.1f} GB/s)")
        big = torch.randn(64 * 2**20)
        print(f"read-only sum of 256 MiB: {big.numel() * 4 / _median_s(big.sum) / 1e9:.1f} GB/s")
        x = TOK("Write a happy review of a movie.", return_tensors="pt")
        kw = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=TOK.pad_token_id)
        bf16 = copy.deepcopy(lm).to(torch.bfloat16)
        out = {}
        for name, model in (("fp32", lm), ("bf16 weights", bf16)):
            full = _median_s(lambda: model.generate(**x, **kw), 3)  # noqa: B023 (called at once)
            prefill = _median_s(lambda: model.generate(**x, **{**kw, "max_new_tokens": 1, "min_new_tokens": 1}), 3)  # noqa: B023
            out[name] = model.generate(**x, **kw)
            print(f"generate, {name}: {(full - prefill) / 31 * 1e3:.1f} ms/token decode")
        agree = (out["fp32"] == out["bf16 weights"])[:, x["input_ids"].shape[1]:].float().mean().item()
        print(f"greedy tokens of bf16 weights equal to fp32's at {agree:.0%} of the 32 positions")


SECTIONS = {"rm": rm_step_profile, "decode": decode_profile, "gemv": gemv_profile, "lora": lora_sft_profile, "grpo": grpo_profile}

if __name__ == "__main__":
    for name in sys.argv[1:] or list(SECTIONS):
        SECTIONS[name]()
