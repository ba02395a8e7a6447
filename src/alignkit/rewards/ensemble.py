"""Reward-model ensembles with uncertainty: K members, one directory, one reward component.

Coste et al. (2023), "Reward Model Ensembles Help Mitigate Overoptimization"; Eisenstein et al. (2023),
"Helping or Herding? Reward Model Ensembles Mitigate but do not Eliminate Reward Hacking". Each member
r_k (k = 1..K) is normalised on reference samples (mean 0, std 1; ``alignkit rm`` stores the gain/bias in each
member), then per completion:

    mean   R = (1/K) sum_k r_k
    min    R = min_k r_k                              (worst-case optimisation, WCO)
    uwo    R = mean - lambda * Var_k r_k              (uncertainty-weighted optimisation, UWO)
    lcb    R = mean - lambda * Std_k r_k              (lower confidence bound)

Var and Std are over the K members with the 1/K (population) normaliser.

On disk an ensemble is ONE directory::

    ensemble.json   {"format": "alignkit-reward-ensemble", "version": 1, "mode": "seeds" | "heads",
                     "members": [{"path": "member_0", "head": 0}, ...]}
    member_0/ ...   ordinary reward-model checkpoints (``mode: seeds``: K models, trained on K seeds/bootstraps),
                    or one checkpoint with K outputs (``mode: heads``: K heads on one shared backbone)

:func:`load_ensemble` reads it; :meth:`RewardEnsemble.member_scores` gives the [K, N] per-member scores.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from alignkit.io_utils import atomic_write_json
from alignkit.rewards.reward_model import load_reward_model_scorer

MANIFEST = "ensemble.json"
FORMAT = "alignkit-reward-ensemble"


# ---------------------------------------------------------------- aggregation (pure)
def standardize(ref_scores: Tensor) -> tuple[Tensor, Tensor]:
    """Per-member gain/bias so that gain * r + bias has mean 0, std 1 on reference samples.

    ref_scores [K, M] -> (gain [K], bias [K]); gain = 1/std_k, bias = -mean_k/std_k (std Bessel-corrected, >= 1e-6).
    """
    mean = ref_scores.mean(dim=1)  # [K]
    std = ref_scores.std(dim=1).clamp(min=1e-6)  # [K]
    return 1.0 / std, -mean / std


def normalize_members(scores: Tensor, gain: Tensor, bias: Tensor) -> Tensor:
    """[K, N] raw member scores -> gain_k * r_k + bias_k ([K, N])."""
    return gain[:, None] * scores + bias[:, None]


def aggregate_mean(scores: Tensor, lam: float = 0.0) -> Tensor:
    """[K, N] -> [N]: (1/K) sum_k r_k."""
    return scores.mean(dim=0)


def aggregate_min(scores: Tensor, lam: float = 0.0) -> Tensor:
    """[K, N] -> [N]: min_k r_k (worst-case optimisation, Coste et al. 2023 eq. 3)."""
    return scores.min(dim=0).values


def aggregate_uwo(scores: Tensor, lam: float = 1.0) -> Tensor:
    """[K, N] -> [N]: mean_k r_k - lam * Var_k r_k (UWO, Coste et al. 2023 eq. 4; 1/K variance)."""
    return scores.mean(dim=0) - lam * scores.var(dim=0, unbiased=False)


def aggregate_lcb(scores: Tensor, lam: float = 1.0) -> Tensor:
    """[K, N] -> [N]: mean_k r_k - lam * Std_k r_k (lower confidence bound; 1/K standard deviation)."""
    return scores.mean(dim=0) - lam * scores.std(dim=0, unbiased=False)


AGGREGATES = {"mean": aggregate_mean, "min": aggregate_min, "uwo": aggregate_uwo, "lcb": aggregate_lcb}


def member_disagreement(scores: Tensor) -> float:
    """Mean over completions of the members' standard deviation (1/K): [K, N] -> float."""
    return float(scores.std(dim=0, unbiased=False).mean()) if scores.shape[0] > 1 else 0.0


