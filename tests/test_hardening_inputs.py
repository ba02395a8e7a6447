"""Issue 8, inputs a user can give: each test failed before its fix (the item number is in its name).

Bad data (rankings, duplicate keys, CSV booleans, byte-order marks, one-sided KTO labels), settings that do
nothing, corrupt weights, flags anywhere on the command line, the reward-callable contract and ``--help``, and
the built-in ``tiny-random`` model.
"""

from __future__ import annotations

import codecs
import json
import os
import re
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from alignkit.cli import build_parser, main, split_args
from alignkit.config import ConfigError, DPOConfig, RewardSection, load_config
from alignkit.data.formats import load_examples
from alignkit.data.io import DataError, read_records
from alignkit.models.tiny import save_tiny_models


SIGNATURE = "def score(prompts: list[str], completions: list[str], **fields) -> list[float]"


def _where(path, line, field, unit="line") -> str:
    return re.escape(f"{path}, {unit} {line}, field '{field}': ")


def _jsonl(path: Path, rows: list) -> str:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("hardening")
    paths = save_tiny_models(root)
    return {"root": root, "policy": str(paths["policy"]), "reward": str(paths["reward"])}


# ---------------------------------------------------------------- 2 and 19: --help
def test_item2_19_help_warns_about_callable_code_and_lists_component_fields(capsys):
    from alignkit.config import CALLABLE_REWARD_SIGNATURE

    assert CALLABLE_REWARD_SIGNATURE == SIGNATURE
    with pytest.raises(SystemExit):
        main(["--help"])
    top = " ".join(capsys.readouterr().out.split())
    assert "imports and runs the Python code" in top and "only from sources you trust" in top
    with pytest.raises(SystemExit):
        main(["grpo", "--help"])
    out = capsys.readouterr().out
    flat = " ".join(out.split())
    assert "imports and runs the Python code" in flat
    for field in ("type", "weight", "name", "path", "pattern", "target_length", "normalize"):
        assert f"reward.components[].{field} (" in out, field
    assert SIGNATURE in out
    assert "def score(prompts, completions, answer, **fields):" in out  # the minimal example
    assert "mymod:score" in out and "runs/rm/model" in out


# ---------------------------------------------------------------- 8: flags anywhere
def test_item8_flags_may_come_before_overrides(tmp_path, capsys):
    ns = build_parser().parse_args(["sft", "--resume", "train.max_steps=1", "model.dtype=float32"])
    assert ns.resume and ns.args == ["train.max_steps=1", "model.dtype=float32"]
    ns = build_parser().parse_args(["dpo", "a=1", "--print-config", "cfg.yaml", "b=2"])
    assert ns.print_config and split_args(ns.args) == ("cfg.yaml", ["a=1", "b=2"])
    assert main(["sft", "--print-config", "train.max_steps=3"]) == 0
    assert "max_steps: 3" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="at most one config file"):
        split_args(["a.yaml", "x=1", "b.yaml"])
    with pytest.raises(SystemExit):  # an unknown flag is still an error
        build_parser().parse_args(["sft", "--no-such-flag", "train.max_steps=1"])


