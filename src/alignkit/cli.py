"""Command line: ``alignkit <command> [config.yaml] [key=value ...] [--resume]`` (flags anywhere).

Thin by design: parse, load + validate the config, call ``algorithms.<x>.train(cfg)``.
``alignkit <command> --help`` lists every config key with its type, default and meaning.
"""

from __future__ import annotations

import argparse
import errno
import functools
import importlib
import json
import os
import sys
import typing
from dataclasses import dataclass

from pydantic import BaseModel

from alignkit import config as C


@dataclass(frozen=True)
class Command:
    config_cls: type[BaseModel]
    target: str  # "module:function"
    help: str


COMMANDS: dict[str, Command] = {
    "sft": Command(C.SFTConfig, "alignkit.algorithms.sft:train", "supervised fine-tuning on demonstrations"),
    "rm": Command(C.RMConfig, "alignkit.algorithms.reward_model:train", "Bradley-Terry reward model on preference pairs"),
    "dpo": Command(C.DPOConfig, "alignkit.algorithms.dpo:train",
                   "DPO family on preference pairs (dpo.loss: dpo, cdpo, ipo, orpo, simpo)"),
    "kto": Command(C.KTOConfig, "alignkit.algorithms.kto:train", "KTO on unpaired binary feedback"),
    "ppo": Command(C.PPOConfig, "alignkit.algorithms.ppo:train",
                   "PPO with a KL penalty against a reward model (InstructGPT step 3)"),
    "grpo": Command(C.GRPOConfig, "alignkit.algorithms.grpo:train",
                    "GRPO / Dr. GRPO / DAPO: critic-free RL with group-normalised advantages"),
    "rloo": Command(C.RLOOConfig, "alignkit.algorithms.rloo:train", "RLOO: REINFORCE with a leave-one-out baseline"),
    "reinforce-pp": Command(C.ReinforcePPConfig, "alignkit.algorithms.reinforce_pp:train",
                            "REINFORCE++ (reinforce_pp.baseline: the -baseline variant): critic-free RL, global "
                            "advantage normalisation"),
    "bon": Command(C.BoNConfig, "alignkit.algorithms.best_of_n:run", "best-of-n sampling with a reward"),
    "rs": Command(C.RejectionSamplingConfig, "alignkit.algorithms.rejection_sampling:train",
                  "rejection-sampling fine-tuning: best-of-n outputs become SFT data, iterated"),
    "quickstart": Command(C.QuickstartConfig, "alignkit.pipelines.quickstart:run",
                          "the whole pipeline on the embedded model: SFT -> preferences -> reward model -> DPO, with a report"),
    "prm": Command(C.PRMConfig, "alignkit.algorithms.prm:train", "process reward model: BCE on step labels at step separators"),
    "prm-eval": Command(C.PRMEvalConfig, "alignkit.pipelines.prm_eval:run",
                        "PRM vs outcome-RM best-of-n vs majority vote on held-out chained arithmetic (accuracy vs n)"),
    "rm-eval": Command(C.RMEvalConfig, "alignkit.eval.rm_eval:run", "evaluate a reward model or ensemble on held-out pairs"),
    "overopt": Command(C.OverOptConfig, "alignkit.pipelines.overopt:run",
                       "over-optimisation lab: proxies of several sizes + an ensemble, best-of-n and PPO, Gao's fits"),
    "online-dpo": Command(C.OnlineDPOConfig, "alignkit.algorithms.online_dpo:train",
                          "online / iterative DPO: sample pairs from the current policy, label, update"),
    "sample": Command(C.SampleConfig, "alignkit.label.sample:run",
                      "K responses per prompt from a policy -> a candidates file for `alignkit label create`"),
    "judge": Command(C.JudgeRunConfig, "alignkit.eval.judge_agreement:run",
                     "an AI judge's agreement with human preference labels (default: BIG-bench HHH), position bias"),
    "serve": Command(C.ServeConfig, "alignkit.serve:run",
                     "OpenAI-compatible /v1/chat/completions + /v1/models server for a local checkpoint"),
    "eval": Command(C.EvalConfig, "alignkit.eval.run:run", "evaluate policies: win rates with CIs, ranking, diagnostics, sycophancy, refusal, alignment tax"),
    "report": Command(C.ReportConfig, "alignkit.eval.html:run", "one self-contained HTML page comparing run directories"),
    "w2s": Command(C.W2SConfig, "alignkit.eval.w2s:run", "weak-to-strong generalisation (Burns et al. 2023): PGR with and without the confidence loss"),
    "cai-sl": Command(C.CAIConfig, "alignkit.pipelines.cai:run_sl", "Constitutional AI, supervised phase: critique -> revise red-team answers, then SFT"),
    "cai-rl": Command(C.CAIConfig, "alignkit.pipelines.cai:run_rl", "Constitutional AI, RL phase: judged pairs -> soft-label preference model -> PPO or DPO"),
    "cai": Command(C.CAIConfig, "alignkit.pipelines.cai:run", "Constitutional AI end to end (cai-sl, cai-rl) with the before/after refusal report"),
}
POSITIONAL_LISTS = {"report": "runs"}  # commands whose positional directories fill a list key

