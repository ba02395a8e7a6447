"""AI judges: pairwise preference from a local HF model, an OpenAI-compatible endpoint, or a Python callable.

Every judge compares in both orders and averages (see :mod:`alignkit.judges.base`)."""

from alignkit.judges.base import (
    COT_CLAMP, DEFAULT_PRINCIPLE, CallableJudge, Comparison, Judge, clamp_cot, debias, normalise_options,
)

__all__ = ["make_judge", "COT_CLAMP", "DEFAULT_PRINCIPLE", "CallableJudge", "Comparison", "Judge", "clamp_cot", "debias",
           "normalise_options"]


def make_judge(cfg) -> Judge:
    """Build the judge a :class:`alignkit.config.JudgeConfig` describes."""
    if cfg.kind == "callable":
        from alignkit.rewards.base import load_callable

        return CallableJudge(load_callable(cfg.fn), name=cfg.fn, chain_of_thought=cfg.chain_of_thought)
    raise NotImplementedError(f"judge kind {cfg.kind!r} is not built yet")
