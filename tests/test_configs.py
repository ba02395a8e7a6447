"""Every shipped config loads into its command's config class and keeps every value it writes."""

from pathlib import Path

import pytest
import yaml

from alignkit.cli import COMMANDS
from alignkit.config import load_config
from alignkit.data.builtin import BUILTIN_DATASETS, BUILTIN_PREFIX

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SHIPPED = sorted(CONFIGS.glob("*.yaml"))
COMMAND_OF = {"sft": "sft", "rm": "rm", "dpo": "dpo", "kto": "kto", "grpo_arithmetic": "grpo", "prm_arithmetic": "prm-eval"}


def leaves(tree, prefix: str = ""):
    """(dotted key, value) for every scalar of a YAML tree; list items are keyed by their index."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    for key, value in items:
        if isinstance(value, dict) or (isinstance(value, list) and any(isinstance(v, dict) for v in value)):
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def lookup(tree, dotted: str):
    for part in dotted.split("."):
        tree = tree[int(part)] if isinstance(tree, list) else tree[part]
    return tree


def test_configs_are_shipped():
    assert {p.stem for p in SHIPPED} >= set(COMMAND_OF)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_config_loads_with_every_value_as_written(path):
    """No key of the file is dropped, renamed or changed on the way into the config object (e.g. ``lr: 1.0e-4`` is
    1e-4, a list of reward components keeps each component's keys), ``train.output_dir`` and ``data.train`` are the
    file's, and the built-in datasets it names exist."""
    command = COMMAND_OF.get(path.stem, path.stem.split("_")[0])
    assert command in COMMANDS, f"no command for {path.name}"
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    cfg = load_config(COMMANDS[command].config_cls, path)
    loaded = cfg.model_dump(mode="json")
    for key, value in leaves(raw):
        got = lookup(loaded, key)
        assert got == value, f"{path.name}: {key} = {value!r} in the file, {got!r} loaded"
    if not hasattr(cfg, "train"):  # no training section (alignkit eval, the cai pipeline): one output_dir
        assert cfg.output_dir == raw["output_dir"] == f"runs/{path.stem}"
        return
    if "output_dir" in raw:  # an experiment (prm-eval): its own output_dir; its training runs go below it
        assert cfg.output_dir == raw["output_dir"] == f"runs/{path.stem}"
        assert cfg.train.output_dir.startswith(cfg.output_dir + "/")
        return
    assert cfg.train.output_dir == raw["train"]["output_dir"] == f"runs/{path.stem}"
    assert cfg.data.train == raw["data"]["train"]
    for spec in (cfg.data.train, cfg.data.eval):
        if spec is not None and spec.startswith(BUILTIN_PREFIX):
            assert spec[len(BUILTIN_PREFIX):] in BUILTIN_DATASETS, f"{path.name}: unknown built-in dataset {spec}"


def test_yaml_no_is_the_string_no_for_mixed_precision(tmp_path):
    """YAML 1.1 reads a bare `no` as false: `train.mixed_precision=no` and `mixed_precision: no` in a file both mean
    "no"; boolean fields still take yes/no."""
    from alignkit.config import SFTConfig, load_config

    assert load_config(SFTConfig, overrides=["train.mixed_precision=no"]).train.mixed_precision == "no"
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  mixed_precision: no\nmodel:\n  lora:\n    enabled: yes\n")
    cfg = load_config(SFTConfig, path)
    assert cfg.train.mixed_precision == "no" and cfg.model.lora.enabled is True
    assert load_config(SFTConfig, overrides=["model.lora.enabled=yes"]).model.lora.enabled is True


def test_auto_mixed_precision_is_bf16_only_where_native(monkeypatch):
    import torch

    from alignkit.train import run

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert run.resolve_mixed_precision("auto") == "no" and run.resolve_mixed_precision("bf16") == "bf16"
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert run.resolve_mixed_precision("auto") == "bf16"
