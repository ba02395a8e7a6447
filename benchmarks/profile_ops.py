"""Op-level profiles (torch.profiler, self CPU time) of a reward-model step on the 4-layer cut and of batch-1 decoding
with the full model: the two rows where `make bench` shows alignkit not ahead of TRL / below the bandwidth bound.
Run: OMP_NUM_THREADS=2 .venv/bin/python benchmarks/profile_ops.py"""
import time, torch
from torch.profiler import profile, ProfilerActivity
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
from alignkit.models.loading import load_tokenizer, resolve_path
torch.manual_seed(0)
path = resolve_path("smollm2-135m-instruct"); tok = load_tokenizer("smollm2-135m-instruct")
def table(p, title, n=8):
    ev = p.key_averages(); tot = sum(e.self_cpu_time_total for e in ev)
    rows = sorted(ev, key=lambda e: -e.self_cpu_time_total)[:n]
    mm = sum(e.self_cpu_time_total for e in ev if e.key in ("aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::linear"))
    print(f"\n## {title}: self CPU total {tot/1e6:.2f} s, matmul-type ops {mm/tot:.0%}")
    for e in rows: print(f"  {e.key:60s} {e.self_cpu_time_total/1e6:7.3f} s  {e.self_cpu_time_total/tot:5.1%}  calls {e.count}")
# 1. RM step, 4-layer cut, 8 sequences x 128 tokens
rm = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, num_hidden_layers=4); rm.config.pad_token_id = tok.pad_token_id
opt = torch.optim.AdamW(rm.parameters(), lr=1e-5)
ids = torch.randint(100, 40000, (8, 128)); m = torch.ones_like(ids)
def rm_step():
    s = rm(input_ids=ids, attention_mask=m).logits.squeeze(-1)
    loss = -torch.nn.functional.logsigmoid(s[:4] - s[4:]).mean(); loss.backward(); opt.step(); opt.zero_grad()
rm_step()
t = time.time()
with profile(activities=[ProfilerActivity.CPU]) as p: rm_step(); rm_step()
w = (time.time() - t) / 2; N = 4 * 3.54e6
print(f"\nRM step wall {w:.2f} s; 6*N*tokens = {6*N*1024/1e9:.1f} GFLOP -> {6*N*1024/w/1e9:.0f} GFLOP/s")
table(p, "RM step (4-layer cut, 8 x 128 tokens)")
# 2. batch-1 decode, full model
lm = AutoModelForCausalLM.from_pretrained(path).eval()
x = tok("Write a short review of a smartwatch.", return_tensors="pt")
with torch.no_grad():
    lm.generate(**x, max_new_tokens=4, do_sample=False)
    t = time.time()
    with profile(activities=[ProfilerActivity.CPU]) as p: lm.generate(**x, max_new_tokens=24, min_new_tokens=24, do_sample=False)
    w = time.time() - t
print(f"\nbatch-1 generate 24 tokens wall {w:.2f} s ({w/24*1e3:.0f} ms/token)")
table(p, "batch-1 decode (full model)", 10)
