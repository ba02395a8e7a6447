"""Combine reward components into one scalar per completion, and the missing-EOS penalty.

Multi-objective reward: R = Σ_k w_k · r_k(x, y). Each component's raw (unweighted) r_k is
returned separately so it is logged as ``rewards/<name>`` (a component with ``score_parts``, e.g. an ensemble,
adds ``rewards/<name>/<part>``).

Constrained reward (Safe RLHF, Dai et al. 2023): maximise the other components subject to E[r_c] >= d, with the
Lagrangian R = Σ_{k≠c} w_k r_k + λ r_c and λ updated once per iteration by :func:`lagrange_update`
(:class:`ConstrainedReward`; the online harness calls its ``end_iteration``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from alignkit.config import RewardComponent, RewardSection
from alignkit.rewards.base import RewardError, RewardFn, RewardSpecError, as_reward_tensor


class CombinedReward:
    """Weighted sum of named reward functions: ``total = Σ_k weight_k * r_k`` ([B] float32, CPU)."""

    def __init__(self, components: list[tuple[str, RewardFn, float]]):
        if not components:
            raise RewardSpecError("a combined reward needs at least one component")
        names = [name for name, _, _ in components]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise RewardSpecError(
                f"reward component names must be unique, {dupes} appear more than once; give each a 'name'"
            )
        self.components = [(name, fn, float(weight)) for name, fn, weight in components]

    @property
    def names(self) -> list[str]:
        return [name for name, _, _ in self.components]

    def __call__(
        self, prompts: list[str], completions: list[str], extras: list[dict]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        if len(prompts) != len(completions) or len(extras) != len(completions):
            raise ValueError(
                f"reward inputs disagree in length: {len(prompts)} prompts, {len(completions)} completions, "
                f"{len(extras)} extras"
            )
        b = len(completions)
        total = torch.zeros(b, dtype=torch.float32)  # [B]
        parts: dict[str, Tensor] = {}
        for name, fn, weight in self.components:
            extra: dict[str, Tensor] = {}
            try:
                if hasattr(fn, "score_parts"):  # e.g. an ensemble: its members and their std are logged too
                    values, extra = fn.score_parts(prompts, completions, extras)
                else:
                    values = fn(prompts, completions, extras)
            except (RewardSpecError, RewardError):
                raise
            except Exception as e:  # a user's function: name it and what it raised, not a bare traceback
                raise RewardError(f"reward component {name!r} raised {type(e).__name__}: {e}") from e
            r_k = as_reward_tensor(values, b, f"reward component {name!r}")  # [B]
            parts[f"rewards/{name}"] = r_k
            parts.update({f"rewards/{name}/{k}": v.detach().cpu().float() for k, v in extra.items()})
            total = total + self.weight_of(name, weight) * r_k
        return total, parts

    def weight_of(self, name: str, weight: float) -> float:
        """The weight of component ``name`` in the total (a constrained reward replaces one by its multiplier)."""
        return weight


def lagrange_update(lam: float, mean_c: float, threshold: float, lr: float, lam_max: float | None = None) -> float:
    """Dual ascent on the Lagrange multiplier of ``E[c] >= threshold`` (Dai et al. 2023, Safe RLHF, eq. 10 in the
    reward form; REFERENCES writes the cost form c_harm = -c, d = -threshold):

        lambda <- max(0, lambda + lr * (threshold - E[c]))

    It rises while the constraint is violated (E[c] < threshold) and decays to 0 once it holds. E.g. lambda = 0.5,
    E[c] = 0.2, threshold = 0.5, lr = 1: 0.5 + 0.3 = 0.8; with E[c] = 1.5: max(0, 0.5 - 1.0) = 0.
    """
    lam = max(0.0, lam + lr * (threshold - mean_c))
    return min(lam, lam_max) if lam_max is not None else lam


class ConstrainedReward(CombinedReward):
    """R = Σ_{k≠c} w_k r_k + λ r_c; ``end_iteration(metrics)`` updates λ from the batch mean ``rewards/<c>``.

    ``rewards/lambda`` (the λ the batch was scored with) is logged as one of the parts."""

    def __init__(self, components: list[tuple[str, RewardFn, float]], constrained: str, threshold: float,
                 lr: float, lambda_init: float = 0.0, lambda_max: float | None = None):
        super().__init__(components)
        if constrained not in self.names:
            raise RewardSpecError(f"reward.constraint.name {constrained!r} is not a component; the components are "
                                  f"{self.names}")
        self.constrained, self.threshold, self.lr, self.lambda_max = constrained, float(threshold), float(lr), lambda_max
        self.lam = float(lambda_init)

    def weight_of(self, name: str, weight: float) -> float:
        return self.lam if name == self.constrained else weight

    def __call__(self, prompts, completions, extras):
        total, parts = super().__call__(prompts, completions, extras)
        parts["rewards/lambda"] = torch.full((len(completions),), self.lam)
        return total, parts

    def end_iteration(self, metrics: dict[str, float]) -> dict[str, float]:
        """Update λ from this iteration's batch mean of the constrained component (means over all processes)."""
        key = f"rewards/{self.constrained}"
        if key not in metrics:
            raise RewardSpecError(f"constrained reward: the iteration's metrics lack {key!r}")
        self.lam = lagrange_update(self.lam, metrics[key], self.threshold, self.lr, self.lambda_max)
        return {"rewards/lambda_next": self.lam, "rewards/constraint_gap": metrics[key] - self.threshold}

    def state_dict(self) -> dict:
        return {"lambda": self.lam}

    def load_state_dict(self, state: dict) -> None:
        self.lam = float(state["lambda"])


