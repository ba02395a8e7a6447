"""The shared training loop: grad accumulation, data order, exact resume, checkpoints, logging, errors."""

from __future__ import annotations

import json
import math
import os
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from alignkit.config import TrainConfig
from alignkit.train.checkpoint import (
    atomic_save_dir,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_checkpoint_state,
    save_checkpoint,
)
from alignkit.train.logging import MetricsLogger, read_metrics
from alignkit.train.loop import NonFiniteLossError, StepOutput, epoch_batches, process_share, train_loop
from alignkit.train.run import RunError

N_EXAMPLES = 10
W_TRUE = torch.tensor([1.0, -2.0, 0.5])


# ---------------------------------------------------------------------- a tiny regression problem
def make_examples(n: int = N_EXAMPLES) -> list[dict]:
    g = torch.Generator().manual_seed(123)
    x = torch.randn(n, 3, generator=g)
    y = x @ W_TRUE + 0.3
    return [{"id": torch.tensor(i), "x": x[i], "y": y[i]} for i in range(n)]


def collate(items: list[dict]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([e[k] for e in items]) for k in items[0]}


def make_model(seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(3, 1)


class StepFn:
    """Mean squared error; optionally noisy (draws from torch, numpy and python RNGs), crashing or NaN."""

    def __init__(self, noise=False, crash_at_call=None, nan_at_call=None, nan_grad=False, seen=None):
        self.noise, self.nan_grad = noise, nan_grad
        self.crash_at_call, self.nan_at_call = crash_at_call, nan_at_call
        self.calls = 0
        self.seen = seen

    def __call__(self, model, batch) -> StepOutput:
        self.calls += 1
        if self.calls == self.crash_at_call:
            raise RuntimeError("simulated crash")
        if self.seen is not None:
            self.seen.append(batch["id"].tolist())
        x = batch["x"]  # [B, 3]
        if self.noise:
            scale = 1 + 0.01 * random.random() + 0.01 * float(np.random.rand())
            x = x * scale + 0.05 * torch.randn_like(x)
        pred = model(x).squeeze(-1)  # [B]
        loss = ((pred - batch["y"]) ** 2).mean()
        if self.calls == self.nan_at_call:
            loss = loss * float("nan")
        if self.nan_grad:  # value 0, gradient 0.5 / sqrt(0) * 0 = NaN
            loss = loss + torch.sqrt(pred.sum() * 0)
        return StepOutput(loss=loss, metrics={"mse": loss.detach()}, num_tokens=len(pred))


def cfg_(**kw) -> TrainConfig:
    base = dict(lr=0.05, batch_size=2, grad_accum=1, epochs=1, cpu=True, scheduler="constant",
                max_grad_norm=None)  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def run(cfg, run_dir, step_fn=None, model=None, **kw):
    model = model if model is not None else make_model()
    summary = train_loop(
        cfg,
        model=model,
        train_examples=kw.pop("examples", make_examples()),
        collate_fn=kw.pop("collate_fn", collate),
        step_fn=step_fn or StepFn(),
        run_dir=run_dir,
        **kw,
    )
    return model, summary


def train_records(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


# ---------------------------------------------------------------------- gradient accumulation
def test_grad_accum_micro_batch_splits_give_same_training(tmp_path):
    """10 examples per optimizer step split as 1x10, 10x1 and 3+3+3+1 (uneven last micro-batch).

    Micro-batch i is weighted n_i / 10, so every split has gradient = grad of the mean MSE over the
    10 examples. Step 1's logged loss and grad_norm are checked against a full-batch autograd pass
    at the initial weights; a split weighted 1/4 per micro-batch would give a different loss.
    """
    examples = make_examples()
    init = make_model()
    x = torch.stack([e["x"] for e in examples])
    y = torch.stack([e["y"] for e in examples])
    full_loss = ((init(x).squeeze(-1) - y) ** 2).mean()
    full_loss.backward()
    full_grad_norm = torch.cat([p.grad.flatten() for p in init.parameters()]).norm()

    results = {}
    for bs, ga in [(10, 1), (1, 10), (3, 4)]:
        cfg = cfg_(batch_size=bs, grad_accum=ga, epochs=3)
        model, summary = run(cfg, tmp_path / f"{bs}x{ga}")
        assert summary["global_step"] == 3
        results[(bs, ga)] = (model, train_records(tmp_path / f"{bs}x{ga}"))

    ref_model, ref_records = results[(10, 1)]
    assert_close(torch.tensor(ref_records[0]["loss"]), full_loss.detach(), rtol=1e-5, atol=1e-6)
    assert_close(torch.tensor(ref_records[0]["grad_norm"]), full_grad_norm, rtol=1e-5, atol=1e-6)
    for key in [(1, 10), (3, 4)]:
        model, records = results[key]
        assert [r["step"] for r in records] == [1, 2, 3]
        for got, ref in zip(records, ref_records):
            assert_close(got["loss"], ref["loss"], rtol=1e-5, atol=1e-6)
            assert_close(got["grad_norm"], ref["grad_norm"], rtol=1e-5, atol=1e-6)
            assert_close(got["mse"], ref["mse"], rtol=1e-5, atol=1e-6)
        assert_close(model.weight, ref_model.weight, rtol=1e-5, atol=1e-6)
        assert_close(model.bias, ref_model.bias, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ref_model.weight, make_model().weight)  # it trained


def test_data_order_is_a_seeded_permutation_per_epoch_with_nothing_dropped(tmp_path):
    """10 examples, micro-batches of 3, grad_accum 2: per epoch 4 micro-batches (3, 3, 3, 1) in 2 steps."""
    seen: list[list[int]] = []
    _, summary = run(cfg_(batch_size=3, grad_accum=2, epochs=2, seed=7), tmp_path, StepFn(seen=seen))
    assert summary["global_step"] == 4
    assert [len(b) for b in seen] == [3, 3, 3, 1, 3, 3, 3, 1]
    epoch0, epoch1 = sum(seen[:4], []), sum(seen[4:], [])
    assert sorted(epoch0) == list(range(10)) and sorted(epoch1) == list(range(10))
    assert epoch0 != epoch1
    assert seen[:4] == epoch_batches(10, 3, seed=7, epoch=0)
    assert seen[4:] == epoch_batches(10, 3, seed=7, epoch=1)
    assert epoch_batches(10, 3, seed=8, epoch=0) != seen[:4]
    records = train_records(tmp_path)
    assert [r["epoch"] for r in records] == [0.5, 1.0, 1.5, 2.0]


# ---------------------------------------------------------------------- exact resume
class Counter:
    """Stands in for an algorithm's extra state (e.g. an adaptive KL controller)."""

    def __init__(self):
        self.value = 0

    def state(self) -> dict:
        return {"value": self.value}

    def load(self, state: dict) -> None:
        self.value = state["value"]


def _resume_cfg(**kw):
    # 10 examples, micro-batches of 2, grad_accum 2 -> 5 micro-batches = steps of 2, 2, 1 per epoch.
    return cfg_(batch_size=2, grad_accum=2, max_steps=7, save_every=2, eval_every=3, scheduler="cosine",
                warmup_steps=1, lr=0.05, seed=3, **kw)  # fmt: skip


def _counting_step_fn(counter, **kw):
    inner = StepFn(noise=True, **kw)

    def step_fn(model, batch):
        out = inner(model, batch)
        counter.value += 1
        return out

    return step_fn


def _eval_fn(model):
    x = torch.stack([e["x"] for e in make_examples()])
    with torch.no_grad():
        return {"mse_all": float(((model(x).squeeze(-1) - x @ W_TRUE - 0.3) ** 2).mean())}


def _without_timing(records):
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]


def test_resume_after_crash_equals_uninterrupted_run(tmp_path):
    """Run A: 7 steps uninterrupted. Run B: crashes in step 6 (10th step_fn call: steps 1-5 use
    2+2+1+2+2 calls), after step 5 was logged but with the latest checkpoint at step 4, which is
    mid-epoch (epoch 1, micro-batch 2). B resumes and must match A bit for bit, metrics.jsonl included.
    The step_fn draws noise from torch, numpy and python RNGs, so unrestored RNG states would show."""
    counter_a = Counter()
    model_a, summary_a = run(_resume_cfg(), tmp_path / "a", _counting_step_fn(counter_a), eval_fn=_eval_fn,
                             extra_state_fn=counter_a.state, load_extra_state_fn=counter_a.load)  # fmt: skip
    assert summary_a["global_step"] == 7 and counter_a.value == 12
    assert [p.name for p in list_checkpoints(tmp_path / "a")] == ["step-00000006", "step-00000007"]  # keep=2

    run_b = tmp_path / "b"
    counter_b = Counter()
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(_resume_cfg(), run_b, _counting_step_fn(counter_b, crash_at_call=10), eval_fn=_eval_fn,
            extra_state_fn=counter_b.state, load_extra_state_fn=counter_b.load)  # fmt: skip
    assert [r["step"] for r in train_records(run_b)] == [1, 2, 3, 4, 5]
    ckpt = latest_checkpoint(run_b)
    assert ckpt == run_b / "checkpoints" / "step-00000004"
    state = read_checkpoint_state(ckpt)
    # 3 steps of epoch 0 (10 examples) + step 4 (micro-batches 0 and 1 of epoch 1: 4 examples)
    assert (state["step"], state["epoch"], state["batch_in_epoch"], state["samples_seen"]) == (4, 1, 2, 14)
    assert state["extra_state"] == {"value": 7}

    counter_resumed = Counter()
    model_b = make_model(seed=99)  # different init: every weight must come from the checkpoint
    _, summary_b = run(_resume_cfg(), run_b, _counting_step_fn(counter_resumed), model=model_b,
                       eval_fn=_eval_fn, resume=True, extra_state_fn=counter_resumed.state,
                       load_extra_state_fn=counter_resumed.load)  # fmt: skip
    assert summary_b["global_step"] == 7
    assert counter_resumed.value == 12  # restored 7, then 2 + 1 + 2 calls
    assert torch.equal(model_b.weight, model_a.weight) and torch.equal(model_b.bias, model_a.bias)
    records_a = read_metrics(tmp_path / "a" / "metrics.jsonl")
    records_b = read_metrics(run_b / "metrics.jsonl")
    assert [r["step"] for r in records_b] == [1, 2, 3, 3, 4, 5, 6, 6, 7, 7]  # eval lines at 3, 6, 7
    assert _without_timing(records_b) == _without_timing(records_a)

    # The comparison is meaningful: without the noise the run ends elsewhere.
    model_c, _ = run(_resume_cfg(), tmp_path / "c", StepFn(noise=False))
    assert not torch.equal(model_c.weight, model_a.weight)


def test_resume_with_lora_tiny_lm_saves_adapter_only_and_matches(tmp_path):
    """A peft LoRA tiny Llama trained with an SFT-like step_fn (mean token cross-entropy)."""
    peft = pytest.importorskip("peft")
    from alignkit.models.tiny import tiny_causal_lm

    _, tok = tiny_causal_lm()
    texts = ["hello world", "abc", "the cat sat", "x = 1 + 2", "align me", "ok", "tiny model", "lora!"]
    examples = [{"input_ids": torch.tensor(tok(t)["input_ids"])} for t in texts]

    def collate_lm(items):
        T = max(len(e["input_ids"]) for e in items)
        ids = torch.zeros(len(items), T, dtype=torch.long)  # [B, T], pad id 0
        mask = torch.zeros(len(items), T, dtype=torch.long)
        for i, e in enumerate(items):
            ids[i, : len(e["input_ids"])] = e["input_ids"]
            mask[i, : len(e["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": mask}

    class SFTStep:
        def __init__(self, crash_at_call=None):
            self.calls, self.crash_at_call = 0, crash_at_call

        def __call__(self, model, batch):
            self.calls += 1
            if self.calls == self.crash_at_call:
                raise RuntimeError("simulated crash")
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            logps = torch.log_softmax(logits[:, :-1].float(), -1)  # [B, T-1, V]
            token_logps = logps.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)  # [B, T-1]
            mask = batch["attention_mask"][:, 1:].float()
            per_example = -(token_logps * mask).sum(-1) / mask.sum(-1)  # [B]
            return StepOutput(loss=per_example.mean(), metrics={"nll": per_example.mean()},
                              num_tokens=int(mask.sum()))  # fmt: skip

    def make_lora():
        base, _ = tiny_causal_lm(seed=0)
        torch.manual_seed(1)
        lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
        return peft.get_peft_model(base, lora)

    cfg = cfg_(batch_size=2, grad_accum=2, max_steps=5, save_every=2, lr=1e-2, scheduler="linear")
    lm = dict(examples=examples, collate_fn=collate_lm)
    model_a, _ = run(cfg, tmp_path / "a", SFTStep(), model=make_lora(), **lm)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(cfg, tmp_path / "b", SFTStep(crash_at_call=7), model=make_lora(), **lm)
    ckpt = latest_checkpoint(tmp_path / "b")
    assert ckpt.name == "step-00000002"

    saved = load_file(str(ckpt / "weights.safetensors"))
    assert saved and all("lora_" in k for k in saved)
    full_bytes = sum(p.numel() * p.element_size() for p in tiny_causal_lm()[0].parameters())
    assert (ckpt / "weights.safetensors").stat().st_size < 0.2 * full_bytes

    model_b = make_lora()
    run(cfg, tmp_path / "b", SFTStep(), model=model_b, resume=True, **lm)
    params_a, params_b = dict(model_a.named_parameters()), dict(model_b.named_parameters())
    assert params_a.keys() == params_b.keys()
    for name in params_a:
        assert torch.equal(params_a[name], params_b[name]), name
    lora_b = [p for n, p in params_a.items() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b)  # the adapters trained (lora_B starts at 0)
    assert _without_timing(train_records(tmp_path / "a")) == _without_timing(train_records(tmp_path / "b"))


def test_full_tiny_lm_checkpoint_roundtrip_with_tied_weights(tmp_path):
    """Without peft every parameter is saved once (embed_tokens/lm_head are tied) and restored."""
    from alignkit.models.tiny import tiny_causal_lm

    model, _ = tiny_causal_lm(seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    path = save_checkpoint(tmp_path, 3, model, optimizer, scheduler, {"epoch": 0, "batch_in_epoch": 3})
    other, _ = tiny_causal_lm(seed=5)
    assert other.lm_head.weight is other.model.embed_tokens.weight
    optimizer2 = torch.optim.AdamW(other.parameters(), lr=1e-3)
    scheduler2 = torch.optim.lr_scheduler.LambdaLR(optimizer2, lambda s: 1.0)
    state = load_checkpoint(path, other, optimizer2, scheduler2)
    assert state["step"] == 3 and state["batch_in_epoch"] == 3
    for (name, p), q in zip(model.named_parameters(), other.parameters()):
        assert torch.equal(p, q), name
    assert other.lm_head.weight is other.model.embed_tokens.weight


def test_checkpoint_for_another_model_is_rejected(tmp_path):
    model = make_model()
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    path = save_checkpoint(tmp_path, 1, model, opt, sched, {})
    other = torch.nn.Sequential(torch.nn.Linear(3, 1))
    opt2 = torch.optim.AdamW(other.parameters())
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0)
    with pytest.raises(ValueError, match=r"do not match the model: missing \['0.bias', '0.weight'\]"):
        load_checkpoint(path, other, opt2, sched2)
    bigger = torch.nn.Linear(4, 1)
    opt3 = torch.optim.AdamW(bigger.parameters())
    with pytest.raises(ValueError, match=r"'weight' .* has shape \(1, 3\), model expects \(1, 4\)"):
        load_checkpoint(path, bigger, opt3, torch.optim.lr_scheduler.LambdaLR(opt3, lambda s: 1.0))
    state = json.loads((path / "state.json").read_text())
    state["format_version"] = 99
    (path / "state.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match="format_version 99; this alignkit reads 1"):
        read_checkpoint_state(path)


def test_checkpoint_rotation_and_latest_pointer(tmp_path):
    model = make_model()
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, step, model, opt, sched, {}, keep=2)
    root = tmp_path / "checkpoints"
    assert sorted(os.listdir(root)) == ["latest", "step-00000004", "step-00000006"]
    assert (root / "latest").read_text() == "step-00000006"
    # A leftover temp dir and a stale pointer are ignored.
    (root / ".tmp-step-00000008-1").mkdir()
    (root / "latest").write_text("step-00000008")
    assert latest_checkpoint(tmp_path) == root / "step-00000006"
    assert latest_checkpoint(tmp_path / "nowhere") is None


# ---------------------------------------------------------------------- non-finite values
def test_nan_loss_stops_with_step_and_last_checkpoint(tmp_path):
    """batch_size 2, grad_accum 1, save_every 2: the 5th call is step 5; the last checkpoint is step 4."""
    with pytest.raises(NonFiniteLossError) as err:
        run(cfg_(epochs=3, save_every=2), tmp_path, StepFn(nan_at_call=5))
    ckpt = tmp_path / "checkpoints" / "step-00000004"
    expected = rf"non-finite loss \(nan\) at step 5 .*Last good checkpoint: {re.escape(str(ckpt))}"
    assert re.search(expected, str(err.value))
    assert isinstance(err.value, RuntimeError)
    assert latest_checkpoint(tmp_path) == ckpt
    assert not (tmp_path / "checkpoints" / "step-00000005").exists()
    model = make_model(seed=42)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    assert load_checkpoint(ckpt, model, opt, sched)["step"] == 4
    assert [r["step"] for r in train_records(tmp_path)] == [1, 2, 3, 4]


def test_non_finite_grad_norm_stops_before_update(tmp_path):
    model = make_model()
    before = model.weight.detach().clone()
    expected = r"non-finite grad norm \(nan\) at step 1; .*no checkpoint saved yet"
    with pytest.raises(NonFiniteLossError, match=expected):
        run(cfg_(), tmp_path, StepFn(nan_grad=True), model=model)
    assert torch.equal(model.weight, before)


# ---------------------------------------------------------------------- atomic directories
def test_atomic_save_dir_failure_leaves_nothing(tmp_path):
    final = tmp_path / "out"

    def failing(d: Path):
        (d / "half.txt").write_text("partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_save_dir(final, failing)
    assert os.listdir(tmp_path) == []


def test_atomic_save_dir_replaces_existing_only_when_complete(tmp_path):
    final = tmp_path / "out"
    atomic_save_dir(final, lambda d: (d / "a.txt").write_text("old"))
    assert (final / "a.txt").read_text() == "old"

    def failing(d: Path):
        (d / "b.txt").write_text("new")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_save_dir(final, failing)
    assert os.listdir(final) == ["a.txt"]  # untouched
    atomic_save_dir(final, lambda d: (d / "b.txt").write_text("new"))
    assert os.listdir(final) == ["b.txt"]
    assert os.listdir(tmp_path) == ["out"]  # no .tmp-* or .old-* left


# ---------------------------------------------------------------------- schedule and logging
@pytest.mark.parametrize(
    "scheduler, warmup, expected",
    [
        # cosine, warmup 2, 6 steps; lr at step k uses s = k - 1:
        # s < 2: s / 2; else 0.5 * (1 + cos(pi * (s - 2) / 4))  -> 0, .5, 1, .853553, .5, .146447 (x 1e-3)
        ("cosine", 2, [0.0, 0.5e-3, 1e-3, 0.8535534e-3, 0.5e-3, 0.1464466e-3]),
        # linear, warmup 1, 6 steps: s < 1: 0; else (6 - s) / 5  -> 0, 1, .8, .6, .4, .2 (x 1e-3)
        ("linear", 1, [0.0, 1e-3, 0.8e-3, 0.6e-3, 0.4e-3, 0.2e-3]),
    ],
)
def test_lr_schedule_values(tmp_path, scheduler, warmup, expected):
    run(cfg_(lr=1e-3, max_steps=6, batch_size=10, scheduler=scheduler, warmup_steps=warmup), tmp_path)
    lrs = [r["lr"] for r in train_records(tmp_path)]
    assert_close(torch.tensor(lrs, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64))


def test_constant_schedule_honours_warmup(tmp_path):
    """scheduler=constant, warmup_steps=2, lr 1e-3: s = k - 1 < 2 gives s / 2 -> 0, 0.5e-3, then 1e-3 flat.

    (transformers' plain ``constant`` ignores num_warmup_steps: the old loop logged 1e-3 from step 1.)"""
    run(cfg_(lr=1e-3, max_steps=5, batch_size=10, scheduler="constant", warmup_steps=2), tmp_path)
    lrs = [r["lr"] for r in train_records(tmp_path)]
    assert lrs[0] < lrs[2]
    assert_close(torch.tensor(lrs, dtype=torch.float64), torch.tensor([0.0, 0.5e-3, 1e-3, 1e-3, 1e-3], dtype=torch.float64))


def test_metrics_keys_log_every_and_tensorboard(tmp_path):
    """log_every 2 over 5 steps logs steps 1 (first), 2, 4 and 5 (last); eval every 2 and at the end."""
    _, summary = run(cfg_(max_steps=5, log_every=2, eval_every=2), tmp_path, eval_fn=_eval_fn)
    records = read_metrics(tmp_path / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval/mse_all" in r]
    assert [r["step"] for r in train] == [1, 2, 4, 5]
    assert [r["step"] for r in evals] == [2, 4, 5]
    for r in train:
        assert set(r) == {"step", "loss", "grad_norm", "lr", "tokens_per_s", "epoch", "mse"}
        assert r["tokens_per_s"] > 0 and math.isfinite(r["grad_norm"])
    assert set(evals[0]) == {"step", "eval/mse_all"}
    assert summary["train"]["loss"] == train[-1]["loss"]
    assert summary["eval"]["mse_all"] == evals[-1]["eval/mse_all"]
    assert summary["checkpoint"] == str(tmp_path / "checkpoints" / "step-00000005")

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = [f for f in os.listdir(tmp_path / "tb") if f.startswith("events.out.tfevents")]
    assert events
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 4, 5]
    assert_close(acc.Scalars("eval/mse_all")[-1].value, evals[-1]["eval/mse_all"])


def test_metrics_logger_truncate_after_drops_later_and_torn_lines(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        for step in range(1, 6):
            logger.log({"loss": torch.tensor(float(step))}, step)
        logger.log({"acc": 0.5}, 5, prefix="eval/")
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # crash mid-write
    with MetricsLogger(tmp_path) as logger:
        logger.truncate_after(3)
        logger.log({"loss": 9.0}, 4)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == [
        {"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 3.0}, {"step": 4, "loss": 9.0}
    ]
    with pytest.raises(TypeError, match="metric 'x' must be a number or a scalar tensor, got str"):
        MetricsLogger(tmp_path).log({"x": "high"}, 1)
    disabled = MetricsLogger(tmp_path / "off", enabled=False)
    disabled.log({"loss": 1.0}, 1)
    assert not (tmp_path / "off").exists()


# ---------------------------------------------------------------------- user errors
def test_resume_without_checkpoint_is_an_error(tmp_path):
    expected = rf"no checkpoint in {re.escape(str(tmp_path))}/checkpoints to resume from .*run without --resume"
    with pytest.raises(RunError, match=expected):
        run(cfg_(), tmp_path, resume=True)


def test_fresh_run_over_existing_checkpoints_is_an_error_and_resume_of_a_finished_run_is_a_no_op(tmp_path):
    run(cfg_(max_steps=2), tmp_path)
    lines = (tmp_path / "metrics.jsonl").read_text()
    model = make_model(seed=5)
    _, summary = run(cfg_(max_steps=2), tmp_path, model=model, resume=True)
    assert summary["global_step"] == 2 and summary["train"] == {}
    assert (tmp_path / "metrics.jsonl").read_text() == lines
    assert not torch.equal(model.weight, make_model(seed=5).weight)  # weights restored from step 2
    with pytest.raises(RunError, match="already holds checkpoints \\(latest step-00000002\\); resume"):
        run(cfg_(max_steps=2), tmp_path)


def test_resume_with_changed_batching_is_an_error(tmp_path):
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(cfg_(max_steps=4, save_every=2), tmp_path, StepFn(crash_at_call=3))
    with pytest.raises(ValueError, match="cannot resume exactly .*batch_size: 2 at checkpoint, 5 now"):
        run(cfg_(max_steps=4, save_every=2, batch_size=5), tmp_path, resume=True)


def test_step_fn_contract_errors(tmp_path):
    def vector_loss(model, batch):
        return StepOutput(loss=(model(batch["x"]).squeeze(-1) - batch["y"]) ** 2, metrics={})

    with pytest.raises(ValueError, match=r"step_fn must return a scalar loss .*got \(2,\)"):
        run(cfg_(), tmp_path / "a", vector_loss)

    def clashing(model, batch):
        loss = ((model(batch["x"]).squeeze(-1) - batch["y"]) ** 2).mean()
        return StepOutput(loss=loss, metrics={"lr": 1.0})

    with pytest.raises(ValueError, match=r"step_fn metrics \['lr'\] clash"):
        run(cfg_(), tmp_path / "b", clashing)
    with pytest.raises(ValueError, match="train_examples is empty"):
        run(cfg_(), tmp_path / "c", examples=[])
    frozen = make_model().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        run(cfg_(), tmp_path / "d", model=frozen)


# ---------------------------------------------------------------------- processes
def test_process_share_splits_a_global_micro_batch_into_contiguous_near_equal_parts():
    for n in range(10):
        batch = list(range(100, 100 + n))
        for P in (1, 2, 3, 4):
            parts = [process_share(batch, P, r) for r in range(P)]
            assert sum(parts, []) == batch  # contiguous, in order, nothing lost
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
            assert [len(x) for x in parts] == sorted((len(x) for x in parts), reverse=True)
    assert process_share(list(range(8)), 2, 1) == [4, 5, 6, 7]  # full micro-batch of 2 x 4: the second half
    assert process_share([7], 2, 1) == []  # a 1-example last micro-batch leaves process 1 nothing (weight-0 pass)


def test_a_multi_process_launch_that_accelerate_sees_as_one_process_is_refused(tmp_path, monkeypatch):
    """torchrun on a machine without GPUs and without train.cpu: each process would train alone on all the data."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"launched as 2 processes .* set train.cpu=true"):
        run(cfg_(), tmp_path)
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("kind", ["FSDP", "DEEPSPEED"])
def test_sharding_engines_are_refused_with_the_reason(kind):
    """Checkpoints and the saved model come from the main process's copy of the weights: under FSDP/ZeRO a shard."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from alignkit.train.loop import check_launch

    fake = SimpleNamespace(distributed_type=DistributedType[kind], num_processes=2)
    with pytest.raises(ValueError, match=r"do not support .*multi_gpu.yaml"):
        check_launch(fake)

