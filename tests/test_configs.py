"""Every shipped config validates against its command's config class."""

from pathlib import Path

import pytest

from alignkit.cli import COMMANDS
from alignkit.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
COMMAND_OF = {"sft": "sft", "rm": "rm", "dpo": "dpo", "kto": "kto", "grpo_arithmetic": "grpo"}


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_config_validates(path):
    command = COMMAND_OF.get(path.stem, path.stem.split("_")[0])
    assert command in COMMANDS, f"no command for {path.name}"
    cfg = load_config(COMMANDS[command].config_cls, path)
    assert cfg.model.name_or_path
