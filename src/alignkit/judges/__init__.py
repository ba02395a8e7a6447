"""AI judges: pairwise preference from a local HF model, an OpenAI-compatible endpoint, or a Python callable.

Every judge compares in both orders and averages (see :mod:`alignkit.judges.base`)."""

from alignkit.judges.base import (
    COT_CLAMP, DEFAULT_PRINCIPLE, CallableJudge, Comparison, Judge, clamp_cot, debias, normalise_options,
)

__all__ = ["COT_CLAMP", "DEFAULT_PRINCIPLE", "CallableJudge", "Comparison", "Judge", "clamp_cot", "debias",
           "normalise_options"]
