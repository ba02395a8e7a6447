"""End-to-end runs of the offline commands (sft, rm, dpo family, kto) on tiny models, plus CLI/config errors."""

import json
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from alignkit.cli import main
from alignkit.config import ConfigError, DPOConfig, load_config
from alignkit.models.tiny import save_tiny_models

PREFS = [
    {"prompt": "Say something nice.", "chosen": "You are great!", "rejected": "No."},
    {"prompt": "Greet me.", "chosen": "Hello, friend.", "rejected": "Go away."},
    {"prompt": "Rate the food.", "chosen": "Delicious.", "rejected": "Awful stuff."},
    {"prompt": "How was the film?", "responses": ["Loved it", "It was ok", "Hated it"], "ranking": [1, 2, 3]},
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    paths = save_tiny_models(root)
    data = root / "data"
    data.mkdir()
    (data / "prefs.jsonl").write_text("\n".join(json.dumps(r) for r in PREFS) + "\n")
    (data / "sft.jsonl").write_text("\n".join(json.dumps({"prompt": r["prompt"], "completion": r.get("chosen", "ok")})
                                              for r in PREFS) + "\n")
    kto = [{"prompt": "Hi", "completion": "Hello!", "label": True}, {"prompt": "Hi", "completion": "Meh", "label": False},
           {"prompt": "Yo", "completion": "Hey there", "label": True}, {"prompt": "Yo", "completion": "Bye", "label": False}]
    (data / "kto.jsonl").write_text("\n".join(json.dumps(r) for r in kto) + "\n")
    return {"policy": str(paths["policy"]), "reward": str(paths["reward"]), "data": data}


def _common(tiny, out, data_file, **extra):
    args = [f"model.name_or_path={tiny['policy']}", f"data.train={tiny['data'] / data_file}",
            f"train.output_dir={out}", "train.batch_size=2", "train.max_steps=2", "train.lr=1e-3", "train.cpu=true"]
    return args + [f"{k}={v}" for k, v in extra.items()]


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_sft_end_to_end(tiny, tmp_path):
    out = tmp_path / "sft"
    assert main(["sft", *_common(tiny, out, "sft.jsonl")]) == 0
    assert (out / "config.yaml").is_file() and (out / "summary.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.config.vocab_size > 0
    lines = _metrics(out)
    assert any("loss" in m and "grad_norm" in m and "lr" in m for m in lines)


def test_rm_end_to_end_with_rankings_and_normalisation(tiny, tmp_path):
    out = tmp_path / "rm"
    args = _common(tiny, out, "prefs.jsonl", **{"rm.normalize": "true", "data.eval": tiny["data"] / "prefs.jsonl"})
    args[0] = f"model.name_or_path={tiny['reward']}"
    assert main(["rm", *args]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert 0.0 <= summary["eval"]["accuracy"] <= 1.0
    rm = AutoModelForSequenceClassification.from_pretrained(out / "model")
    assert set(rm.config.alignkit_reward_norm) == {"gain", "bias"}
    # 3 plain pairs + 3 pairs from the K=3 ranking
    assert summary["data"]["n_train"] == 6


@pytest.mark.parametrize("loss", ["dpo", "cdpo", "ipo", "orpo", "simpo"])
def test_dpo_family_end_to_end(tiny, tmp_path, loss):
    out = tmp_path / loss
    extra = {"dpo.loss": loss}
    if loss == "cdpo":
        extra["dpo.label_smoothing"] = 0.1
    assert main(["dpo", *_common(tiny, out, "prefs.jsonl", **extra)]) == 0
    first = next(m for m in _metrics(out) if "rewards/margins" in m)
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen", "logps/rejected"):
        assert key in first
    if loss in ("dpo", "cdpo", "ipo"):  # step 1 is computed at policy == reference
        assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    if loss == "dpo":
        assert first["loss"] == pytest.approx(0.693147, abs=1e-5)
    AutoModelForCausalLM.from_pretrained(out / "model")


def test_dpo_with_lora_on_the_fly_reference(tiny, tmp_path):
    out = tmp_path / "dpo_lora"
    args = _common(tiny, out, "prefs.jsonl", **{"model.lora.enabled": "true", "model.lora.r": 4,
                                                "dpo.precompute_ref_logps": "false"})
    assert main(["dpo", *args]) == 0
    first = next(m for m in _metrics(out) if "rewards/margins" in m)
    assert first["loss"] == pytest.approx(0.693147, abs=1e-5)
    merged = AutoModelForCausalLM.from_pretrained(out / "model")  # merged: loads without peft
    assert not any("lora" in n for n, _ in merged.named_parameters())


def test_kto_end_to_end(tiny, tmp_path):
    out = tmp_path / "kto"
    assert main(["kto", *_common(tiny, out, "kto.jsonl")]) == 0
    first = next(m for m in _metrics(out) if "kl" in m)
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at step 1
    assert first["loss"] == pytest.approx(0.5, abs=1e-5)  # 1 - sigma(0) for both labels


def test_resume_refuses_changed_config_and_existing_run_needs_resume(tiny, tmp_path, capsys):
    out = tmp_path / "sft"
    assert main(["sft", *_common(tiny, out, "sft.jsonl")]) == 0
    assert main(["sft", *_common(tiny, out, "sft.jsonl")]) == 1
    assert "pass --resume" in capsys.readouterr().err
    assert main(["sft", *_common(tiny, out, "sft.jsonl", **{"train.lr": 0.5}), "--resume"]) == 1
    err = capsys.readouterr().err
    assert "train.lr: saved 0.001, now 0.5" in err


def test_bad_data_error_names_file_line_field(tiny, tmp_path, capsys):
    bad = tiny["data"] / "bad.jsonl"
    bad.write_text(json.dumps(PREFS[0]) + "\n" + json.dumps({"prompt": "x", "chosen": "same", "rejected": "same"}) + "\n")
    assert main(["dpo", *_common(tiny, tmp_path / "x", "bad.jsonl")]) == 1
    err = capsys.readouterr().err
    assert "bad.jsonl, line 2" in err and "rejected" in err
    assert not (tmp_path / "x" / "model").exists()


def test_offline_hub_id_gives_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub read the variable when imported: set its flag too, else the hub is tried (network timeouts)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    assert main(["sft", "model.name_or_path=some-org/not-a-local-model", f"train.output_dir={tmp_path}/o",
                 "data.train=builtin:sft_demos"]) == 1
    err = capsys.readouterr().err
    assert "not a local directory" in err and "smollm2-135m-instruct" in err


def test_config_errors_name_the_key(tmp_path, capsys):
    assert main(["dpo", "train.lrr=1"]) == 2
    assert "train.lrr: unknown key" in capsys.readouterr().err
    assert main(["dpo", "train.lr=abc"]) == 2
    assert "train.lr" in capsys.readouterr().err
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("dpo:\n  loss: cdpo\n")
    with pytest.raises(ConfigError, match="label_smoothing"):
        load_config(DPOConfig, cfg_file)
    cfg_file.write_text("dpo:\n  beta: 0.2\ntrain:\n  lr: 1.0e-6\n")
    cfg = load_config(DPOConfig, cfg_file, ["dpo.beta=0.3"])
    assert cfg.dpo.beta == 0.3 and cfg.train.lr == 1e-6 and cfg.train.output_dir == "runs/dpo"
    with pytest.raises(Exception):
        cfg.dpo.beta = 1.0  # frozen after validation


def test_help_lists_config_keys(capsys):
    with pytest.raises(SystemExit):
        main(["dpo", "--help"])
    out = capsys.readouterr().out
    assert "dpo.beta" in out and "train.lr" in out and "data.max_prompt_length" in out
    assert main(["dpo", "--print-config", "dpo.beta=0.5"]) == 0
    assert "beta: 0.5" in capsys.readouterr().out


def test_nan_loss_stops_with_message(tiny, tmp_path, capsys):
    out = tmp_path / "nan"
    args = _common(tiny, out, "sft.jsonl", **{"train.lr": 1e30, "train.max_steps": 4, "train.save_every": 1})
    assert main(["sft", *args]) == 1
    err = capsys.readouterr().err
    assert "non-finite" in err and "step 2" in err
    assert "step-00000001" in err  # names the last good checkpoint, which is kept
    assert (out / "checkpoints" / "step-00000001" / "state.json").is_file()
    assert not (out / "model").exists()


def test_disk_full_gives_a_clear_message_and_leaves_no_half_written_model(tiny, tmp_path, capsys, monkeypatch):
    import errno

    from alignkit.models.loading import load_tokenizer

    def full_disk(self, save_directory, *args, **kwargs):
        (Path(save_directory) / "partial.bin").write_bytes(b"x")  # something written before the disk filled up
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(save_directory) / "tokenizer.json"))

    out = tmp_path / "full"
    monkeypatch.setattr(type(load_tokenizer(tiny["policy"])), "save_pretrained", full_disk)
    assert main(["sft", *_common(tiny, out, "sft.jsonl", **{"train.max_steps": 2})]) == 1
    err = capsys.readouterr().err
    assert "no space left on the device while writing" in err and "tokenizer.json" in err and "--resume" in err
    assert not (out / "model").exists() and not list(out.glob(".tmp-*"))
    assert (out / "checkpoints").is_dir()  # the last complete checkpoint is there to resume from
    # any other OSError is not disguised
    monkeypatch.setattr(type(load_tokenizer(tiny["policy"])), "save_pretrained",
                        lambda self, d, *a, **k: (_ for _ in ()).throw(OSError(errno.EACCES, "Permission denied")))
    with pytest.raises(PermissionError):
        main(["sft", *_common(tiny, tmp_path / "denied", "sft.jsonl", **{"train.max_steps": 1})])


def test_rm_groups_all_pairs_of_a_prompt_into_one_element():
    from alignkit.algorithms.reward_model import collate_groups, group_pairs

    pairs = [{"prompt_text": "p", "group": 0, "chosen_input_ids": [1, 5], "rejected_input_ids": [1, 6]},
             {"prompt_text": "p", "group": 1, "chosen_input_ids": [1, 5], "rejected_input_ids": [1, 7]},
             {"prompt_text": "q", "group": 2, "chosen_input_ids": [1, 8], "rejected_input_ids": [1, 9, 9]}]
    groups = group_pairs(pairs, by_prompt=True)
    assert [len(g) for g in groups] == [2, 1]
    batch = collate_groups(groups, pad_token_id=0)
    # the response [1, 5] is shared by both pairs of prompt p: scored once
    assert batch["input_ids"].shape == (5, 3)
    assert batch["chosen_idx"].tolist() == [0, 0, 3] and batch["rejected_idx"].tolist() == [1, 2, 4]
    assert batch["pair_group"].tolist() == [0, 0, 1]
    assert len(group_pairs(pairs, by_prompt=False)) == 3


def test_dpo_bf16_autocast_reference_matches_first_step(tiny, tmp_path):
    out = tmp_path / "dpo_bf16"
    assert main(["dpo", *_common(tiny, out, "prefs.jsonl", **{"train.mixed_precision": "bf16"})]) == 0
    first = next(m for m in _metrics(out) if "rewards/margins" in m)
    # reference log-probs precomputed under the same autocast as the policy's first forward: exactly at the reference
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert first["loss"] == pytest.approx(0.693147, abs=1e-5)


@pytest.mark.parametrize("command,data_file", [("sft", "sft.jsonl"), ("dpo", "prefs.jsonl"), ("kto", "kto.jsonl")])
def test_padding_free_training_follows_the_padded_trajectory(tiny, tmp_path, command, data_file):
    """train.padding_free packs each micro-batch into one row: the same losses and updates up to float rounding."""
    losses = {}
    for padding_free in ("false", "true"):
        out = tmp_path / f"{command}-{padding_free}"
        args = _common(tiny, out, data_file, **{"train.padding_free": padding_free, "train.max_steps": 3})
        assert main([command, *args]) == 0
        losses[padding_free] = [m["loss"] for m in _metrics(out) if "loss" in m and "grad_norm" in m]
    assert len(losses["true"]) == 3
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-4, abs=1e-5)