def apply_missing_eos_penalty(
    scores: Tensor, has_eos: Tensor, penalty: float | None, mode: str = "subtract"
) -> Tensor:
    """Penalise responses that never emitted EOS (REFERENCES, PPO; Huang et al. 2024).

    ``subtract``: score - penalty where no EOS; ``set``: score := -penalty where no EOS;
    ``penalty = None``: unchanged.
    """
    if penalty is None:
        return scores
    no_eos = ~has_eos.to(device=scores.device, dtype=torch.bool)  # [B]
    if mode == "subtract":
        return torch.where(no_eos, scores - penalty, scores)
    if mode == "set":
        return torch.where(no_eos, torch.full_like(scores, -penalty), scores)
    raise ValueError(f"missing_eos_mode must be 'subtract' or 'set', got {mode!r}")


def _model_scorer(comp: RewardComponent, reward_models: dict, policy_tokenizer=None):
    from alignkit.rewards.ensemble import RewardEnsemble, is_ensemble_dir, load_ensemble
    from alignkit.rewards.reward_model import RewardModelScorer, load_reward_model_scorer

    name = comp.name or comp.type
    ensemble = is_ensemble_dir(comp.path)
    cached = reward_models.get(comp.path)
    if cached is None:
        cached = load_ensemble(comp.path) if ensemble else load_reward_model_scorer(comp.path, normalize=True)
        reward_models[comp.path] = cached
    if ensemble:
        if not isinstance(cached, RewardEnsemble):
            raise RewardSpecError(
                f"reward_models[{comp.path!r}] must be a RewardEnsemble, got {type(cached).__name__}")
        if comp.head is not None:
            raise RewardSpecError(f"reward component {name!r}: 'head' selects an output of a multi-objective reward "
                                  f"model, but {comp.path} is an ensemble (use 'aggregate')")
        if not comp.normalize:
            raise RewardSpecError(f"reward component {name!r}: an ensemble's members are always normalised on "
                                  "reference samples before aggregating; drop normalize: false")
        view = cached.view(comp.aggregate, comp.aggregate_lambda, name)
    else:
        if not isinstance(cached, RewardModelScorer):
            raise RewardSpecError(
                f"reward_models[{comp.path!r}] must be a RewardModelScorer, got {type(cached).__name__}"
            )
        if comp.aggregate != "mean":
            raise RewardSpecError(f"reward component {name!r}: aggregate {comp.aggregate!r} needs an ensemble "
                                  f"directory (with ensemble.json), but {comp.path} is a single reward model")
        heads = cached.head_names
        if comp.head is not None and comp.head not in heads:
            raise RewardSpecError(f"reward component {name!r}: head {comp.head!r} is not an output of {comp.path} "
                                  f"(its outputs: {heads})")
        head = heads.index(comp.head) if comp.head is not None else 0
        # one loaded model per path; each component gets its own view (name, normalisation, head)
        view = RewardModelScorer(cached.model, cached.tokenizer, cached.batch_size, normalize=comp.normalize,
                                 name=name, head=head)
    if policy_tokenizer is None or policy_tokenizer.get_vocab() == cached.tokenizer.get_vocab():
        return view
    return _OwnPromptFormat(view)


