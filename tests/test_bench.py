"""benchmarks/bench.py's arithmetic, aggregation, diff and JSON (no real benchmark runs here), the fused-AdamW
switch (``train.optimizer``) and the static-cache switch (``generation.cache_implementation``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench  # noqa: E402
import common as C  # noqa: E402

from alignkit.config import ConfigError, GenerationSection, SFTConfig, TrainConfig, load_config  # noqa: E402
from alignkit.models.tiny import tiny_causal_lm  # noqa: E402
from alignkit.rollout.backends import make_backend  # noqa: E402
from alignkit.rollout.engine import SamplingParams  # noqa: E402
from alignkit.train.optim import build_optimizer  # noqa: E402


# ---------------------------------------------------------------- arithmetic (hand-computed)
def test_decode_bytes_hand_example():
    # W = 1000, kv = 10, rows = 2, context = 5, steps = 3: 3*1000 + 10*2*(5 + 6 + 7) = 3360
    assert bench.decode_bytes(1000, 10, 2, 5, 3) == 3360
    assert bench.decode_bytes(1000, 10, 1, 0, 1) == 1000  # one step over an empty cache: the weights only


def test_kv_bytes_per_position_counts_k_and_v_of_every_layer():
    cfg = SimpleNamespace(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=16)
    # 2 (K, V) * 2 layers * 2 kv heads * head_dim 4 * 4 bytes = 128
    assert bench.kv_bytes_per_position(cfg) == 128
    assert bench.kv_bytes_per_position(cfg, bytes_per_value=2) == 64


def test_bound_and_flop_fractions_hand_examples():
    # 3.6e9 bytes at 12 GB/s = 0.3 s; measured 0.6 s -> 50 %
    assert bench.bound_fraction(0.6, 3.6e9, 12.0) == pytest.approx(0.5)
    # 6e8 FLOPs/token at 100 tokens/s = 60 GFLOP/s; peak 100 GFLOP/s -> 60 %
    assert bench.flop_fraction(6e8, 100.0, 100.0) == pytest.approx(0.6)


def test_training_flops_per_token_full_and_lora():
    assert C.training_flops_per_token(100) == 600  # 6 N
    assert C.training_flops_per_token(100, 10) == 460  # 4 N frozen + 6 N_lora


def test_lora_params_hand_example_and_against_peft():
    cfg = SimpleNamespace(hidden_size=8, num_attention_heads=2, num_key_value_heads=1, intermediate_size=16,
                          num_hidden_layers=3)
    # q_proj 8 -> 8: r (8 + 8) = 32; down_proj 16 -> 8: r (16 + 8) = 48; (32 + 48) * 3 layers = 240
    assert C.lora_params(cfg, 2, ["q_proj", "down_proj"]) == 240
    from peft import LoraConfig, get_peft_model

    model, _ = tiny_causal_lm()
    targets = bench.LORA["target_modules"]
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert C.lora_params(model.config, 4, targets) == trainable


# ---------------------------------------------------------------- aggregation
def fake_offline_run(step_s, loss=0.5, rss=1000.0, tokens=30):
    return {"step_s": step_s, "tokens": tokens, "steps": len(step_s), "peak_rss_mb": rss, "final_loss": loss,
            "loop_s": sum(step_s)}


def test_offline_side_drops_first_steps_and_pools_repeats():
    runs = [fake_offline_run([3.0, 1.0, 2.0]), fake_offline_run([4.0, 1.5, 1.0], rss=1200.0),
            {"error": "boom"}]
    side = bench.offline_side(runs)
    assert side["s_per_step"] == pytest.approx(1.25)  # median of 1, 2, 1.5, 1
    assert side["tokens_per_s"] == pytest.approx(10 / 1.25)  # 30 tokens / 3 steps per step
    assert side["peak_rss_mb"] == 1200.0 and side["repeats_ok"] == 2
    assert bench.offline_side([{"error": "x"}]) is None


def test_losses_agree_and_train_row_ratio():
    assert bench.losses_agree(18.17, 18.25) is True  # 0.08 <= 0.01 + 0.02 * 18.25
    assert bench.losses_agree(0.47, 0.60) is False
    assert bench.losses_agree(None, 1.0) is None
    sides = {"alignkit": bench.offline_side([fake_offline_run([1.0, 1.0])]),
             "trl": bench.offline_side([fake_offline_run([2.0, 2.0], loss=0.9)])}
    row = bench.train_row("sft", "cut4", "a", sides, flops_per_token=6e8, peak_gflops=100.0)
    assert row["ratio"] == pytest.approx(2.0)
    assert row["losses_agree"] is False
    # 15 tokens/step / 1 s = 15 tok/s; 6e8 * 15 / 1e11 = 9 %
    assert row["sides"]["alignkit"]["flop_fraction"] == pytest.approx(0.09)
    missing = bench.train_row("sft", "cut4", "a", {"alignkit": sides["alignkit"], "trl": None}, None, 100.0)
    assert missing["ratio"] is None and missing["sides"]["alignkit"]["flop_fraction"] is None


def test_settings_and_bf16_decision():
    slow = {"matmul_fp32": {"peak_gflops": 100.0}, "matmul_bf16": {"peak_gflops": 5.0}}
    fast = {"matmul_fp32": {"peak_gflops": 100.0}, "matmul_bf16": {"peak_gflops": 400.0}}
    assert bench.bf16_decision(slow)["bf16"] is False and bench.bf16_decision(fast)["bf16"] is True
    a, b = bench.setting_spec("a", True), bench.setting_spec("b", False)
    assert (a["optimizer"], a["trl_optim"], a["padding_free"], a["mixed_precision"]) == ("adamw", "adamw_torch",
                                                                                         False, "no")
    assert (b["optimizer"], b["trl_optim"], b["padding_free"], b["mixed_precision"]) == (
        "adamw_fused", "adamw_torch_fused", True, "no")
    assert bench.setting_spec("b", True)["mixed_precision"] == "bf16"
    with pytest.raises(ValueError, match="unknown setting 'c'"):
        bench.setting_spec("c", False)


# ---------------------------------------------------------------- diff against the previous result
def test_compare_flags_only_changes_the_bad_way_beyond_the_threshold():
    old = {"t s/step": (2.0, "lower"), "g tokens/s": (100.0, "higher"), "h tokens/s": (100.0, "higher"),
           "m peak RSS MiB": (1000.0, "lower"), "only old": (1.0, "lower")}
    new = {"t s/step": (2.3, "lower"), "g tokens/s": (95.0, "higher"), "h tokens/s": (80.0, "higher"),
           "m peak RSS MiB": (900.0, "lower"), "only new": (1.0, "lower")}
    rows = {r["metric"]: r for r in bench.compare(old, new, 0.10)}
    assert set(rows) == {"t s/step", "g tokens/s", "h tokens/s", "m peak RSS MiB"}
    assert rows["t s/step"]["change"] == pytest.approx(0.15) and rows["t s/step"]["worse"]
    assert rows["g tokens/s"]["change"] == pytest.approx(-0.05) and not rows["g tokens/s"]["worse"]
    assert rows["h tokens/s"]["worse"]
    assert not rows["m peak RSS MiB"]["worse"]  # less memory is better
    table = bench.compare_table(list(rows.values()))
    assert "+15.0%" in table and "WORSE" in table


def test_previous_result_picks_newest_of_the_same_kind(tmp_path):
    for name in ("2026-11-30-bench.json", "2026-12-01-bench.json", "2026-12-01-bench-2.json",
                 "2026-12-01-bench-10.json", "2026-12-01-bench-quick.json", "2026-12-02-offline.json"):
        (tmp_path / name).write_text("{}")
    assert bench.previous_result(tmp_path).name == "2026-12-01-bench-10.json"
    assert bench.previous_result(tmp_path, exclude=tmp_path / "2026-12-01-bench-10.json").name == \
        "2026-12-01-bench-2.json"
    assert bench.previous_result(tmp_path, "bench-quick").name == "2026-12-01-bench-quick.json"
    assert bench.previous_result(tmp_path / "nowhere") is None


def fake_payload(s_per_step: float) -> dict:
    sides = {"alignkit": bench.offline_side([fake_offline_run([s_per_step, s_per_step])]),
             "trl": bench.offline_side([fake_offline_run([2.0, 2.0])])}
    return {
        "limits": {"matmul_fp32": {"peak_gflops": 90.0}, "matmul_bf16": {"peak_gflops": 4.0},
                   "copy": {"peak_gbs": 12.0}},
        "train_rows": [bench.train_row("dpo", "full-lora", "b", sides, 5e8, 90.0)],
        "generation_rows": [{"batch": 1, "mode": "greedy", "cache": "static", "tokens_per_s": 20.0}],
    }


def test_flat_metrics_schema_and_json_round_trip():
    payload = json.loads(json.dumps(fake_payload(1.0)))  # what the results file holds
    flat = bench.flat_metrics(payload)
    assert flat["limits/matmul_fp32 GFLOP/s"] == (90.0, "higher")
    assert flat["limits/copy GB/s"] == (12.0, "higher")
    assert flat["train/dpo/full-lora/b/alignkit s/step"] == (1.0, "lower")
    assert flat["train/dpo/full-lora/b/trl s/step"] == (2.0, "lower")
    assert flat["generation/batch 1/greedy/static tokens/s"] == (20.0, "higher")
    diff = bench.compare(flat, bench.flat_metrics(fake_payload(1.5)))
    worse = [r["metric"] for r in diff if r["worse"]]
    assert worse == ["train/dpo/full-lora/b/alignkit s/step"]
    table = bench.training_table(payload["train_rows"])
    assert "full-lora" in table and "NO" not in table.split("\n")[2]  # losses 0.5 vs 0.5 agree


def test_generation_rows_use_the_bound_arithmetic():
    cfg = C.truncated_config(None)  # the embedded model's config (30 layers)
    result = {"runs": [{"batch": 2, "mode": "greedy", "cache": "dynamic", "seconds": 2.0, "steps": 10,
                        "prompt_width": 20, "prefill_s": 0.5}]}
    (row,) = bench.generation_rows(result, bandwidth_gbs=10.0)
    nbytes = bench.decode_bytes(4 * C.matmul_params(cfg, lm_head=True), bench.kv_bytes_per_position(cfg), 2, 20, 10)
    assert row["bound_bytes"] == nbytes
    assert row["tokens_per_s"] == pytest.approx(10.0)  # 2 rows x 10 steps / 2 s
    assert row["fraction_of_bound"] == pytest.approx(nbytes / 1e10 / 2.0)
    assert row["decode_fraction_of_bound"] == pytest.approx(nbytes / 1e10 / 1.5)


# ---------------------------------------------------------------- train.optimizer: fused AdamW
def _two_steps(optimizer: str):
    model, _ = tiny_causal_lm(seed=3)
    cfg = TrainConfig(lr=1e-2, weight_decay=0.1, optimizer=optimizer, scheduler="constant")
    opt, sched = build_optimizer(model, cfg, total_steps=2)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    for _ in range(2):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return model, opt


def test_fused_adamw_equals_plain_adamw():
    plain, opt_plain = _two_steps("adamw")
    fused, opt_fused = _two_steps("adamw_fused")
    assert opt_fused.defaults["fused"] is True and not opt_plain.defaults["fused"]
    start, _ = tiny_causal_lm(seed=3)
    moved = sum(float((p - q).detach().abs().sum()) for p, q in zip(plain.parameters(), start.parameters()))
    assert moved > 0  # the steps changed the weights (a comparison that can fail)
    for p, q in zip(plain.parameters(), fused.parameters()):
        assert_close(q, p, rtol=1e-5, atol=1e-6)


def test_optimizer_switch_in_config_and_its_error(tmp_path):
    cfg = load_config(SFTConfig, None, ["train.optimizer=adamw_fused"])
    assert cfg.train.optimizer == "adamw_fused"
    assert SFTConfig().train.optimizer == "adamw"  # default unchanged
    with pytest.raises(ConfigError, match="train.optimizer"):
        load_config(SFTConfig, None, ["train.optimizer=sgd"])


# ---------------------------------------------------------------- generation.cache_implementation: static cache
def test_static_cache_generates_the_same_greedy_tokens():
    model, tok = tiny_causal_lm(seed=1)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # varied weights: greedy output changes from token to token
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    rows = [tok("hello there", add_special_tokens=False)["input_ids"], tok("hi", add_special_tokens=False)["input_ids"]]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    params = SamplingParams(8, do_sample=False)
    dynamic = make_backend(GenerationSection(), model, tok)
    static = make_backend(GenerationSection(cache_implementation="static"), model, tok)
    assert "cache_implementation" not in dynamic.generation_kwargs(params)
    assert static.generation_kwargs(params)["cache_implementation"] == "static"
    a, b = dynamic.generate(ids, mask, params), static.generate(ids, mask, params)
    assert a.shape[1] >= 3 and len(set(a[0].tolist())) >= 3  # a non-degenerate comparison
    assert torch.equal(a, b)


# ---------------------------------------------------------------- the whole command with mocked workers
def test_parent_main_with_mocked_workers_writes_json_tables_and_the_diff(tmp_path, monkeypatch, capsys):
    """parent_main end to end with every measurement replaced: the JSON schema, both tables, and on a second run
    (alignkit twice as slow) the change against the first, flagged."""
    slow = {"factor": 1.0}
    limits = {"matmul_fp32": {"n": 8, "peak_gflops": 80.0, "median_gflops": 70.0, "threads": 1},
              "matmul_bf16": {"n": 8, "peak_gflops": 1.0, "median_gflops": 1.0, "threads": 1},
              "copy": {"mib": 1, "peak_gbs": 12.0, "median_gbs": 11.0}}

    def fake_job(job, frameworks, repeats, spec_path, workdir, timeout, threads, tag=""):
        spec = json.loads(Path(spec_path).read_text())
        assert spec["optimizer"] == ("adamw_fused" if "/b/" in tag else "adamw")
        s = {"alignkit": 1.0 * slow["factor"], "trl": 2.0}
        return {fw: [fake_offline_run([3.0, s[fw], s[fw]])] for fw in frameworks}

    def fake_grpo(frameworks, repeats, spec_path, workdir, timeout, threads, tag=""):
        it = {"step_s": 2.0, "generation_s": 1.0, "scoring_s": 0.0, "training_s": 1.0, "completion_length": 8,
              "reward": 0.0, "loss": 0.0}
        return {fw: [{"iterations": [it, it], "peak_rss_mb": 900.0, "process_wall_s": 9.0}] for fw in frameworks}

    gen = {"runs": [{"batch": 1, "mode": "greedy", "cache": "dynamic", "seconds": 1.0, "steps": 8,
                     "prompt_width": 40, "prefill_s": 0.2}], "static_equals_dynamic_greedy": {"1": True}}
    monkeypatch.setattr(C, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(bench, "measure_limits", lambda size, n: limits)
    monkeypatch.setattr(bench.bench_offline, "prepare_inputs", lambda ns, jobs, workdir: {"data": {}})
    monkeypatch.setattr(bench.bench_offline, "run_job", fake_job)
    monkeypatch.setattr(bench.bench_grpo, "run_grpo", fake_grpo)
    monkeypatch.setattr(bench, "run_generation", lambda args, size, repeats, workdir: {"spec": {}, **gen})
    argv = ["--jobs", "sft,grpo", "--models", "cut4", "--workdir", str(tmp_path / "w")]
    assert bench.parent_main(bench.build_parser().parse_args(argv)) == 0
    first = json.loads(next(tmp_path.glob("*-bench.json")).read_text())
    assert {"command", "machine", "limits", "decisions", "spec", "train_rows", "train_runs", "generation_rows",
            "tables_markdown"} <= set(first)
    assert first["decisions"]["bf16"] is False
    rows = {(r["job"], r["setting"]): r for r in first["train_rows"]}
    assert set(rows) == {("sft", "a"), ("sft", "b"), ("grpo", "a"), ("grpo", "b")}
    assert rows["sft", "a"]["ratio"] == pytest.approx(2.0)
    assert "compare" not in first
    out = capsys.readouterr().out
    assert "Training" in out and "Generation" in out and "no previous" in out

    slow["factor"] = 2.0
    assert bench.parent_main(bench.build_parser().parse_args(argv)) == 0
    second = json.loads(sorted(tmp_path.glob("*-bench-2.json"))[0].read_text())
    worse = {r["metric"] for r in second["compare"]["rows"] if r["worse"]}
    assert worse == {"train/sft/cut4/a/alignkit s/step", "train/sft/cut4/b/alignkit s/step"}
    assert "Change against" in capsys.readouterr().out


def test_unknown_job_is_an_error_naming_the_option():
    with pytest.raises(SystemExit, match="--jobs: unknown \\['ppo'\\]"):
        bench.parent_main(bench.build_parser().parse_args(["--jobs", "ppo"]))


def test_preference_data_without_the_hhh_pairs(monkeypatch, capsys):
    """Where the HHH pairs cannot be had, the preference jobs run on red-team prompts with two different SFT
    demonstrations as replies, say so, and name that data in the spec (so results on other data are not compared
    unawares)."""
    import bench_offline

    from alignkit.data import builtin

    assert bench_offline.preference_source()[0] == "hhh"  # the tests' session has pairs (real or stand-in)
    monkeypatch.setattr(builtin, "hhh_unavailable", lambda: "gone")
    name, pairs = bench_offline.preference_source()
    assert name == "redteam+demos" and len(pairs) >= 600
    assert all(p["chosen"] != p["rejected"] and p["prompt"] for p in pairs)
    assert "preference jobs use red-team prompts" in capsys.readouterr().out