# ---------------------------------------------------------------- 11: corrupt weights
def test_item11_corrupt_or_truncated_safetensors_named_without_traceback(tiny, tmp_path, capsys):
    import shutil

    from alignkit.config import ModelConfig
    from alignkit.models.loading import ModelLoadError, load_policy, load_reward_model, load_tokenizer

    bad = tmp_path / "bad-policy"
    shutil.copytree(tiny["policy"], bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    tok = load_tokenizer(str(bad))
    for load in (load_policy, load_reward_model):
        with pytest.raises(ModelLoadError, match=re.escape(str(weights)) + ".*") as err:
            load(ModelConfig(name_or_path=str(bad)), tok)
        assert "corrupt or truncated" in str(err.value)
    data = _jsonl(tmp_path / "sft.jsonl", [{"prompt": "hi", "completion": "hello"}])
    rc = main(["sft", f"model.name_or_path={bad}", f"data.train={data}", f"train.output_dir={tmp_path / 'run'}",
               "train.max_steps=1", "train.cpu=true"])
    err = capsys.readouterr().err
    assert rc == 1 and str(weights) in err and "corrupt or truncated" in err and "Traceback" not in err


def test_item11_corrupt_checkpoint_weights_named(tmp_path):
    from alignkit.train.checkpoint import WEIGHTS_NAME, CheckpointError, load_checkpoint, save_checkpoint

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ckpt = save_checkpoint(tmp_path, 1, model, opt, sched, {"step": 1})
    (ckpt / WEIGHTS_NAME).write_bytes(b"\x00" * 5)
    with pytest.raises(CheckpointError, match=re.escape(str(ckpt / WEIGHTS_NAME)) + ".*corrupt or truncated"):
        load_checkpoint(ckpt, model, opt, sched)


# ---------------------------------------------------------------- 14: rankings
@pytest.mark.parametrize("ranking", [[0, -3, 99], [10, 3, 7], [2, 3, 3], [1, 2, 4]])
def test_item14_ranking_must_be_ranks_1_to_k(tmp_path, ranking):
    path = _jsonl(tmp_path / "r.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"},
                                          {"prompt": "p", "responses": ["x", "y", "z"], "ranking": ranking}])
    with pytest.raises(DataError, match=_where(path, 2, "ranking") + r"expected a permutation of 1\.\.3.*got "
                       + re.escape(str(ranking))):
        load_examples(path, "preference")


def test_item14_valid_rankings_and_ties_still_accepted(tmp_path):
    path = _jsonl(tmp_path / "r.jsonl", [{"prompt": "p", "responses": ["x", "y", "z"], "ranking": [3, 1, 2]},
                                          {"prompt": "q", "responses": ["x", "y", "z"], "ranking": [1, 1, 3]}])
    examples, stats = load_examples(path, "preference")
    assert stats.n_pairs_from_rankings == 5
    assert (examples[0]["chosen"], examples[0]["rejected"]) == ("y", "x")  # x ranks 3, y ranks 1


# ---------------------------------------------------------------- 15: duplicate keys
def test_item15_duplicate_keys_in_jsonl_json_and_csv(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "completion": "c"},
                                          '{"prompt": "p", "completion": "c", "prompt": "other"}'])
    with pytest.raises(DataError, match=_where(path, 2, "prompt") + "duplicate key"):
        read_records(path)
    nested = _jsonl(tmp_path / "n.jsonl", ['{"messages": [{"role": "user", "content": "a", "role": "assistant"}]}'])
    with pytest.raises(DataError, match=_where(nested, 1, "messages[0].role") + "duplicate key"):
        read_records(nested)
    arr = tmp_path / "d.json"
    arr.write_text('[{"prompt": "p", "completion": "c"},\n {"prompt": "p", "completion": "c", "completion": "d"}]')
    with pytest.raises(DataError, match=_where(arr, 2, "completion", "row") + "duplicate key"):
        read_records(str(arr))
    csv = tmp_path / "d.csv"
    csv.write_text("prompt,completion,prompt\na,b,c\n")
    with pytest.raises(DataError, match=re.escape(f"{csv}, field 'prompt': ") + "the header names this column"):
        read_records(str(csv))


# ---------------------------------------------------------------- 16: one-sided KTO data
def test_item16_kto_with_one_label_refused_unless_allowed(tiny, tmp_path, capsys):
    data = _jsonl(tmp_path / "kto.jsonl", [{"prompt": "Hi", "completion": "Hello!", "label": True},
                                           {"prompt": "Yo", "completion": "Hey there", "label": True}])
    args = [f"model.name_or_path={tiny['policy']}", f"data.train={data}", "train.max_steps=1", "train.batch_size=2",
            "train.cpu=true"]
    assert main(["kto", *args, f"train.output_dir={tmp_path / 'refused'}"]) == 1
    err = capsys.readouterr().err
    assert re.search(re.escape(f"{data}, field 'label': all 2 training examples are labelled true"), err), err
    assert "kto.allow_one_label=true" in err and "Traceback" not in err
    assert main(["kto", *args, f"train.output_dir={tmp_path / 'allowed'}", "kto.allow_one_label=true"]) == 0
    assert "WARNING: all 2 training labels are true" in capsys.readouterr().err