def _prm_scorer(comp: RewardComponent, reward_models: dict, policy_tokenizer=None):
    """A process reward model's aggregated solution score; one loaded model per path (key ``prm:<path>``)."""
    from alignkit.rewards.prm import PRMScorer, load_prm_scorer

    key = f"prm:{comp.path}"
    cached = reward_models.get(key)
    if cached is None:
        cached = reward_models[key] = load_prm_scorer(comp.path)
    view = PRMScorer(cached.model, cached.tokenizer, aggregation=comp.aggregation, separator=cached.separator,
                     batch_size=cached.batch_size, name=comp.name or comp.type)
    if policy_tokenizer is None or policy_tokenizer.get_vocab() == cached.tokenizer.get_vocab():
        return view
    return _OwnPromptFormat(view)


class _OwnPromptFormat:
    """A reward model scored on the prompt rendered in ITS format (``render_prompt`` with its own tokenizer: e.g.
    plain ``"<user text>\n\n"`` for an encoder), as ``alignkit rm`` trained it, not the policy's chat markup."""

    def __init__(self, scorer) -> None:
        self.scorer, self.name = scorer, scorer.name

    def _own(self, prompts: list[str], extras: list[dict] | None) -> list[str]:
        from alignkit.data.tokenize import PROMPT_MESSAGES_KEY, render_prompt

        extras = extras or [{}] * len(prompts)
        if any(PROMPT_MESSAGES_KEY not in e for e in extras):
            raise RewardSpecError(
                f"reward model {self.name!r} has another tokenizer than the policy and re-renders each prompt in its "
                f"own format from extras[{PROMPT_MESSAGES_KEY!r}], which these prompts lack (load them with "
                "alignkit.rollout.prompts.load_prompts)"
            )
        return [render_prompt(self.scorer.tokenizer, e[PROMPT_MESSAGES_KEY]) for e in extras]

    def __call__(self, prompts: list[str], completions: list[str], extras: list[dict] | None = None) -> Tensor:
        return self.scorer(self._own(prompts, extras), completions, extras)

    def score_parts(self, prompts: list[str], completions: list[str], extras: list[dict] | None = None):
        """The wrapped scorer's ``score_parts`` (an ensemble's members) on the re-rendered prompts."""
        own = self._own(prompts, extras)
        if hasattr(self.scorer, "score_parts"):
            return self.scorer.score_parts(own, completions, extras)
        return self.scorer(own, completions, extras), {}


def build_component(comp: RewardComponent, tokenizer=None, reward_models: dict | None = None) -> RewardFn:
    """One config component -> a reward function (``name`` = ``comp.name`` or the type)."""
    from alignkit.rewards import rules

    name = comp.name or comp.type
    if comp.type == "model":
        return _model_scorer(comp, reward_models if reward_models is not None else {}, tokenizer)
    if comp.type == "prm":
        return _prm_scorer(comp, reward_models if reward_models is not None else {}, tokenizer)
    if comp.type == "arithmetic":
        return _Named(rules.arithmetic_reward, name)
    if comp.type == "format":
        return rules.FormatReward(comp.pattern, name=name)
    if comp.type == "length":
        return rules.LengthReward(comp.target_length, tokenizer=tokenizer, name=name)
    if comp.type == "callable":
        return rules.CallableReward(comp.path, name=name)
    if comp.type == "vader":
        return rules.VaderReward(name=name)
    raise RewardSpecError(f"unknown reward component type {comp.type!r}")


class _Named:
    """Give a plain function a ``name`` without mutating it."""

    def __init__(self, fn, name: str):
        self.fn, self.name = fn, name

    def __call__(self, prompts, completions, extras):
        return self.fn(prompts, completions, extras)


def build_reward(section: RewardSection, tokenizer=None, reward_models: dict | None = None) -> CombinedReward:
    """``reward:`` config section -> :class:`CombinedReward`.

    ``reward_models`` maps a checkpoint path to a loaded :class:`RewardModelScorer`; models are
    loaded once per path and added to it, so the caller can reuse them (e.g. as the value init).
    ``tokenizer`` counts tokens for ``length`` components (characters without one).
    """
    if not section.components:
        raise RewardSpecError(
            "reward.components is empty; add at least one, e.g. {type: model, path: runs/rm/model} (the model "
            "`alignkit rm` writes to <train.output_dir>/model) or {type: arithmetic}"
        )
    names = [c.name or c.type for c in section.components]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:  # checked before any reward model is loaded
        raise RewardSpecError(
            f"reward.components: names {dupes} appear more than once; give each component a distinct 'name'"
        )
    cache = reward_models if reward_models is not None else {}
    built = [(c.name or c.type, build_component(c, tokenizer, cache), c.weight) for c in section.components]
    if section.constraint is not None:
        k = section.constraint
        return ConstrainedReward(built, k.name, k.threshold, k.lr, k.lambda_init, k.lambda_max)
    return CombinedReward(built)