LABEL_HELP = "human preference labelling app: alignkit label create|invite|serve|stats|export (see label --help)"


def register(name: str, command: Command) -> None:
    COMMANDS[name] = command


def _type_name(annotation) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return "{" + ",".join(str(a) for a in typing.get_args(annotation)) + "}"
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " | ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is not None:
        return str(annotation).replace("typing.", "").replace("alignkit.config.", "")
    return getattr(annotation, "__name__", str(annotation))


def _list_item_model(annotation) -> type[BaseModel] | None:
    """``list[RewardComponent]`` -> ``RewardComponent`` (a list whose items are config sections), else None."""
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation) or (None,)
        if isinstance(item, type) and issubclass(item, BaseModel):
            return item
    return None


def _doc(cls: type[BaseModel], name: str) -> str:
    field = cls.model_fields[name]
    return " ".join((field.description or _attribute_doc(cls, name) or "").split())


def describe_config(cls: type[BaseModel], prefix: str = "", default: BaseModel | None = None) -> list[str]:
    """One line per leaf key: ``train.lr (float, default 5e-07): ...``; the fields of a list of sections
    (``reward.components``) follow it, one line each (``reward.components[].type``)."""
    lines = []
    inst = default if default is not None else cls()
    for name, field in cls.model_fields.items():
        value = getattr(inst, name)
        key = f"{prefix}{name}"
        if isinstance(value, BaseModel):
            lines += describe_config(type(value), key + ".", value)
            continue
        doc = _doc(cls, name)
        lines.append(f"  {key} ({_type_name(field.annotation)}, default {value!r}){': ' + doc if doc else ''}")
        item = _list_item_model(field.annotation)
        if item is not None:
            for sub, sub_field in item.model_fields.items():
                required = sub_field.is_required()
                default_s = "required" if required else f"default {sub_field.get_default(call_default_factory=True)!r}"
                sub_doc = _doc(item, sub)
                lines.append(f"    {key}[].{sub} ({_type_name(sub_field.annotation)}, {default_s})"
                             f"{': ' + sub_doc if sub_doc else ''}")
    return lines


def _attribute_doc(cls: type, name: str) -> str:
    return _attribute_docs(cls).get(name, "")


@functools.lru_cache(maxsize=None)
def _attribute_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string literal under a field), parsed once per class."""
    import ast
    import inspect
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        target = getattr(node, "target", None)
        if isinstance(node, ast.AnnAssign) and isinstance(target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                docs[target.id] = str(nxt.value.value)
    return docs


CALLABLE_WARNING = (
    "Security: a `callable` reward component ({type: callable, path: ...}) imports and runs the Python code its "
    "path names, so a config that contains one runs code: use configs only from sources you trust."
)

SMOKE_TEST_HELP = (
    "Smoke-test a config in seconds with the built-in tiny random model: model.name_or_path=tiny-random "
    "(a policy or a reward model; it learns nothing useful), e.g. `alignkit sft model.name_or_path=tiny-random "
    "data.train=builtin:sft_demos train.max_steps=1`."
)

REWARD_HELP = """Reward components (reward.components, a list; fields listed above under reward.components[]):
  reward.components='[{type: arithmetic}, {type: format, pattern: "[0-9]+$", weight: 0.5}]'
  reward.components='[{type: model, path: runs/rm/model}]'      # the model `alignkit rm` writes
  reward.components='[{type: callable, path: "mymod:score"}]'   # mymod.py in the current directory
  reward.components='[{type: callable, path: "path/to/rewards.py:score"}]'

A callable reward is called with keywords and returns one float per completion:

  """ + C.CALLABLE_REWARD_SIGNATURE + """

  # mymod.py
  def score(prompts, completions, answer, **fields):
      # prompts, completions: B strings each; every other field of the prompt records comes as a list of B
      # values (None where a row lacks it), here `answer`
      return [1.0 if c.strip().endswith(str(a)) else 0.0 for c, a in zip(completions, answer)]

