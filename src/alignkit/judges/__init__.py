"""AI judges: pairwise preference from a local HF model, an OpenAI-compatible endpoint, or a Python callable.

    judge = make_judge(JudgeConfig(kind="hf", model="embedded"))
    comp = judge.compare(prompts, responses_a, responses_b, principles)   # both orders, averaged
    comp.p_a, comp.position_bias_rate, judge.usage()

Every judge compares in both orders and averages (see :mod:`alignkit.judges.base`)."""

from alignkit.judges.base import (
    COT_CLAMP, DEFAULT_PRINCIPLE, CallableJudge, Comparison, Judge, clamp_cot, consistency_of, debias,
    normalise_options, self_consistency, verdicts,
)
from alignkit.user_code import load_callable

__all__ = ["make_judge", "COT_CLAMP", "DEFAULT_PRINCIPLE", "CallableJudge", "Comparison", "Judge", "clamp_cot",
           "consistency_of", "debias", "normalise_options", "self_consistency", "verdicts"]


def make_judge(cfg) -> Judge:
    """Build the judge a :class:`alignkit.config.JudgeConfig` describes."""
    if cfg.kind == "callable":
        return CallableJudge(load_callable(cfg.fn, what="judge function"), name=cfg.fn,
                             chain_of_thought=cfg.chain_of_thought)
    if cfg.kind == "hf":
        from alignkit.judges.hf import HFJudge

        return HFJudge.from_config(cfg)
    if cfg.kind == "openai":
        from alignkit.judges.remote import OpenAIJudge

        return OpenAIJudge.from_config(cfg)
    raise ValueError(f"judge.kind must be 'hf', 'openai' or 'callable', got {cfg.kind!r}")
