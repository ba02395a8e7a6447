"""Data parallelism that holds: `accelerate launch` with 2 CPU processes (gloo) of per-device batch b trains exactly
as 1 process of batch 2b (the same examples per optimizer step, the gradient of their mean loss), through the real
CLI on tiny models.

9 training elements (13 DPO pairs), global micro-batches of 4: each epoch is 4 + 4 + 1 (4 + 4 + 4 + 1), so the
last micro-batch gives process 1 nothing (it runs a weight-0 pass); 2 epochs.

Measured on this machine (fp32, CPU, torch 2.13, accelerate 1.15), 2x2 against 1x4, worst step: loss 5.7e-8 /
3.0e-7 / 3.2e-7 relative (sft / dpo / rm), grad_norm 0 / 2.3e-7 / 5.4e-7 relative, final weights max-abs
1.2e-7 / 1.2e-7 / 2.4e-7 (float summation order: DDP's all-reduce, smaller padded batches). The tolerances below
leave a margin of more than 100x; the weights move by more than 1e-3, so they are not vacuous.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from multiproc import launch
from safetensors.torch import load_file

from alignkit.cli import main
from alignkit.models.tiny import save_tiny_models
from alignkit.train.logging import read_metrics

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
RTOL = 1e-4  # loss, grad_norm and logged metrics, relative
ATOL = 1e-5  # logged metrics, absolute (DPO rewards are beta * differences of sums of ~50 token log-probs)
WEIGHTS_ATOL = 1e-5  # final weights, max abs difference

SFT = [{"prompt": f"Q{i}: {'why ' * (i % 4)}?", "completion": f"A{i}{'!' * (i % 5)} done"} for i in range(9)]
PREFS = [{"prompt": f"Say {w}.", "chosen": f"{w.title()} to you{'!' * (i % 3)}", "rejected": "No" + "." * (i % 4)}
         for i, w in enumerate(["hi", "hello", "thanks", "bye", "yes", "please", "sorry"])] + [
    {"prompt": "Rate the film.", "responses": ["Loved it", "It was ok", "Hated it"], "ranking": [1, 2, 3]},
    {"prompt": "Rate the food.", "responses": ["Tasty!", "Bland", "Awful stuff"], "ranking": [1, 2, 3]},
]  # 13 pairs: 7 + 2 rankings of 3; the reward model groups them by prompt into 9 training elements


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_mp")
    paths = save_tiny_models(root)
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in SFT))
    (root / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PREFS))
    return {"policy": paths["policy"], "reward": paths["reward"], "root": root}


def _args(tiny, command: str, out, batch_size: int) -> list[str]:
    model = tiny["reward"] if command == "rm" else tiny["policy"]
    data = tiny["root"] / ("sft.jsonl" if command == "sft" else "prefs.jsonl")
    args = [command, f"model.name_or_path={model}", f"data.train={data}", f"train.output_dir={out}",
            f"train.batch_size={batch_size}", "train.epochs=2", "train.lr=2e-3", "train.cpu=true",
            "train.save_every=2", "train.eval_batch_size=4", "train.scheduler=constant", "train.warmup_steps=1"]
    if command == "dpo":
        args.append(f"data.eval={data}")  # every process evaluates in lockstep
    if command == "rm":
        args += [f"data.eval={data}", "rm.group_by_prompt=true"]
    return args


def _train(run_dir) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def _evals(run_dir) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if any(k.startswith("eval/") for k in r)]


def _weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model" / "model.safetensors"))


def _max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _assert_same_records(got: list[dict], ref: list[dict]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    for g, r in zip(got, ref):
        assert g.keys() == r.keys()
        at_reference = abs(r.get("rewards/margins", 1.0)) < 1e-4  # DPO before the first update (lr 0 in warm-up)
        for k in r:
            # at the reference every DPO margin is float noise around 0, and so is frac(margin > 0)
            if k != "tokens_per_s" and not (k == "rewards/accuracies" and at_reference):
                assert g[k] == pytest.approx(r[k], rel=RTOL, abs=ATOL), (g["step"], k, g[k], r[k])


def _runs(tiny, command: str):
    """(1 process x batch 4, 2 processes x batch 2) run dirs of ``command``, run once per module."""
    cache = tiny.setdefault("runs", {})
    if command not in cache:
        one, two = tiny["root"] / f"{command}-1x4", tiny["root"] / f"{command}-2x2"
        assert main(_args(tiny, command, one, batch_size=4)) == 0
        launch(_args(tiny, command, two, batch_size=2), num_processes=2, cwd=tiny["root"], timeout=300)
        cache[command] = one, two
    return cache[command]


@pytest.mark.parametrize("command", ["sft", "dpo", "rm"])
def test_two_processes_of_batch_b_train_as_one_process_of_batch_2b(tiny, command):
    one, two = _runs(tiny, command)

    ref, got = _train(one), _train(two)
    n_batches = {"sft": 3, "dpo": 4, "rm": 3}[command]  # global micro-batches per epoch: 4 + 4 (+ 4) + 1 elements
    assert [r["step"] for r in ref] == list(range(1, 2 * n_batches + 1))
    # epoch counts global micro-batches, whatever the number of processes
    for records in (ref, got):
        assert [r["epoch"] for r in records] == pytest.approx([k / n_batches for k in range(1, 2 * n_batches + 1)])
    _assert_same_records(got, ref)
    _assert_same_records(_evals(two), _evals(one))
    assert ref[0]["lr"] < ref[1]["lr"]  # constant + warm-up warms up
    diff = _max_abs_diff(_weights(two), _weights(one))
    assert diff < WEIGHTS_ATOL
    initial = load_file(str(tiny["reward" if command == "rm" else "policy"] / "model.safetensors"))
    moved = _max_abs_diff(_weights(one), initial)
    assert moved > 100 * WEIGHTS_ATOL  # it trained: the comparison means something

    state = json.loads((two / "checkpoints" / f"step-{2 * n_batches:08d}" / "state.json").read_text())
    assert state["samples_seen"] == 2 * {"sft": 9, "dpo": 13, "rm": 9}[command]
    assert state["loop_state"]["num_processes"] == 2
    assert json.loads((two / "summary.json").read_text())["global_step"] == 2 * n_batches
    if command == "dpo":  # step 1 at policy == reference: precomputed reference log-probs were shared correctly
        assert ref[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
        assert got[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)


def test_two_process_resume_from_a_mid_run_checkpoint_equals_the_uninterrupted_run(tiny, tmp_path):
    """The main process writes checkpoints, both processes read them: resuming at step 4 (mid-epoch 1) ends with the
    same weights and metrics.jsonl as the uninterrupted 2-process run."""
    _, uninterrupted = _runs(tiny, "sft")
    run_dir = tmp_path / "sft"
    shutil.copytree(uninterrupted, run_dir)
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-00000004", "step-00000006"]
    state = json.loads((ckpts / "step-00000004" / "state.json").read_text())
    assert (state["epoch"], state["batch_in_epoch"], state["samples_seen"]) == (1, 1, 13)

    shutil.rmtree(ckpts / "step-00000006")  # as if the run had died after step 5
    (ckpts / "latest").write_text("step-00000004")
    shutil.rmtree(run_dir / "model")
    (run_dir / "summary.json").unlink()
    args = _args(tiny, "sft", uninterrupted, batch_size=2)
    args[args.index(f"train.output_dir={uninterrupted}")] = f"train.output_dir={run_dir}"
    (run_dir / "config.yaml").write_text((run_dir / "config.yaml").read_text().replace(str(uninterrupted), str(run_dir)))
    # the shipped DDP config, on CPU processes (ACCELERATE_USE_CPU): what a GPU user launches
    launch([*args, "--resume"], num_processes=2, cwd=tmp_path, config_file=CONFIGS / "multi_gpu.yaml")

    assert _max_abs_diff(_weights(run_dir), _weights(uninterrupted)) == 0.0
    strip = [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_metrics(uninterrupted / "metrics.jsonl")]
    assert [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_metrics(run_dir / "metrics.jsonl")] == strip
    assert json.loads((run_dir / "summary.json").read_text())["global_step"] == 6


@pytest.mark.parametrize("name, kind", [("multi_gpu", "MULTI_GPU"), ("fsdp", "FSDP"), ("deepspeed_zero2", "DEEPSPEED"),
                                        ("deepspeed_zero3", "DEEPSPEED")])
def test_shipped_accelerate_configs_load(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(CONFIGS / f"{name}.yaml"))  # unknown keys would raise
    assert cfg.distributed_type == kind and cfg.num_machines == 1 and cfg.mixed_precision == "no"
    if kind == "DEEPSPEED":
        assert cfg.deepspeed_config["zero_stage"] == int(name[-1])
        assert cfg.deepspeed_config["gradient_accumulation_steps"] == 1
    if kind == "FSDP":
        assert cfg.fsdp_config["fsdp_version"] == 2