# ---------------------------------------------------------------- 17: settings that do nothing
@pytest.mark.parametrize("overrides, named", [
    (["dpo.loss=orpo", "dpo.beta=0.2"], "dpo.beta=0.2 does nothing with dpo.loss=orpo"),
    (["dpo.reference_free=true", "dpo.ref_model=runs/nowhere"], "dpo.ref_model='runs/nowhere' does nothing: "
     "dpo.reference_free=true"),
    (["dpo.loss=orpo", "dpo.ref_model=runs/sft/model"], "dpo.ref_model='runs/sft/model' does nothing: "
     "dpo.loss=orpo uses no reference model"),
    (["dpo.loss=ipo", "dpo.label_smoothing=0.1"], "dpo.label_smoothing=0.1 does nothing with dpo.loss=ipo"),
    (["dpo.loss=orpo", "dpo.label_smoothing=0.1"], "dpo.label_smoothing=0.1 does nothing with dpo.loss=orpo"),
    (["dpo.simpo_gamma_beta_ratio=0.3"], "dpo.simpo_gamma_beta_ratio=0.3 does nothing with dpo.loss=dpo"),
    (["dpo.loss=simpo", "dpo.orpo_lambda=0.5"], "dpo.orpo_lambda=0.5 does nothing with dpo.loss=simpo"),
    (["dpo.loss=ipo", "dpo.reference_free=true"], "dpo.reference_free=True does nothing with dpo.loss=ipo"),
])
def test_item17_dpo_settings_the_loss_does_not_use_are_rejected(overrides, named):
    with pytest.raises(ConfigError, match=re.escape(named)):
        load_config(DPOConfig, None, overrides)


def test_item17_settings_each_loss_uses_still_accepted():
    for overrides in (["dpo.loss=orpo", "dpo.orpo_lambda=0.3"], ["dpo.loss=cdpo", "dpo.label_smoothing=0.1"],
                      ["dpo.loss=simpo", "dpo.beta=2.5", "dpo.simpo_gamma_beta_ratio=0.3", "dpo.label_smoothing=0.1"],
                      ["dpo.reference_free=true", "dpo.beta=0.2"], ["dpo.ref_model=runs/sft/model"],
                      ["dpo.loss=ipo", "dpo.beta=0.5", "dpo.precompute_ref_logps=false"]):
        load_config(DPOConfig, None, overrides)
    load_config(DPOConfig, "configs/dpo.yaml")


# ---------------------------------------------------------------- 18: CSV booleans and byte-order marks
def test_item18_csv_boolean_spellings(tmp_path):
    path = tmp_path / "kto.csv"
    path.write_text("prompt,completion,label\n" + "".join(f"p,c{i},{v}\n" for i, v in enumerate(
        ["true", "False", "1", "0", "YES", "no"])))
    examples, _ = load_examples(str(path), "kto")
    assert [e["label"] for e in examples] == [True, False, True, False, True, False]
    path.write_text("prompt,completion,label\np,c,maybe\n")
    with pytest.raises(DataError, match=_where(path, 1, "label", "row") + r"expected a bool .*true/false.*'maybe'"):
        load_examples(str(path), "kto")


def test_item18_byte_order_mark_accepted_in_csv_json_jsonl(tmp_path):
    bom = codecs.BOM_UTF8
    files = {"d.csv": b"prompt,completion\nhi,hello\n",
             "d.json": b'[{"prompt": "hi", "completion": "hello"}]',
             "d.jsonl": b'{"prompt": "hi", "completion": "hello"}\n'}
    for name, content in files.items():
        (tmp_path / name).write_bytes(bom + content)
        examples, _ = load_examples(str(tmp_path / name), "sft")
        assert examples[0]["completion"] == "hello", name


