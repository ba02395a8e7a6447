"""Hardening of runs (issue 8): checkpoints never run code, full disks and bad output paths give clear errors,
--resume works the same for every command, killed runs leave nothing stale behind, the run dir holds its log.
Tiny models, CPU."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alignkit import cli
from alignkit.config import BoNConfig, ConfigError, SFTConfig, TrainConfig, load_config
from alignkit.models.tiny import save_tiny_models
from alignkit.train import checkpoint as ckpt
from alignkit.train.optim import build_optimizer
from alignkit.train.run import prepare_run_dir


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("hardening")
    paths = save_tiny_models(root)
    rows = [{"prompt": f"Say {w}.", "completion": f"{w} {w}!"} for w in ("hi", "yes", "no", "ok")]
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"policy": str(paths["policy"]), "sft": str(root / "sft.jsonl")}


def sft_args(tiny: dict, out: Path, *extra: str) -> list[str]:
    return ["sft", f"model.name_or_path={tiny['policy']}", f"data.train={tiny['sft']}", f"train.output_dir={out}",
            "train.batch_size=2", "train.max_steps=2", "train.lr=1e-3", "train.cpu=true", *extra]


def two_group_state(scheduler: str):
    """A trained AdamW with two param groups (PPO's policy + value model) and a ``train.optim`` schedule."""
    policy, value = torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)
    cfg = TrainConfig(lr=1e-3, scheduler=scheduler, warmup_steps=1)
    groups = [{"params": list(policy.parameters())}, {"params": list(value.parameters()), "lr": 1e-4}]
    optimizer, sched = build_optimizer(groups, cfg, 10)
    (policy(torch.randn(2, 4)).sum() + value(torch.randn(2, 4)).sum()).backward()
    optimizer.step()
    sched.step()
    return torch.nn.ModuleDict({"policy": policy, "value": value}), optimizer, sched


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ---------------------------------------------------------------- 1. no code runs from a checkpoint
class Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("scheduler", ["constant", "linear", "cosine"])
def test_real_checkpoint_states_load_with_weights_only(tmp_path, scheduler):
    model, optimizer, sched = two_group_state(scheduler)
    path = ckpt.save_checkpoint(tmp_path, 1, model, optimizer, sched, {"epoch": 0})
    model2, optimizer2, sched2 = two_group_state(scheduler)
    for p in model2.parameters():
        torch.nn.init.zeros_(p)
    ckpt.load_checkpoint(path, model2, optimizer2, sched2)
    assert sched2.state_dict() == sched.state_dict()
    assert len(optimizer2.state_dict()["param_groups"]) == 2
    assert torch.equal(optimizer2.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt"])
def test_a_pickle_with_a_payload_is_refused_and_does_not_run(tmp_path, name):
    model, optimizer, sched = two_group_state("cosine")
    path = ckpt.save_checkpoint(tmp_path / "run", 1, model, optimizer, sched, {"epoch": 0})
    marker = tmp_path / "pwned"
    torch.save({"state": Payload(str(marker))}, path / name)
    with pytest.raises(ckpt.CheckpointError, match=rf"refusing to load .*{name}.*could run code"):
        ckpt.load_checkpoint(path, model, optimizer, sched)
    assert not marker.exists()


# ---------------------------------------------------------------- 3. output paths stay in the run dir
def test_output_file_may_not_escape_the_run_dir(tmp_path, capsys):
    for bad in ("../x.jsonl", "a/../../x.jsonl", "..", ""):
        with pytest.raises(ConfigError, match="bon.output_file"):
            load_config(BoNConfig, None, [f"bon.output_file={bad}"])
    assert load_config(BoNConfig, None, ["bon.output_file=sub/x.jsonl"]).bon.output_file == "sub/x.jsonl"
    absolute = str(tmp_path / "elsewhere.jsonl")  # on purpose: allowed
    assert load_config(BoNConfig, None, [f"bon.output_file={absolute}"]).bon.output_file == absolute
    assert cli.main(["bon", f"output_dir={tmp_path / 'bon'}", "bon.output_file=../../escaped.jsonl"]) == 2
    assert "outside the run directory" in capsys.readouterr().err and not (tmp_path / "bon").exists()


# ---------------------------------------------------------------- 6. a full disk, as torch.save reports it
def test_torch_save_failure_on_a_full_disk_is_reported_as_enospc(tmp_path, monkeypatch):
    model, optimizer, sched = two_group_state("linear")

    def full(obj, f, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0")

    monkeypatch.setattr(ckpt.torch, "save", full)
    monkeypatch.setattr("alignkit.io_utils.shutil.disk_usage", lambda p: type("U", (), {"free": 0})())
    with pytest.raises(OSError) as info:
        ckpt.save_checkpoint(tmp_path, 3, model, optimizer, sched, {"epoch": 0})
    assert info.value.errno == errno.ENOSPC and info.value.filename.endswith("step-00000003")
    assert "unexpected pos" in info.value.strerror
    assert not list(ckpt.checkpoints_dir(tmp_path).glob(".tmp-*"))
    # the same failure on a disk with room left is not disguised
    monkeypatch.setattr("alignkit.io_utils.shutil.disk_usage", lambda p: type("U", (), {"free": 1 << 40})())
    with pytest.raises(RuntimeError, match="unexpected pos"):
        ckpt.save_checkpoint(tmp_path, 4, model, optimizer, sched, {"epoch": 0})


def test_full_disk_in_the_cli_is_a_clear_message(tiny, tmp_path, capsys, monkeypatch):
    real_save = torch.save

    def full(obj, f, *args, **kwargs):
        if str(f).endswith("optimizer.pt"):
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", full)
    monkeypatch.setattr("alignkit.io_utils.shutil.disk_usage", lambda p: type("U", (), {"free": 0})())
    assert cli.main(sft_args(tiny, tmp_path / "run")) == 1
    err = capsys.readouterr().err
    assert "no space left on the device while writing" in err and "step-00000002" in err and "Traceback" not in err


@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_real_full_disk_during_torch_save_is_enospc(small_tmpfs):
    model = torch.nn.Linear(256, 256)  # weights 257 KiB fit; optimizer.pt (2 x 257 KiB) + rng.pt then do not
    optimizer, sched = build_optimizer(model, TrainConfig(), 4)
    model(torch.randn(2, 256)).sum().backward()
    optimizer.step()
    (small_tmpfs / "filler").write_bytes(b"x" * 300_000)
    with pytest.raises(OSError) as info:
        ckpt.save_checkpoint(small_tmpfs / "run", 1, model, optimizer, sched, {"epoch": 0})
    assert info.value.errno == errno.ENOSPC and "step-00000001" in info.value.filename
    assert not list((small_tmpfs / "run" / "checkpoints").glob(".tmp-*"))


# ---------------------------------------------------------------- 7. --resume without a checkpoint
def test_resume_without_a_checkpoint_is_one_clear_message(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    prepare_run_dir(load_config(SFTConfig, None, sft_args(tiny, out)[1:]), out, False, "sft")  # killed before step 1
    capsys.readouterr()
    assert cli.main([*sft_args(tiny, out), "--resume"]) == 1
    err = capsys.readouterr().err
    assert "no checkpoint in" in err and "run without --resume to start fresh" in err and "Traceback" not in err
    assert cli.main(sft_args(tiny, out)) == 0  # what the message says to do
    assert (out / "model").is_dir()


def test_time_based_checkpoints_do_not_change_the_result(tiny, tmp_path):
    every = tmp_path / "every"
    assert cli.main(sft_args(tiny, every, "train.save_every_minutes=1e-9", "train.keep_checkpoints=5",
                             "train.max_steps=3")) == 0
    assert [p.name for p in ckpt.list_checkpoints(every)] == ["step-00000001", "step-00000002", "step-00000003"]
    assert TrainConfig().save_every_minutes == 30  # a killed default run can resume
    plain = tmp_path / "plain"
    assert cli.main(sft_args(tiny, plain, "train.save_every_minutes=0", "train.max_steps=3")) == 0
    assert [p.name for p in ckpt.list_checkpoints(plain)] == ["step-00000003"]
    from safetensors.torch import load_file

    a, b = load_file(every / "model" / "model.safetensors"), load_file(plain / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- 9, 10. leftovers of a killed run
def test_stale_temporaries_are_removed_when_a_run_starts_but_not_a_live_processes(tiny, tmp_path):
    out = tmp_path / "run"
    dead, live = dead_pid(), os.getppid()
    stale = [out / f".tmp-model-{dead}", out / "checkpoints" / f".old-step-00000001-{dead}"]
    for d in stale:
        (d / "sub").mkdir(parents=True)
        (d / "sub" / "w.bin").write_bytes(b"x")
    (out / "checkpoints" / f".tmp-latest-{dead}").write_text("step-00000001")
    stale.append(out / "checkpoints" / f".tmp-latest-{dead}")
    kept = out / "checkpoints" / f".tmp-step-00000002-{live}"
    kept.mkdir()
    prepare_run_dir(load_config(SFTConfig, None, sft_args(tiny, out)[1:]), out, False, "sft")
    assert not any(p.exists() for p in stale) and kept.is_dir()


def test_a_kill_while_pruning_never_leaves_a_half_deleted_step_dir(tmp_path, monkeypatch):
    import shutil

    model, optimizer, sched = two_group_state("cosine")
    for step in (1, 2):
        ckpt.save_checkpoint(tmp_path, step, model, optimizer, sched, {"epoch": 0})
    real_rmtree = shutil.rmtree

    def killed_midway(path, *args, **kwargs):
        (Path(path) / ckpt.WEIGHTS_NAME).unlink()  # deleted one file, then the process was killed
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 3, model, optimizer, sched, {"epoch": 0})
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    steps = [p for p in ckpt.checkpoints_dir(tmp_path).iterdir() if p.name.startswith("step-")]
    assert sorted(p.name for p in steps) == ["step-00000002", "step-00000003"]
    assert all((p / ckpt.WEIGHTS_NAME).is_file() and (p / ckpt.STATE_NAME).is_file() for p in steps)
    assert [p.name for p in ckpt.checkpoints_dir(tmp_path).glob(".old-*")] == [f".old-step-00000001-{os.getpid()}"]


# ---------------------------------------------------------------- 12, 13. output dirs that cannot be one
def test_output_dir_that_is_a_file_under_a_file_or_empty_is_a_clear_error(tiny, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    for out, expected in ((afile, "is a file, not a directory"), (afile / "run", "lies under")):
        assert cli.main(sft_args(tiny, out)) == 1
        err = capsys.readouterr().err
        assert expected in err and str(afile) in err and "Traceback" not in err
    assert afile.read_text() == "keep me"
    with pytest.raises(ConfigError, match="train.output_dir is empty"):
        load_config(SFTConfig, None, ["train.output_dir="])
    with pytest.raises(ConfigError, match="output_dir is empty"):
        load_config(BoNConfig, None, ["output_dir=''"])


def test_read_only_output_dir_is_a_clear_error(tiny, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(ro)], capture_output=True).returncode:
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        assert cli.main(sft_args(tiny, ro / "run")) == 1
        err = capsys.readouterr().err
        assert f"{ro / 'run'} cannot be written" in err and "Read-only file system" in err
    finally:
        subprocess.run(["umount", "-l", str(ro)], capture_output=True)


# ---------------------------------------------------------------- 21. a short header; the config and log in the run dir
def test_terminal_header_is_short_and_the_run_dir_holds_config_and_log(tiny, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert cli.main(sft_args(tiny, out)) == 0
    err = capsys.readouterr().err
    assert "resolved config" not in err
    head = err.split("\n")[:3]
    assert f"sft: run dir {out}, model {tiny['policy']}, data {tiny['sft']}" in head[0]
    assert "train.max_steps=2" in head[1] and "train.lr=0.001" in head[1]
    log = (out / "log.txt").read_text()
    assert "--- resolved config ---" in log and "max_steps: 2" in log and "sft done" in log
    assert (out / "config.yaml").is_file()
    monkeypatch.setenv("RANK", "1")  # another process of a launch: writes and prints nothing
    other = tmp_path / "other"
    prepare_run_dir(load_config(SFTConfig, None, sft_args(tiny, other)[1:]), other, False, "sft")
    assert not other.exists() and capsys.readouterr().err == ""


# ---------------------------------------------------------------- 23. keep only the final model
def test_keep_checkpoints_zero_leaves_only_the_final_model(tiny, tmp_path):
    out = tmp_path / "run"
    assert cli.main(sft_args(tiny, out, "train.keep_checkpoints=0")) == 0
    assert not (out / "checkpoints").exists() and (out / "model" / "model.safetensors").is_file()
    assert json.loads((out / "summary.json").read_text())["checkpoint"] is None
    assert cli.main(sft_args(tiny, out, "train.keep_checkpoints=0")) == 0  # a finished run can be rerun