# ---------------------------------------------------------------- the ensemble
class RewardEnsemble:
    """K reward members (``(scorer, head)``: a :class:`RewardModelScorer` and which of its outputs), scored together.

    As a reward component (``{type: model, path: <ensemble dir>, aggregate: ..., aggregate_lambda: ...}``) it
    returns the aggregate and, through :meth:`score_parts`, each member's score (``member_<k>``) and their std
    (``std``), logged as ``rewards/<name>/member_<k>`` and ``rewards/<name>/std``.
    """

    def __init__(self, members: list, aggregate: str = "mean", aggregate_lambda: float = 1.0,
                 name: str = "reward_model", path: str | None = None, mode: str = "seeds"):
        if not members:
            raise ValueError("a reward ensemble needs at least one member")
        if aggregate not in AGGREGATES:
            raise ValueError(f"unknown ensemble aggregate {aggregate!r}; choose one of {sorted(AGGREGATES)}")
        self.members = list(members)
        self.aggregate, self.aggregate_lambda, self.name, self.path, self.mode = (
            aggregate, float(aggregate_lambda), name, path, mode)
        distinct = list({id(s): s for s, _ in self.members}.values())
        self.model = torch.nn.ModuleList([s.model for s in distinct])  # ``.model.to(device)`` moves every member
        self.tokenizer = self.members[0][0].tokenizer
        self.batch_size = self.members[0][0].batch_size

    def __len__(self) -> int:
        return len(self.members)

    def view(self, aggregate: str, aggregate_lambda: float, name: str) -> "RewardEnsemble":
        """The same loaded members with another aggregate / name (one load per path)."""
        return RewardEnsemble(self.members, aggregate, aggregate_lambda, name, self.path, self.mode)

    def member_scores(self, prompts: list[str], completions: list[str]) -> Tensor:
        """[K, N] raw per-member scores (each after its own stored normalisation), CPU float32."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
        if not prompts:
            return torch.zeros(len(self.members), 0)
        cache: dict[int, Tensor] = {}
        rows = []
        for scorer, head in self.members:
            if id(scorer) not in cache:  # a heads-ensemble's backbone runs once for all its heads
                cache[id(scorer)] = scorer.heads(prompts, completions)  # [N, H]
            rows.append(cache[id(scorer)][:, head])
        return torch.stack(rows)  # [K, N]

    def score_parts(self, prompts: list[str], completions: list[str], extras: list[dict] | None = None
                    ) -> tuple[Tensor, dict[str, Tensor]]:
        """(aggregate [N], {"member_<k>": [N], "std": [N]})."""
        scores = self.member_scores(prompts, completions)  # [K, N]
        parts = {f"member_{k}": scores[k] for k in range(scores.shape[0])}
        parts["std"] = scores.std(dim=0, unbiased=False)
        return AGGREGATES[self.aggregate](scores, self.aggregate_lambda), parts

    def __call__(self, prompts: list[str], completions: list[str], extras: list[dict] | None = None) -> Tensor:
        return self.score_parts(prompts, completions, extras)[0]


def is_ensemble_dir(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def write_manifest(out_dir: str | Path, mode: str, members: list[dict], extra: dict | None = None) -> Path:
    """Write ``ensemble.json`` (atomically) listing ``members`` = [{"path": relative dir, "head": int}, ...]."""
    path = Path(out_dir) / MANIFEST
    atomic_write_json(path, {"format": FORMAT, "version": 1, "mode": mode, "members": members, **(extra or {})},
                      indent=2)
    return path


def read_manifest(path: str | Path) -> dict:
    """The validated manifest of the ensemble directory ``path`` (errors name the file and the field)."""
    file = Path(path) / MANIFEST
    if not file.is_file():
        raise ValueError(f"{path} is not a reward ensemble: {file} is missing (train one with `alignkit rm "
                         "rm.ensemble_size=K`)")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{file}: field 'format' must be {FORMAT!r}")
    members = manifest.get("members")
    if not isinstance(members, list) or not members:
        raise ValueError(f"{file}: field 'members' must be a non-empty list of {{'path', 'head'}}")
    for i, m in enumerate(members):
        if not isinstance(m, dict) or not isinstance(m.get("path"), str) or not isinstance(m.get("head", 0), int):
            raise ValueError(f"{file}: members[{i}] must be {{'path': str, 'head': int}}, got {m!r}")
        if not (Path(path) / m["path"]).is_dir():
            raise ValueError(f"{file}: members[{i}].path {m['path']!r} is not a directory inside {path}")
    return manifest


def load_ensemble(path: str | Path, batch_size: int = 16, normalize: bool = True, aggregate: str = "mean",
                  aggregate_lambda: float = 1.0, name: str = "reward_model") -> RewardEnsemble:
    """Load the ensemble directory ``path`` (frozen members, each distinct checkpoint once)."""
    manifest = read_manifest(path)
    loaded: dict[str, object] = {}
    members = []
    for i, m in enumerate(manifest["members"]):
        if m["path"] not in loaded:
            loaded[m["path"]] = load_reward_model_scorer(str(Path(path) / m["path"]), batch_size, normalize)
        scorer = loaded[m["path"]]
        head = int(m.get("head", 0))
        if not 0 <= head < len(scorer.head_names):
            raise ValueError(f"{Path(path) / MANIFEST}: members[{i}].head {head} is out of range: {m['path']} has "
                             f"{len(scorer.head_names)} output(s)")
        members.append((scorer, head))
    return RewardEnsemble(members, aggregate, aggregate_lambda, name, str(path), manifest.get("mode", "seeds"))