# ---------------------------------------------------------------- 19: the reward-callable contract
def test_item19_module_function_found_in_working_directory(tmp_path, monkeypatch):
    from alignkit.rewards.base import UserRewardFn, load_callable
    from alignkit.rewards.rules import CallableReward

    (tmp_path / "mymod_hardening.py").write_text(textwrap.dedent("""
        def score(prompts, completions, answer, **fields):
            return [1.0 if c.strip().endswith(str(a)) else 0.0 for c, a in zip(completions, answer)]
    """))
    monkeypatch.chdir(tmp_path)
    # as the `alignkit` console script runs: the working directory is not on sys.path
    monkeypatch.setattr(sys, "path", [p for p in sys.path if os.path.abspath(p or os.curdir) != str(tmp_path)])
    monkeypatch.delitem(sys.modules, "mymod_hardening", raising=False)
    fn = load_callable("mymod_hardening:score")
    assert isinstance(fn, type(lambda: 0)) and UserRewardFn.__doc__ and SIGNATURE in UserRewardFn.__doc__
    reward = CallableReward("mymod_hardening:score")
    out = reward(["1+1=", "2+2="], ["it is 2", "5"], [{"answer": "2"}, {"answer": "4"}])
    assert out.tolist() == [1.0, 0.0]


def test_item19_function_with_another_signature_gets_the_documented_one(tmp_path):
    from alignkit.rewards.base import RewardSpecError
    from alignkit.rewards.rules import CallableReward

    (tmp_path / "old_style.py").write_text("def score(prompts, completions, extras):\n    return [0.0] * len(prompts)\n")
    reward = CallableReward(f"{tmp_path / 'old_style.py'}:score")
    with pytest.raises(RewardSpecError, match=re.escape(SIGNATURE)):
        reward(["p"], ["c"], [{"answer": "1"}])


# ---------------------------------------------------------------- 20: the missing-reward hint
def test_item20_missing_reward_suggests_the_path_rm_writes():
    from alignkit.rewards.base import RewardSpecError
    from alignkit.rewards.combine import build_reward

    with pytest.raises(RewardSpecError, match=re.escape("{type: model, path: runs/rm/model}")):
        build_reward(RewardSection())


# ---------------------------------------------------------------- 22: the built-in tiny-random model
def test_item22_tiny_random_runs_sft_rm_and_grpo(tmp_path, monkeypatch):
    from alignkit.models.embedded import MANIFEST, resolve_model_path

    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))
    assert main(["sft", "model.name_or_path=tiny-random", "data.train=builtin:sft_demos", "train.max_steps=1",
                 "train.batch_size=2", "train.cpu=true", f"train.output_dir={tmp_path / 'sft'}"]) == 0
    folder = Path(resolve_model_path("tiny-random"))
    assert folder.parent == tmp_path / "cache" and (folder / MANIFEST).is_file()
    assert (tmp_path / "sft" / "model" / "model.safetensors").is_file()
    prefs = _jsonl(tmp_path / "prefs.jsonl", [{"prompt": "Greet me.", "chosen": "Hello, friend.", "rejected": "Go."},
                                              {"prompt": "Rate it.", "chosen": "Delicious.", "rejected": "Awful."}])
    assert main(["rm", "model.name_or_path=tiny-random", f"data.train={prefs}", "train.max_steps=1",
                 "train.batch_size=2", "train.cpu=true", f"train.output_dir={tmp_path / 'rm'}"]) == 0
    assert main(["grpo", "model.name_or_path=tiny-random", "data.train=builtin:arithmetic_1digit", "data.limit=4",
                 "reward.components=[{type: arithmetic}]", "grpo.num_iterations=1", "grpo.num_generations=2",
                 "grpo.prompts_per_iteration=2", "generation.max_new_tokens=4", "train.cpu=true",
                 f"train.output_dir={tmp_path / 'grpo'}"]) == 0