""" + CALLABLE_WARNING


def _has_rewards(cls: type[BaseModel]) -> bool:
    return any(isinstance(getattr(cls(), name), C.RewardSection) for name in cls.model_fields)


class _CommandParser(argparse.ArgumentParser):
    """A command's parser that takes its flags anywhere: ``alignkit sft --resume train.max_steps=1`` as well as
    ``alignkit sft train.max_steps=1 --resume``. argparse fills a ``nargs="*"`` positional from one run of
    positional words only and reports later ones as unrecognized; here they join ``args`` in order (unknown
    ``--flags`` stay errors)."""

    def parse_known_args(self, args=None, namespace=None):
        ns, extras = super().parse_known_args(args, namespace)
        words = [a for a in extras if not a.startswith("-") or a == "-"]
        if words and hasattr(ns, "args"):
            ns.args = [*(ns.args or []), *words]
            extras = [a for a in extras if a not in words]
        return ns, extras


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alignkit",
        description="Align language models with preferences. Each command takes an optional YAML config and "
        "dotted overrides, e.g. `alignkit dpo configs/dpo.yaml train.lr=1e-6 dpo.beta=0.2`; flags such as "
        "--resume may come anywhere. " + SMOKE_TEST_HELP,
        epilog=CALLABLE_WARNING,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_CommandParser)
    for name, cmd in COMMANDS.items():
        epilog = REWARD_HELP if _has_rewards(cmd.config_cls) else None
        p = sub.add_parser(
            name,
            help=cmd.help,
            description=f"{cmd.help}.\n\nConfig keys (set in the YAML file or as key=value overrides):\n"
            + "\n".join(describe_config(cmd.config_cls)) + "\n\n" + SMOKE_TEST_HELP,
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("args", nargs="*", metavar="[config.yaml] [key=value ...]")
        p.add_argument("--resume", action="store_true", help="continue the run in train.output_dir from its last checkpoint")
        p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    sub.add_parser("label", help=LABEL_HELP, add_help=False)  # its own flags: dispatched in main()
    return parser


def split_args(args: list[str]) -> tuple[str | None, list[str]]:
    """``[config.yaml] [key=value ...]`` in any order -> (config path or None, overrides in order)."""
    paths = [a for a in args if "=" not in a]
    if len(paths) > 1:
        raise C.ConfigError(f"unexpected argument {paths[1]!r}: give at most one config file (got {paths}) and "
                            "key=value overrides")
    return (paths[0] if paths else None), [a for a in args if "=" in a]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["label"]:  # subcommands with flags, not a config: alignkit.label.cli
        return importlib.import_module("alignkit.label.cli").main(argv[1:])
    parser = build_parser()
    ns = parser.parse_args(argv)
    if not ns.command:
        parser.print_help()
        return 2
    cmd = COMMANDS[ns.command]
    listed = [a for a in ns.args if "=" not in a and os.path.isdir(a)] if ns.command in POSITIONAL_LISTS else []
    if listed:
        key = POSITIONAL_LISTS[ns.command]
        ns.args = [a for a in ns.args if a not in listed] + [f"{key}={json.dumps(listed)}"]
    try:
        path, overrides = split_args(ns.args)
        cfg = C.load_config(cmd.config_cls, path, overrides)
    except C.ConfigError as e:
        print(f"alignkit {ns.command}: {e}", file=sys.stderr)
        return 2
    if ns.print_config:
        print(C.config_to_yaml(cfg), end="")
        return 0
    from alignkit.ops.threads import configure_allocator, configure_threads

    configure_allocator()
    try:
        configure_threads()
    except ValueError as e:
        print(f"alignkit {ns.command}: error: {e}", file=sys.stderr)
        return 2
    module, fn = cmd.target.split(":")
    train = getattr(importlib.import_module(module), fn)
    from alignkit.data.io import DataError
    from alignkit.models.embedded import AssetError
    from alignkit.models.loading import ModelLoadError
    from alignkit.train.loop import NonFiniteLossError
    from alignkit.train.run import RunError

    try:
        train(cfg, resume=ns.resume)
    except (DataError, ModelLoadError, RunError, NonFiniteLossError, C.ConfigError, ValueError, AssetError) as e:
        print(f"alignkit {ns.command}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # checkpoints and models are written to a temporary directory and renamed: nothing half-written is left
        where = f" while writing {e.filename}" if e.filename else ""
        print(f"alignkit {ns.command}: error: no space left on the device{where} ({e.strerror or e}). Free some space "
              "(each run dir holds its checkpoints and model/) and rerun with --resume to continue from the last "
              "complete checkpoint.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
