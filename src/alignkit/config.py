"""Typed, validated configs: YAML file + dotted command-line overrides.

Every algorithm has one top-level config class made of shared sections (``model``,
``data``, ``train``) plus its own section (``dpo``, ``rm``, ...). Configs are frozen
after validation; unknown keys and wrong types are errors that name the key.

    cfg = load_config(DPOConfig, "configs/dpo.yaml", ["train.lr=1e-6", "dpo.beta=0.2"])
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator



def _yaml_no(v):
    return "no" if v is False else v  # YAML reads a bare `no` as false


_T = TypeVar("_T")
YamlNo = Annotated[_T, BeforeValidator(_yaml_no)]
"""A precision setting whose value ``no`` survives YAML (which reads a bare ``no`` as false)."""

class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


# ---------------------------------------------------------------- shared sections
class LoraConfig(Section):
    enabled: bool = False
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | str = "all-linear"
    layers_to_transform: list[int] | None = None
    """Only adapt these transformer layers (e.g. the last few): backward then stops early — much faster on CPU.
    Needs ``target_modules`` as a list of module names (e.g. [q_proj, v_proj])."""

    @model_validator(mode="after")
    def _layers(self) -> "LoraConfig":
        if self.layers_to_transform is not None and isinstance(self.target_modules, str):
            raise ValueError("lora.layers_to_transform needs lora.target_modules as a list of names, e.g. [q_proj, v_proj]")
        return self


class ModelConfig(Section):
    name_or_path: str = "smollm2-135m-instruct"
    """A hub id, a local directory, or ``smollm2-135m-instruct`` (the embedded model)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    lora: LoraConfig = LoraConfig()
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    num_hidden_layers: int | None = Field(None, gt=0)
    """Keep only the first N transformer layers: a smaller reward/value model sharing the policy's tokenizer."""
    freeze_embeddings: bool = False
    """Full fine-tuning: keep the input embedding matrix (and a head tied to it) frozen. Saves its gradient and
    optimizer update (a third of a MiniLM); a common choice when the data is small."""


class DataConfig(Section):
    train: str = ""
    """Path to .jsonl/.json/.parquet/.csv, a saved ``datasets`` directory, or ``builtin:<name>``."""
    eval: str | None = None
    """Held-out data; if unset, ``eval_fraction`` of train is held out (0 disables evaluation)."""
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    max_length: int = Field(512, gt=0)
    """Prompt + response tokens; prompts are truncated from the left, responses from the right."""
    max_prompt_length: int | None = Field(None, gt=0)
    """If set, longer prompts are truncated from the left to this many tokens (counted in the log).
    Unset: a prompt that leaves no room for a response within ``max_length`` is an error."""
    on_error: Literal["raise", "skip"] = "raise"
    """``raise``: the first malformed record stops the run. ``skip``: drop it and count it in the log."""
    system_prompt: str | None = None
    limit: int | None = Field(None, gt=0)
    """Use only the first N records (after validation) — for smoke runs."""

    @model_validator(mode="after")
    def _lengths(self) -> "DataConfig":
        if self.max_prompt_length is not None and self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"data.max_prompt_length ({self.max_prompt_length}) must be < data.max_length ({self.max_length})"
            )
        return self


def check_output_dir_value(value: str, key: str) -> str:
    """A run directory setting: not empty (an empty one would write checkpoints and the model into the current
    directory)."""
    if not str(value).strip():
        raise ValueError(f"{key} is empty: give a directory for the run (e.g. runs/my_run)")
    return value


def check_path_inside_run(value: str, key: str) -> str:
    """An output file named relative to the run directory: it may not be empty nor climb out of it with ``..``;
    an absolute path is taken as given (written on purpose outside the run directory)."""
    if not str(value).strip():
        raise ValueError(f"{key} is empty: give a file name (relative to the run directory) or an absolute path")
    if os.path.isabs(value):
        return value
    norm = os.path.normpath(value)
    if norm == ".." or norm.startswith(".." + os.sep) or norm == ".":
        raise ValueError(f"{key}={value!r} would be written outside the run directory (or is the directory itself); "
                         "give a path inside it, or an absolute path to write elsewhere on purpose")
    return value


class TrainConfig(Section):
    output_dir: str = "runs/run"
    seed: int = 0
    lr: float = Field(5e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    epochs: int = Field(1, gt=0)
    max_steps: int | None = Field(None, gt=0)
    """Optimizer steps; overrides ``epochs`` when set."""
    batch_size: int = Field(8, gt=0)
    """Examples per micro-batch (per device)."""
    grad_accum: int = Field(1, gt=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    scheduler: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    padding_free: bool = False
    """Run each micro-batch's sequences as one packed row (position ids restart per sequence, attention stays
    inside each): no compute on padding. Same losses up to float rounding (SFT, DPO family, KTO)."""
    reuse_frozen_prefix: bool = True
    """Online RL (PPO) under LoRA on the last layers: run the frozen leading layers once per rollout and keep their
    states ([B, T, hidden] per rollout batch) for the old/reference log-probs and every PPO epoch (``ops/prefix.py``).
    Same log-probs up to float rounding; turn off to save that memory on very large rollout batches."""
    mixed_precision: YamlNo[Literal["no", "bf16", "fp16", "auto"]] = "no"
    """Autocast (accelerate's mixed precision). ``auto``: bf16 where the hardware computes it natively (a CUDA GPU with
    bf16, a CPU with AVX512-BF16/AMX), else ``no`` (CPUs without it emulate bf16 ~20x slower than fp32)."""

    eval_every: int = Field(0, ge=0)
    """Evaluate every N optimizer steps (0: only at the end)."""
    save_every: int = Field(0, ge=0)
    """Checkpoint every N optimizer steps (0: only at the end)."""
    save_every_minutes: float = Field(30.0, ge=0)
    """Also checkpoint when this many minutes have passed since the last checkpoint (0: off), so a killed long run
    can always ``--resume``; where checkpoints fall never changes the results."""
    keep_checkpoints: int = Field(2, ge=0)
    """Keep the newest N checkpoints while training. 0: keep only the final model: the newest intermediate checkpoint
    (``save_every`` / ``save_every_minutes``) is kept while training, and deleted with the others once the run has
    finished (the run dir then holds model/, config, log, metrics and summary)."""
    log_every: int = Field(1, gt=0)
    eval_batch_size: int | None = Field(None, gt=0)
    save_model: bool = True
    """Write the final model (merged LoRA) loadable with ``from_pretrained``."""
    cpu: bool = False
    """Force CPU even when an accelerator is present."""
    optimizer: Literal["adamw", "adamw_fused"] = "adamw"
    """``adamw``: torch's AdamW (for-each implementation); ``adamw_fused``: the same update in one fused kernel per
    dtype/device group (``torch.optim.AdamW(fused=True)``, CPU and CUDA). Same maths up to float rounding."""

    @field_validator("output_dir")
    @classmethod
    def _output_dir(cls, v: str) -> str:
        return check_output_dir_value(v, "train.output_dir")


# ---------------------------------------------------------------- algorithm sections
class SFTConfig(Section):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig(output_dir="runs/sft", lr=2e-5)


class RMSection(Section):
    normalize: bool = False
    """After training, shift/scale scores so reference samples have mean 0, std 1 (stored in the model config)."""
    normalize_data: str | None = None
    """Records whose (prompt, response) define the normalisation; default: the chosen+rejected responses of train."""
    group_by_prompt: bool = True
    """InstructGPT batching: all K-choose-2 pairs of one prompt in one batch, one forward per response."""
    margin: bool = False
    """Use a record's optional ``margin`` field in the loss (Llama 2)."""
    # -- ensembles and multi-objective heads (docs/reward_models.md)
    ensemble_size: int = Field(1, ge=1)
    """K > 1: an ensemble of K members saved as one directory (``ensemble.json`` + members); its members are always
    normalised on the reference samples (``rm.normalize_data``, default the train responses)."""
    ensemble_mode: Literal["seeds", "heads"] = "seeds"
    """``seeds``: K full models on seeds ``train.seed + k`` (and bootstrap resamples); ``heads``: K heads on one
    shared backbone (cheap; Poisson(1) bootstrap weights per head)."""
    bootstrap: bool = True
    """Ensembles: each member trains on its own bootstrap resample of the training prompts (pairs, for heads)."""
    heads: list[str] | None = None
    """Multi-objective: one named output per objective (e.g. [helpful, harmless, honest, other]); a pair trains only
    the head of its ``category`` (or ``subset``, as BIG-bench HHH records carry) field, every head without one."""

    @model_validator(mode="after")
    def _ensemble_or_heads(self) -> "RMSection":
        if self.heads is not None and self.ensemble_size > 1:
            raise ValueError("rm.heads (multi-objective) and rm.ensemble_size > 1 cannot be combined")
        if self.heads is not None and (not self.heads or len(set(self.heads)) != len(self.heads)):
            raise ValueError(f"rm.heads must be distinct names, got {self.heads}")
        return self


class RMConfig(Section):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig(output_dir="runs/rm", lr=1e-5)
    rm: RMSection = RMSection()


class DPOSection(Section):
    loss: Literal["dpo", "cdpo", "ipo", "orpo", "simpo"] = "dpo"
    beta: float | None = Field(None, gt=0)
    """Default per loss: 0.1 (dpo, cdpo, ipo), 2.0 (simpo). Not used by orpo. A setting that the chosen loss does
    not use (e.g. beta with orpo, label_smoothing with ipo/orpo, simpo_gamma_beta_ratio without simpo, ref_model
    with reference_free=true) is an error."""
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)
    """cDPO's epsilon (required > 0 for ``cdpo``)."""
    reference_free: bool = False
    orpo_lambda: float = Field(0.1, gt=0)
    simpo_gamma_beta_ratio: float = Field(0.5, ge=0)
    precompute_ref_logps: bool = True
    """Compute reference log-probs once before training (frees the reference model)."""
    ref_model: str | None = None
    """Reference checkpoint; default: the policy's initial weights (adapter-disabled under LoRA)."""

    @model_validator(mode="after")
    def _check(self) -> "DPOSection":
        if self.loss == "cdpo" and self.label_smoothing <= 0:
            raise ValueError("dpo.loss=cdpo needs dpo.label_smoothing > 0 (e.g. 0.1)")
        unused = unused_dpo_settings(self)
        if unused:
            raise ValueError("; ".join(f"dpo.{name}={getattr(self, name)!r} {why}" for name, why in unused)
                             + f"; remove {'it' if len(unused) == 1 else 'them'}")
        return self


# Settings that only matter through the reference model, and the setting that turns the reference off.
_REFERENCE_SETTINGS = ("ref_model", "precompute_ref_logps")


def unused_dpo_settings(section: DPOSection) -> list[tuple[str, str]]:
    """``(setting, why)`` for every ``dpo:`` setting changed from its default that the chosen loss never reads.

    Which settings a loss reads comes from its row of ``alignkit.losses.PREFERENCE_LOSSES`` (``settings``
    and ``needs_reference``); the reference settings count only when a reference model is used."""
    defaults = DPOSection.model_construct()
    changed = [name for name in DPOSection.model_fields
               if name != "loss" and getattr(section, name) != getattr(defaults, name)]
    if not changed:
        return []  # the defaults are always valid (checked without importing the losses, hence torch)
    from alignkit.losses.preference import PREFERENCE_LOSSES

    spec = PREFERENCE_LOSSES[section.loss]
    read = {setting for _, setting in spec.settings}
    unused = []
    for name in changed:
        if name in _REFERENCE_SETTINGS:
            if not spec.needs_reference:
                unused.append((name, f"does nothing: dpo.loss={section.loss} uses no reference model"))
            elif section.reference_free:
                unused.append((name, "does nothing: dpo.reference_free=true uses no reference model"))
        elif name not in read:
            uses = ", ".join(f"dpo.{r}" for r in sorted(read)) or "no other setting"
            unused.append((name, f"does nothing with dpo.loss={section.loss} (it uses {uses})"))
    return unused


def default_beta(loss: str) -> float:
    return {"simpo": 2.0}.get(loss, 0.1)


class DPOConfig(Section):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig(output_dir="runs/dpo", lr=5e-7)
    dpo: DPOSection = DPOSection()


class KTOSection(Section):
    beta: float = Field(0.1, gt=0)
    desirable_weight: float = Field(1.0, gt=0)
    undesirable_weight: float = Field(1.0, gt=0)
    precompute_ref_logps: bool = True
    allow_one_label: bool = False
    """Train on data whose labels are all true (or all false). Refused by default: KTO then only pushes the rewards
    one way, which is usually a data mistake (a label column read wrongly, a filtered file)."""


class KTOConfig(Section):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig(output_dir="runs/kto", lr=5e-7)
    kto: KTOSection = KTOSection()


# ---------------------------------------------------------------- loading
C = TypeVar("C", bound=BaseModel)


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["train.lr=1e-6", "model.lora.enabled=true"]`` -> nested dict (values parsed as YAML scalars)."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.lr=1e-6)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, bool) and raw.strip().lower() in ("no", "yes", "on", "off", "y", "n"):
            value = raw.strip()  # YAML 1.1 reads these as booleans; pydantic still accepts them for bool fields
        _set_dotted(tree, key, value)
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        else:
            got = e.get("input")
            got_s = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"  {key}: {e['msg']}{got_s}")
    return "\n".join(lines)


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None) -> C:
    """Read ``path`` (YAML) if given, apply dotted ``overrides``, validate into ``cls``."""
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must contain a mapping at top level, got {type(loaded).__name__}")
        tree = loaded
        source = str(path)
    if overrides:
        tree = _merge(tree, parse_overrides(overrides))
        source += " + overrides"
    # Sections given in YAML replace defaults key-by-key, not wholesale: merge with the class defaults.
    defaults = cls().model_dump(mode="json")
    try:
        return cls.model_validate(_merge(defaults, tree))
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None


def save_config(cfg: BaseModel, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), encoding="utf-8")


def config_to_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


# ---------------------------------------------------------------- online RL sections
class VLLMSection(Section):
    """Settings of the colocated vLLM engine (``generation.backend: vllm``; needs a CUDA GPU and
    ``pip install alignkit[vllm]``)."""

    gpu_memory_utilization: float = Field(0.3, gt=0, le=1.0)
    """Share of the GPU's memory vLLM may take (the trainer shares the device)."""
    tensor_parallel_size: int = Field(1, gt=0)
    max_model_len: int | None = Field(None, gt=0)
    """Prompt + response tokens vLLM plans for (default: the model's own limit)."""
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    enforce_eager: bool = False


class GenerationSection(Section):
    backend: Literal["hf", "vllm"] = "hf"
    """Generation engine: ``hf`` (transformers generate, any device) or ``vllm`` (colocated vLLM engine, weights
    synced after every policy update; CUDA only). Log-probs for the loss are always recomputed by the trainer."""
    vllm: VLLMSection = VLLMSection()
    max_new_tokens: int = Field(48, gt=0)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1.0)
    top_k: int = Field(0, ge=0)
    """0 disables top-k."""
    batch_size: int = Field(16, gt=0)
    """Prompts per generate() call; each brings its G samples (GRPO/RLOO/best-of-n), so a call has
    batch_size x G rows."""
    cache_implementation: Literal["dynamic", "static"] = "dynamic"
    """``hf`` backend's KV cache: ``dynamic`` (grows per step, transformers' default) or ``static`` (preallocated
    to prompt + max_new_tokens). Same tokens; which is faster depends on the machine (``make bench`` measures it)."""


CALLABLE_REWARD_SIGNATURE = "def score(prompts: list[str], completions: list[str], **fields) -> list[float]"
"""What a ``callable`` reward component's function looks like (``alignkit.rewards.base.UserRewardFn``)."""


class RewardComponent(Section):
    type: Literal["model", "arithmetic", "format", "length", "callable", "vader", "prm"]
    weight: float = 1.0
    name: str | None = None
    """Logged as rewards/<name>; defaults to the type."""
    path: str | None = None
    """``model``: reward-model checkpoint (``alignkit rm`` writes ``<output_dir>/model``); ``callable``:
    ``module:function`` (a module in the current directory or on PYTHONPATH) or ``path/to/file.py:function``.
    A callable reward IMPORTS AND RUNS that Python code: use configs only from sources you trust."""
    pattern: str | None = None
    """``format``: regex the completion must match (re.search) for reward 1, else 0."""
    target_length: int | None = Field(None, gt=0)
    """``length``: reward -|len(tokens)-target|/target (characters when no tokenizer)."""
    normalize: bool = True
    """``model``: apply the normalisation gain/bias stored with the reward model, if any."""
    aggregation: Literal["min", "product", "last"] = "min"
    """``prm``: a solution's score from its step scores (min, product or the last step's)."""
    # -- reward-model ensembles and multi-objective heads (docs/reward_models.md)
    head: str | None = None
    """``model``: which named output of a multi-objective reward model (``rm.heads``) is this component's score."""
    aggregate: Literal["mean", "min", "uwo", "lcb"] = "mean"
    """``model`` with an ensemble directory (``rm.ensemble_size`` > 1): mean; min (worst case); uwo = mean -
    lambda * variance; lcb = mean - lambda * std, over the members normalised on reference samples."""
    aggregate_lambda: float = Field(1.0, ge=0)
    """The lambda of ``aggregate: uwo`` and ``aggregate: lcb``."""

    @model_validator(mode="after")
    def _needs(self) -> "RewardComponent":
        need = {"model": "path", "prm": "path", "callable": "path", "format": "pattern", "length": "target_length"}.get(self.type)
        if need and getattr(self, need) is None:
            raise ValueError(f"reward component of type {self.type!r} needs '{need}'")
        if self.type == "callable" and ":" not in (self.path or ""):
            raise ValueError(f"callable reward path must be 'module:function', got {self.path!r}")
        return self


# -- constrained rewards (Safe RLHF; docs/reward_models.md)
class RewardConstraint(Section):
    """Maximise the other components subject to E[component ``name``] >= ``threshold``: reward
    R = sum_{k != name} w_k r_k + lambda * r_name, with lambda <- max(0, lambda + lr * (threshold - batch mean of
    r_name)) after every iteration (Dai et al. 2023, Safe RLHF; the cost form with c = -r_name, d = -threshold)."""

    name: str
    """The constrained component (its ``name``, or its type when unnamed)."""
    threshold: float
    lr: float = Field(0.1, gt=0)
    """eta, the multiplier's step size."""
    lambda_init: float = Field(0.0, ge=0)
    lambda_max: float | None = Field(None, gt=0)
    """Optional cap on lambda."""


class RewardSection(Section):
    components: list[RewardComponent] = []
    """Reward terms summed with their weights, R = sum_k weight_k * r_k, each logged as rewards/<name>. Fields of
    a component: type, weight, name, path, pattern, target_length, normalize (listed below). A ``callable``
    component's function is called as ``fn(prompts=[...], completions=[...], **fields)`` and returns one float per
    completion (see the example below)."""
    missing_eos_penalty: float | None = None
    """Responses that never emit EOS: score -= penalty (``missing_eos_mode=subtract``) or score := -penalty (``set``)."""
    missing_eos_mode: Literal["subtract", "set"] = "subtract"
    constraint: RewardConstraint | None = None
    """A Lagrangian constraint on one component (online methods update the multiplier once per iteration)."""


class JudgeConfig(Section):
    """An AI judge (``alignkit.judges``): compares two responses in both orders and averages (position
    debiasing)."""

    kind: Literal["hf", "openai", "callable"] = "hf"
    """``hf``: a local causal LM reads the normalised probabilities of "(A)" / "(B)"; ``openai``: any
    OpenAI-compatible endpoint through the ``openai`` client; ``callable``: ``fn(prompts, first, second,
    principles) -> [N] P(first better)``."""
    model: str = "embedded"
    """``hf``: ``embedded``, ``tiny-random``, a local path or hub id; ``openai``: the served model's name."""
    fn: str | None = None
    """``callable``: ``module:function`` or ``path/to/file.py:function`` (imports and runs that code)."""
    base_url: str | None = None
    """``openai``: endpoint base URL (default ``$OPENAI_BASE_URL``)."""
    api_key: str | None = None
    """``openai``: API key (default ``$OPENAI_API_KEY``). Prefer the environment variable to a config file."""
    chain_of_thought: bool = False
    """Ask for reasoning before the verdict; probabilities are then clamped to [0.4, 0.6] (CAI)."""
    cache_dir: str | None = None
    """``openai``: on-disk response cache (default ``$ALIGNKIT_CACHE/judge_cache``)."""
    cache: bool = True
    """``openai``: read and write the response cache (false: always ask the endpoint)."""
    max_concurrency: int = Field(4, gt=0)
    """``openai``: requests in flight at once."""
    timeout_s: float = Field(60.0, gt=0)
    """``openai``: seconds per request before it counts as failed (and is retried)."""
    max_retries: int = Field(5, ge=0)
    """``openai``: retries of a request that failed with 408/409/429/5xx, a timeout or a connection error."""
    retry_base_delay_s: float = Field(0.5, ge=0)
    """``openai``: backoff before retry k is ``retry_base_delay_s * 2**k`` seconds (at most 30; ``Retry-After``
    is honoured)."""
    logprobs: bool = True
    """``openai``: ask for token log-probs (``top_logprobs``) and read P(A), P(B) from them; answers without
    log-probs are parsed from the text ("(A)" / "(B)")."""
    top_logprobs: int = Field(5, ge=1, le=20)
    temperature: float = Field(0.0, ge=0)
    """Sampling temperature of the judge's answer (``hf``: of its chain of thought); 0 is greedy."""
    max_tokens: int = Field(256, gt=0)
    """Tokens a parsed / chain-of-thought answer may use."""
    batch_size: int = Field(8, gt=0)
    """``hf``: comparisons per forward pass."""

    @model_validator(mode="after")
    def _needs(self) -> "JudgeConfig":
        if self.kind == "callable" and ":" not in (self.fn or ""):
            raise ValueError(f"a callable judge needs fn: 'module:function', got {self.fn!r}")
        return self


class RLDataConfig(Section):
    """Prompts for online methods: ``{"prompt", ...extra fields passed to reward functions}``."""

    train: str = ""
    eval: str | None = None
    max_prompt_length: int = Field(256, gt=0)
    """Longer prompts are truncated from the left (counted in the log)."""
    on_error: Literal["raise", "skip"] = "raise"
    system_prompt: str | None = None
    limit: int | None = Field(None, gt=0)
    eval_limit: int | None = Field(None, gt=0)


class PPOSection(Section):
    """PPO as InstructGPT did it (Ouyang et al. 2022; Huang et al. 2024, "The N+ implementation details")."""

    reward_model: str = ""
    """Checkpoint of the trained reward model. May be empty when ``reward.components`` is not (the score is then
    the combined reward only). One with another tokenizer than the policy scores the decoded text."""
    value_model: str | None = None
    """Checkpoint for the value model's backbone, loaded as a 1-label sequence classifier with a fresh head
    initialised like a reward head (a reward-model checkpoint keeps its head); default: the reward model
    (N+ details), which must then share the policy's tokenizer."""
    value_layers: int | None = Field(None, gt=0)
    """Keep only the first N transformer layers of the value backbone: a cheap critic."""
    rollout_batch_size: int = Field(32, gt=0)
    """Prompts sampled per PPO iteration."""
    num_iterations: int = Field(10, gt=0)
    ppo_epochs: int = Field(4, gt=0)
    num_minibatches: int = Field(4, gt=0)
    micro_batch_size: int = Field(8, gt=0)
    kl_coef: float = Field(0.05, ge=0)
    adaptive_kl: bool = False
    kl_target: float = Field(6.0, gt=0)
    kl_horizon: int = Field(10000, gt=0)
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    cliprange: float = Field(0.2, gt=0)
    cliprange_value: float = Field(0.2, gt=0)
    vf_coef: float = Field(0.1, ge=0)
    value_lr: float | None = Field(None, gt=0)
    """Value model learning rate (default: train.lr)."""
    whiten_rewards: bool = False
    samples_per_prompt: int = Field(1, ge=1)
    """Responses drawn per prompt (prompt-major): an iteration holds rollout_batch_size x samples_per_prompt rows."""
    score_baseline: Literal["none", "loo"] = "none"
    """``loo``: subtract from each score the mean score of the OTHER responses to its prompt (RLOO's baseline,
    Ahmadian et al. 2024) before the per-token rewards and GAE. A per-prompt constant, so the policy gradient
    stays unbiased while the prompt-to-prompt spread (which a fresh critic cannot know yet) leaves the
    advantages. Needs ``samples_per_prompt`` >= 2."""
    missing_eos_penalty: float | None = Field(1.0, ge=0)
    """Score minus this for responses that never emit EOS (None: no penalty)."""
    dense_prm: str | None = None
    """A process reward model (``alignkit prm``): its step scores become per-token rewards at each step's last
    token, added to r_t (dense reward; Math-Shepherd step-by-step PPO). docs/prm.md."""
    dense_prm_coef: float = Field(1.0, gt=0)
    """Scale of the dense PRM rewards."""
    save_every: int = Field(0, ge=0)


class OnlineConfig(Section):
    """The sections every online method shares: the policy, its prompts, training, generation and the reward.
    A method's config subclasses it, sets its ``train`` defaults and adds its own section."""

    model: ModelConfig = ModelConfig()
    data: RLDataConfig = RLDataConfig()
    train: TrainConfig = TrainConfig()
    generation: GenerationSection = GenerationSection()
    reward: RewardSection = RewardSection()


class PPOConfig(OnlineConfig):
    train: TrainConfig = TrainConfig(output_dir="runs/ppo", lr=1e-5, scheduler="linear")
    reward: RewardSection = RewardSection()
    """Extra reward components added to the reward model's score (e.g. a format rule)."""
    ppo: PPOSection = PPOSection()


class GRPOSection(Section):
    loss_type: Literal["grpo", "dr_grpo", "dapo"] = "grpo"
    """grpo: per-sequence mean, std-normalised advantages; dr_grpo: no std, sum/constant; dapo: token mean + clip-higher."""
    num_generations: int = Field(8, ge=2)
    prompts_per_iteration: int = Field(8, gt=0)
    num_iterations: int = Field(20, gt=0)
    ppo_epochs: int = Field(1, gt=0)
    micro_batch_size: int = Field(16, gt=0)
    beta: float = Field(0.04, ge=0)
    """k3 KL to the reference in the loss (0 disables and frees the reference)."""
    eps_low: float = Field(0.2, gt=0)
    eps_high: float | None = Field(None, gt=0)
    """Clip-higher upper bound (default: eps_low; DAPO uses 0.28)."""
    scale_rewards: bool | None = None
    """Divide advantages by the group std. Default: True for grpo and dapo, False for dr_grpo (Liu et al. 2025)."""
    drop_equal_groups: bool = False
    """DAPO dynamic sampling: drop groups whose rewards are all equal and sample more prompts to refill."""
    max_refill_rounds: int = Field(3, ge=0)
    overlong_cache: int | None = Field(None, gt=0)
    """DAPO overlong shaping window (tokens before generation.max_new_tokens); None disables."""
    save_every: int = Field(0, ge=0)
    """Checkpoint every N iterations (0: use train.save_every); a checkpoint is always written at the end."""


class GRPOConfig(OnlineConfig):
    train: TrainConfig = TrainConfig(output_dir="runs/grpo", lr=1e-5, scheduler="constant")
    grpo: GRPOSection = GRPOSection()


class RLOOSection(Section):
    num_generations: int = Field(4, ge=2)
    prompts_per_iteration: int = Field(8, gt=0)
    num_iterations: int = Field(20, gt=0)
    ppo_epochs: int = Field(1, gt=0)
    micro_batch_size: int = Field(16, gt=0)
    kl_coef: float = Field(0.05, ge=0)
    """R = score - kl_coef * sum_t (log pi - log pref) (0 disables and frees the reference)."""
    cliprange: float = Field(0.2, gt=0)
    save_every: int = Field(0, ge=0)
    """Checkpoint every N iterations (0: use train.save_every); a checkpoint is always written at the end."""


class RLOOConfig(OnlineConfig):
    train: TrainConfig = TrainConfig(output_dir="runs/rloo", lr=1e-5, scheduler="constant")
    rloo: RLOOSection = RLOOSection()


class ReinforcePPSection(Section):
    """REINFORCE++ (Hu 2025): per-token KL-penalised rewards, returns, advantages normalised over the global batch."""

    baseline: bool = False
    """The REINFORCE++-baseline variant: subtract each group's mean score (needs num_generations >= 2) and put
    the KL in the loss (k3) instead of the reward."""
    num_generations: int = Field(1, gt=0)
    prompts_per_iteration: int = Field(16, gt=0)
    num_iterations: int = Field(20, gt=0)
    ppo_epochs: int = Field(1, gt=0)
    micro_batch_size: int = Field(16, gt=0)
    kl_coef: float = Field(0.01, ge=0)
    """beta: per-token k1 penalty in the reward (plain) or k3 in the loss (baseline); 0 frees the reference."""
    cliprange: float = Field(0.2, gt=0)
    save_every: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _groups(self) -> "ReinforcePPSection":
        if self.baseline and self.num_generations < 2:
            raise ValueError("reinforce_pp.baseline needs reinforce_pp.num_generations >= 2 (the group mean is the "
                             "baseline)")
        return self


class ReinforcePPConfig(OnlineConfig):
    train: TrainConfig = TrainConfig(output_dir="runs/reinforce_pp", lr=1e-5, scheduler="constant")
    reinforce_pp: ReinforcePPSection = ReinforcePPSection()


class BoNSection(Section):
    n: int = Field(4, ge=1)
    gold: RewardSection | None = None
    """Optional second reward used only for evaluation (e.g. the gold VADER score)."""
    output_file: str = "best_of_n.jsonl"
    """Relative to ``output_dir`` (may not climb out of it with ``..``), or an absolute path."""

    @field_validator("output_file")
    @classmethod
    def _output_file(cls, v: str) -> str:
        return check_path_inside_run(v, "bon.output_file")


class BoNConfig(Section):
    """Best-of-n sampling: sample n per prompt, keep the best by ``reward``."""

    model: ModelConfig = ModelConfig()
    data: RLDataConfig = RLDataConfig()
    generation: GenerationSection = GenerationSection()
    reward: RewardSection = RewardSection()
    bon: BoNSection = BoNSection()
    output_dir: str = "runs/bon"
    seed: int = 0

    @field_validator("output_dir")
    @classmethod
    def _output_dir(cls, v: str) -> str:
        return check_output_dir_value(v, "output_dir")


class RejectionSamplingSection(Section):
    n: int = Field(4, ge=1)
    rounds: int = Field(2, gt=0)
    prompts_per_round: int | None = Field(None, gt=0)


class RejectionSamplingConfig(OnlineConfig):
    train: TrainConfig = TrainConfig(output_dir="runs/rs", lr=2e-5)
    rs: RejectionSamplingSection = RejectionSamplingSection()


class OnlineDPOSection(Section):
    rounds: int = Field(3, gt=0)
    prompts_per_round: int = Field(32, gt=0)
    num_generations: int = Field(2, ge=2)
    """Samples per prompt; the best and worst by reward form the pair."""
    beta: float = Field(0.1, gt=0)
    loss: Literal["dpo", "ipo"] = "dpo"
    steps_per_round: int = Field(4, gt=0)


class OnlineDPOConfig(OnlineConfig):
    train: TrainConfig = TrainConfig(output_dir="runs/online_dpo", lr=5e-6, scheduler="constant")
    online_dpo: OnlineDPOSection = OnlineDPOSection()


# ---------------------------------------------------------------- Constitutional AI (cai-sl, cai-rl, cai)
class CAISection(Section):
    """SL-CAI (Bai et al. 2022, sec. 3): answer red-team prompts, critique and revise ``rounds`` times under randomly
    sampled principles, fine-tune on (prompt, final revision) mixed with helpfulness data."""

    constitution: str | None = None
    """A constitution YAML file (see docs/cai.md); default: alignkit's (``alignkit/data/constitutions/default.yaml``)."""
    harmful_categories: list[str] = ["harmbench", "dna_malicious_uses", "dna_information_hazard", "dna_discrimination"]
    """Red-team prompt categories (``alignkit.data.safety.HARMFUL_CATEGORIES``): train split for training, test split
    for the report."""
    n_prompts: int = Field(64, gt=0)
    """Red-team training prompts answered, critiqued and revised."""
    rounds: int = Field(1, gt=0)
    """Critique -> revision rounds per prompt (R); each samples a principle."""
    few_shot: int = Field(2, ge=0)
    """Few-shot critique/revision examples from the constitution shown before each request (at most as many as it has)."""
    helpful_ratio: float = Field(1.0, ge=0)
    """Helpfulness examples per red-team example in the SFT mix (responses generated by the model itself, as in the
    paper); 0 trains on revisions only."""
    answer_max_new_tokens: int = Field(64, gt=0)
    critique_max_new_tokens: int = Field(48, gt=0)
    revision_max_new_tokens: int = Field(64, gt=0)
    max_prompt_length: int = Field(768, gt=0)
    """Critique/revision prompts (few-shot examples + the conversation so far) longer than this keep their last tokens."""
    lr: float = Field(2e-4, gt=0)
    epochs: int = Field(1, gt=0)


class CAIRLSection(Section):
    """RL-CAI (Bai et al. 2022, sec. 4): two responses per prompt from the SL-CAI model, a judge picks under a sampled
    pairwise principle (soft label = debiased P(A better)); a preference model trains on the soft labels; then RL."""

    sl_model: str | None = None
    """The SL-CAI policy; default: ``<output_dir>/sl/model`` (what ``alignkit cai-sl`` with this config wrote)."""
    n_prompts: int = Field(64, gt=0)
    helpful_fraction: float = Field(0.5, ge=0, le=1)
    """Share of the RL prompts taken from the helpfulness set (the rest are red-team prompts)."""
    max_new_tokens: int = Field(48, gt=0)
    temperature: float = Field(1.0, gt=0)
    rl_method: Literal["ppo", "dpo"] = "dpo"
    """``ppo``: PPO against the preference model (the paper); ``dpo``: DPO on the judged pairs, chosen = the judge's pick."""
    preference_model: str = "minilm"
    """Backbone of the preference (reward) model: ``minilm`` (fast on CPU; scores the decoded text), the SL model
    (``sl``), or a path / hub id."""
    rm_lr: float = Field(1e-4, gt=0)
    rm_epochs: int = Field(2, gt=0)
    dpo_beta: float = Field(0.1, gt=0)
    dpo_lr: float = Field(5e-5, gt=0)
    dpo_epochs: int = Field(1, gt=0)
    ppo_iterations: int = Field(4, gt=0)
    ppo_rollout_batch_size: int = Field(16, gt=0)
    ppo_lr: float = Field(1e-4, gt=0)
    ppo_kl_coef: float = Field(0.05, ge=0)
    value_layers: int = Field(4, gt=0)
    """PPO critic: the SL model's first N layers + a value head."""


class CAIEvalSection(Section):
    """The before / after report: refusal rate on held-out harmful prompts, over-refusal on held-out benign
    look-alikes (both by category), helpfulness win rate against the starting model (judge, both orders)."""

    enabled: bool = True
    n_harmful: int = Field(40, gt=0)
    n_benign: int = Field(40, gt=0)
    n_helpful: int = Field(15, gt=0)
    max_new_tokens: int = Field(48, gt=0)
    judge_refusals: bool = True
    """Also detect refusals with the judge (``alignkit.eval.refusal.judge_refusals``) next to the rule set."""


class CAIConfig(Section):
    """Constitutional AI: ``alignkit cai-sl``, ``alignkit cai-rl`` (reads ``<output_dir>/sl``) and ``alignkit cai``
    (both, then the report) share this config."""

    output_dir: str = "runs/cai"
    seed: int = 0
    model: ModelConfig = ModelConfig()
    """The starting policy (SL-CAI fine-tunes it; the report compares against it). ``model.lora`` applies to every
    training stage of the policy."""
    judge: JudgeConfig = JudgeConfig()
    """The feedback model of RL-CAI, the judge of the win rate and of judge-detected refusals."""
    cai: CAISection = CAISection()
    cai_rl: CAIRLSection = CAIRLSection()
    eval: CAIEvalSection = CAIEvalSection()
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature of SL-CAI's answers, critiques and revisions and of the evaluation."""
    generation_batch_size: int = Field(32, gt=0)
    batch_size: int = Field(8, gt=0)
    """Examples per micro-batch of every training stage."""
    max_steps: int | None = Field(None, gt=0)
    """Cap every training stage at this many optimizer steps (smoke runs)."""
    max_length: int = Field(384, gt=0)
    """Prompt + response tokens of the training stages."""
    mixed_precision: YamlNo[Literal["auto", "no", "bf16"]] = "no"


    @field_validator("output_dir")
    @classmethod
    def _output_dir(cls, v: str) -> str:
        return check_output_dir_value(v, "output_dir")


# ---------------------------------------------------------------- human preference collection: `alignkit sample`
class SampleSection(Section):
    k: int = Field(4, ge=1)
    """Responses sampled per prompt (the labelling app compares them: K-choose-2 pairs, a ranking, or K binary items)."""
    output_file: str = "candidates.jsonl"
    """The candidates file `alignkit label create` reads; relative to ``output_dir`` (no ``..``) or absolute."""
    model_label: str | None = None
    """The name written in each record's ``models`` (never shown to annotators); default: ``model.name_or_path``."""

    @field_validator("output_file")
    @classmethod
    def _output_file(cls, v: str) -> str:
        return check_path_inside_run(v, "sample.output_file")


class SampleConfig(Section):
    """Sample K responses per prompt from a policy and write a candidates file for `alignkit label create`."""

    model: ModelConfig = ModelConfig()
    data: RLDataConfig = RLDataConfig()
    generation: GenerationSection = GenerationSection()
    sample: SampleSection = SampleSection()
    output_dir: str = "runs/sample"
    seed: int = 0


# ---------------------------------------------------------------- AI judges and the OpenAI-compatible server (issue 9)
class JudgePairsSection(Section):
    path: str = "builtin:hhh"
    """Preference pairs ``{"prompt", "chosen", "rejected"}`` as text (``chosen`` = the human label): a .jsonl /
    .json / .parquet / .csv file or ``builtin:hhh``; an optional ``subset`` / ``category`` field groups the report.
    Default: BIG-bench HHH (221 pairs over both splits)."""
    split: Literal["all", "train", "test"] = "all"
    """Split of a built-in dataset (``all``: train + test); a file is read whole."""
    limit: int | None = Field(None, gt=0)
    """Judge only the first N pairs (a smoke run)."""


class JudgeRunConfig(Section):
    """``alignkit judge``: the judge's agreement with human preference labels (the HHH spot-check)."""

    judge: JudgeConfig = JudgeConfig()
    data: JudgePairsSection = JudgePairsSection()
    principle: str | None = None
    """The judging question (default: "Which response is more helpful, honest and harmless?")."""
    self_consistency_repeats: int = Field(0, ge=0)
    """Also ask every pair this many more times as independent draws and report the agreement (0: skip; a
    judge that reads probabilities without sampling is consistent by construction)."""
    output_dir: str = "runs/judge"

    @field_validator("output_dir")
    @classmethod
    def _output_dir(cls, v: str) -> str:
        return check_output_dir_value(v, "output_dir")


class ServeSection(Section):
    host: str = "127.0.0.1"
    """Interface to listen on. The default accepts local connections only; 0.0.0.0 exposes the model to the
    network (set ``api_key`` then)."""
    port: int = Field(8000, ge=0, le=65535)
    api_key: str | None = None
    """Clients must send ``Authorization: Bearer <api_key>`` (default ``$ALIGNKIT_API_KEY``; unset: no key)."""
    served_model_name: str | None = None
    """The model id clients ask for and ``/v1/models`` lists (default: ``model.name_or_path``)."""
    max_body_bytes: int = Field(1_000_000, gt=0)
    """Larger request bodies get 413."""
    max_messages: int = Field(64, gt=0)
    max_tokens: int = Field(512, gt=0)
    """The most completion tokens a request may ask for (``max_tokens`` / ``max_completion_tokens``)."""
    default_max_tokens: int = Field(128, gt=0)
    """Completion tokens when a request names none."""
    max_queue: int = Field(16, gt=0)
    """Requests waiting or running at once; more get 429 (the ``openai`` client retries those itself)."""
    max_batch_size: int = Field(8, gt=0)
    """Non-streaming requests with the same sampling settings that arrive together share one generate() call."""
    batch_wait_ms: float = Field(10.0, ge=0)
    """How long the first request of a batch waits for companions."""


class ServeConfig(Section):
    """``alignkit serve``: an OpenAI-compatible chat server for a local checkpoint."""

    model: ModelConfig = ModelConfig()
    serve: ServeSection = ServeSection()
    seed: int = 0


# ---------------------------------------------------------------- evaluation: alignkit eval / w2s (issue 11)
class EvalPolicy(Section):
    name: str
    path: str
    """A checkpoint directory (``<run>/model``), a hub id, or ``smollm2-135m-instruct`` / ``embedded``."""
    trained_from: str | None = "baseline"
    """The policy this one was trained from, the "before" of its before/after warnings (length hacking, entropy
    drop, proxy up while gold down): ``baseline`` (default), another policy's name, or null for a policy that was
    not trained from any of them (e.g. the base model when the baseline is its SFT): then only the absolute checks
    (entropy floor, distinct-2, repetition) run."""


class EvalRefusalSection(Section):
    prompts: str | None = None
    """``builtin:safety`` (the held-out red-team requests and benign look-alikes) or a JSONL of ``{"prompt",
    "category", "harmful": bool}``; none: skipped."""
    detector: str | None = None
    """``module:function`` ``is_refusal(text) -> bool`` (default: ``alignkit.eval.refusal:is_refusal``, the
    documented rule set)."""
    per_side: int | None = Field(None, gt=0)
    """Use at most this many harmful and this many benign prompts (a deterministic spread over categories)."""
    max_new_tokens: int = Field(40, gt=0)
    """Greedy tokens per reply: the rule detector reads the first 160 characters (about 35 tokens)."""


class EvalConfig(Section):
    """``alignkit eval``: sample every policy once on a prompt set, score with gold / reward model / judge; win rates
    against a baseline with bootstrap CIs, a Bradley–Terry ranking, diagnostics, sycophancy, alignment tax."""

    output_dir: str = "runs/eval"
    seed: int = 0
    policies: list[EvalPolicy] = []
    baseline: str | None = None
    """Name of the policy the others are compared with (default: the first)."""
    reference: str | None = None
    """Name of the policy that is pi_ref for the KL (default: the baseline)."""
    prompts: str = "builtin:sentiment"
    """A prompt file (JSONL ``{"prompt", ...}``) or ``builtin:<name>`` (its ``split``)."""
    split: Literal["train", "test"] = "test"
    """Split of a ``builtin:`` prompt set."""
    n_prompts: int | None = Field(100, gt=0)
    max_prompt_length: int = Field(256, gt=0)
    system_prompt: str | None = None
    generation: GenerationSection = GenerationSection(max_new_tokens=48, batch_size=64)
    greedy: bool = False
    """Greedy decoding instead of sampling at ``generation.temperature``."""
    kl_estimator: Literal["exact", "k1"] = "exact"
    """The KL diagnostic per response: ``exact`` sums KL(pi || pi_ref) over the whole vocabulary at each response
    prefix (about 5x smaller standard error; needs plain linear LM heads, else k1), ``k1`` sums the sampled
    tokens' log pi - log pi_ref (``eval.policy.sequence_kl``)."""
    gold: str | None = "vader"
    """``vader``, or ``file.py:function`` / ``module:function`` mapping response texts -> [float]; none: no gold."""
    reward_model: str | None = None
    """A reward-model directory (``alignkit rm`` output); its score is the proxy."""
    judge: JudgeConfig | None = None
    bootstrap: int = Field(1000, gt=0)
    """Bootstrap resamples (prompts) of every win-rate CI (Bradley–Terry and LC use a fifth of them)."""
    sycophancy: bool = True
    sycophancy_arithmetic: int = Field(24, ge=0)
    """Arithmetic items of the sycophancy probes (3 greedy replies each; docs/eval.md gives the CI widths)."""
    sycophancy_facts: int | None = Field(24, ge=0)
    """Fact items of the sycophancy probes: N of the 52 written ones, spread evenly (None: all)."""
    tax: bool = True
    tax_task_items: int = Field(32, ge=0)
    """Held-out reasoning_gym arithmetic questions (0: skip)."""
    tax_hhh: bool = True
    """HHH multiple-choice accuracy by log-prob (BIG-bench hhh_alignment test split)."""
    tax_max_length: int = Field(256, gt=0)
    """Tokens of prompt + reply scored per HHH choice (longer prompts lose their beginning)."""
    probe_max_new_tokens: int = Field(24, gt=0)
    """Tokens per answer in the sycophancy and task probes (short answers)."""
    probe_precision: YamlNo[Literal["auto", "no", "bf16"]] = "auto"
    """The probes' (sycophancy, refusal, tax) model calls under bf16 autocast: ``auto`` = where bf16 matmuls are
    native (AVX512-BF16 / AMX CPUs, bf16 GPUs; about 1.5x faster), ``no`` = fp32. Sampling for the win rates and
    the KL / entropy diagnostics always run in fp32."""
    probe_cache: bool = True
    """Reuse a policy's probe results (sycophancy, refusal, tax) keyed by its weights and the probe settings
    (``eval.probes``); false: always recompute."""
    probe_cache_dir: str | None = None
    """Where the probe cache lives (default ``$ALIGNKIT_CACHE/eval_probes``)."""
    refusal: EvalRefusalSection = EvalRefusalSection()
    show_samples: int = Field(5, ge=0)


    @model_validator(mode="after")
    def _policies(self) -> "EvalConfig":
        names = [p.name for p in self.policies]  # none given: the command says so (defaults must construct)
        if len(set(names)) != len(names):
            raise ValueError(f"policies: names must be unique, got {names}")
        for key in ("baseline", "reference"):
            v = getattr(self, key)
            if v is not None and v not in names:
                raise ValueError(f"{key}: {v!r} is not one of the policies {names}")
        for p in self.policies:
            if p.trained_from not in (None, "baseline", *names) or p.trained_from == p.name:
                raise ValueError(f"policies: {p.name}: trained_from {p.trained_from!r} must be 'baseline', null or "
                                 f"another policy's name {[n for n in names if n != p.name]}")
        return self


class ReportConfig(Section):
    """``alignkit report RUN_DIR...``: one self-contained HTML page comparing runs."""

    runs: list[str] = []
    """Run directories (also given as positional arguments)."""
    output: str = "report.html"
    title: str = "alignkit report"


class W2SConfig(Section):
    """``alignkit w2s``: weak-to-strong generalisation (Burns et al. 2023) on a binary task with gold labels, with
    linear probes on frozen features (their appendix's linear-probing setting; one forward pass per text)."""

    output_dir: str = "runs/w2s"
    task: Literal["sentiment", "hhh"] = "sentiment"
    """``sentiment``: is a reply positive (gold: VADER compound > 0; texts: BIG-bench HHH replies and the built-in
    SFT demonstrations)? ``hhh``: which of two replies is better (BIG-bench HHH gold labels)."""
    strong_model: str = "smollm2-135m-instruct"
    weak_layers: int = Field(0, ge=0)
    """The weak supervisor reads the hidden state after the first N layers of the strong model (a few-layer cut;
    0 = the token embeddings alone, a bag-of-embeddings model)."""
    strong_layer: int | None = Field(16, ge=1)
    """The strong model's feature: the hidden state after this many layers (a middle layer probes better than the
    last on the 30-layer embedded model, docs/eval.md); null: the last (normed) hidden state."""
    n_train: int = Field(250, gt=0)
    """Examples of each training half: the weak model trains on one (ground truth), the students on the other
    (weak labels; the ceiling on its ground truth). Capped by the data available (sentiment: 207, the whole pool
    of 414 texts; hhh: 88)."""
    n_test: int = Field(100, gt=0)
    seeds: list[int] = [0, 1, 2, 3, 4]
    steps: int = Field(300, gt=0)
    """Full-batch Adam steps of each probe."""
    lr: float = Field(1e-2, gt=0)
    weight_decay: float = Field(1.0, ge=0)
    """Adam's L2 penalty on the probe (features are standardised; ~200 examples of 576 features need a strong one)."""
    max_length: int = Field(128, gt=0)
    batch_size: int = Field(16, gt=0)
    """Texts per forward pass of the feature extraction."""
    aux_alpha: float = Field(0.75, ge=0, le=1)
    """Weight α of the auxiliary confidence loss after the warm-up (Burns et al. use 0.75 for large gaps)."""
    aux_warmup_frac: float = Field(0.2, ge=0, le=1)
    """Share of the steps over which α rises linearly from 0."""


# ---------------------------------------------------------------- process reward models (alignkit prm, prm-eval)
class StepwiseDataConfig(DataConfig):
    step_separator: str = "\n"
    """Text ending each step; the PRM reads a step's score at the separator's last token."""


class PRMConfig(Section):
    """``alignkit prm``: a token-classifier process reward model on stepwise data ``{"prompt", "steps",
    "labels"}``, BCE at each step separator (Lightman et al. 2023; Math-Shepherd)."""

    model: ModelConfig = ModelConfig()
    data: StepwiseDataConfig = StepwiseDataConfig()
    train: TrainConfig = TrainConfig(output_dir="runs/prm", lr=1e-5)


class PRMEvalConfig(Section):
    """``alignkit prm-eval``: accuracy against n of PRM best-of-n, outcome-RM best-of-n and majority vote on
    held-out chained-arithmetic problems; the PRM and ORM are trained on the policy's own verified samples."""

    model: ModelConfig = ModelConfig(name_or_path="smollm2-135m-instruct")
    """The policy that samples solutions; the PRM and ORM start from the same checkpoint."""
    output_dir: str = "runs/prm_eval"
    seed: int = 0
    n_ops: int = Field(2, gt=0)
    """Operations per problem."""
    max_operand: int = Field(9, gt=0)
    n_train_problems: int = Field(40, gt=0)
    train_samples: int = Field(8, gt=0)
    """Solutions sampled per training problem; the verifier labels their steps (PRM) and outcomes (ORM)."""
    labels: Literal["verifier", "mc_hard", "mc_soft"] = "verifier"
    """Step labels: the rule verifier, or Math-Shepherd Monte-Carlo rollouts (hard: any / soft: fraction right)."""
    mc_rollouts: int = Field(4, gt=0)
    """Completions per step prefix for Monte-Carlo labels."""
    n_test_problems: int = Field(40, gt=0)
    ns: list[int] = [1, 2, 4, 8, 16]
    """Best-of-n sizes; max(ns) solutions are sampled per test problem and every n is estimated from them."""
    max_new_tokens: int = Field(64, gt=0)
    temperature: float = Field(0.7, gt=0)
    generation_batch_size: int = Field(64, gt=0)
    """Rows (problem x sample) per generate() call."""
    prm_aggregations: list[Literal["min", "product", "last"]] = ["min", "product", "last"]
    train: TrainConfig = TrainConfig(output_dir="runs/prm_eval/prm", lr=1e-4, epochs=2, batch_size=8, scheduler="constant")
    """Training settings of the PRM and the ORM (their output_dir is replaced by ``<output_dir>/prm`` and ``/orm``)."""
    lora: LoraConfig = LoraConfig(enabled=True, r=16, alpha=32)
    beam_width: int = Field(0, ge=0)
    """> 0: also run PRM-guided step-level beam search with this many beams on the test problems."""
    beam_expand: int = Field(4, gt=0)
    """Step candidates sampled per beam in beam search."""


# ---------------------------------------------------------------- reward models that resist hacking (helper ens):
# rm-eval and the over-optimisation lab (docs/reward_models.md)
class RMEvalConfig(Section):
    """Evaluate a reward model or ensemble on held-out preference pairs (accuracy by category, calibration,
    length correlation, members' disagreement)."""

    model: str = ""
    """A reward model (``alignkit rm``'s ``<output_dir>/model``) or an ensemble directory (with ``ensemble.json``)."""
    data: str = ""
    """Preference pairs (JSONL/Parquet/datasets dir, or builtin:hhh, read from its test split); a ``category`` (or
    ``subset``) field gives per-category accuracy and picks a multi-objective model's head."""
    max_length: int = Field(512, gt=0)
    max_prompt_length: int | None = Field(None, gt=0)
    batch_size: int = Field(16, gt=0)
    n_bins: int = Field(10, gt=1)
    """Equal-width bins of the expected calibration error and the reliability plot."""
    output_dir: str = "runs/rm_eval"

    @field_validator("output_dir")
    @classmethod
    def _output_dir(cls, v: str) -> str:
        return check_output_dir_value(v, "output_dir")


class OverOptConfig(Section):
    """The over-optimisation lab (Gao, Schulman & Hilton 2023, in miniature) on the quickstart's sentiment task with
    VADER as gold: proxies trained on gold-labelled pairs of several sizes plus an ensemble; best-of-n and PPO against
    each; gold and proxy against sqrt(KL) with the fitted scaling laws. The default is sized (by estimate) for about
    15 minutes on a 2-core CPU; raise the counts on a GPU."""

    output_dir: str = "runs/overopt"
    seed: int = 0
    policy: str = "smollm2-135m-instruct"
    """The initial policy (and the reference of every KL)."""
    reward_model: str = "minilm"
    """Backbone of every proxy reward model."""
    gold: str = "vader"
    """``vader``, or ``file.py:function`` / ``module:function`` taking response texts, returning one float each."""
    n_collect_prompts: int = Field(40, gt=0)
    """Training prompts sampled for the gold-labelled pair pool (of the 198 sentiment train prompts)."""
    samples_per_prompt: int = Field(8, ge=2)
    """Policy samples per collection prompt; the pool is every K-choose-2 pair labelled by gold (ties dropped)."""
    label_sizes: list[int] = [250, 1000]
    """One proxy per size: trained on that many gold-labelled pairs (nested random subsets of the pool)."""
    ensemble_size: int = Field(3, ge=0)
    """Members of the ensemble proxy (0: none), trained on ``ensemble_labels`` pairs, each on its own seed and
    bootstrap resample."""
    ensemble_labels: int | None = Field(None, gt=0)
    """Default: the largest of ``label_sizes``."""
    ensemble_aggregate: Literal["mean", "min", "uwo", "lcb"] = "lcb"
    ensemble_lambda: float = Field(1.0, ge=0)
    rm_epochs: int = Field(2, gt=0)
    rm_lr: float = Field(1e-4, gt=0)
    n_eval_prompts: int = Field(24, gt=0)
    """Held-out prompts (of the 42 sentiment test prompts) for best-of-n and the RL checkpoints."""
    bon_n: int = Field(16, ge=2)
    """N samples per held-out prompt: best-of-n for n = 1..N by the unbiased estimator."""
    rl_proxies: list[str] | None = None
    """Proxies optimised by PPO: ``rm_<size>`` or ``ensemble``; default the largest single proxy and the ensemble."""
    rl_iterations: int = Field(8, ge=0)
    rl_eval_every: int = Field(2, gt=0)
    """A PPO checkpoint every N iterations is evaluated (gold, proxy, KL measured from its samples)."""
    rl_eval_samples: int = Field(2, gt=0)
    """Samples per held-out prompt at each RL checkpoint (the KL is measured on all of them)."""
    ppo_rollout_batch_size: int = Field(16, gt=0)
    ppo_lr: float = Field(5e-4, gt=0)
    ppo_kl_coef: float = Field(0.05, ge=0)
    lora_layers: int = Field(6, gt=0)
    lora_r: int = Field(16, gt=0)
    value_layers: int = Field(4, gt=0)
    max_new_tokens: int = Field(24, gt=0)
    generation_batch_size: int = Field(128, gt=0)
    batch_size: int = Field(8, gt=0)
    max_steps: int | None = Field(None, gt=0)
    """Cap every reward-model training at this many optimizer steps (smoke runs)."""
    mixed_precision: YamlNo[Literal["auto", "no", "bf16"]] = "auto"


    @field_validator("output_dir")
    @classmethod
    def _output_dir(cls, v: str) -> str:
        return check_output_dir_value(v, "output_dir")

    def proxy_names(self) -> list[str]:
        return [f"rm_{n}" for n in self.label_sizes] + (["ensemble"] if self.ensemble_size > 1 else [])

    def rl_proxy_names(self) -> list[str]:
        if self.rl_proxies is not None:
            return list(self.rl_proxies)
        return [f"rm_{max(self.label_sizes)}"] + (["ensemble"] if self.ensemble_size > 1 else [])

    @model_validator(mode="after")
    def _names(self) -> "OverOptConfig":
        if not self.label_sizes or any(n < 2 for n in self.label_sizes) or len(set(self.label_sizes)) != len(
                self.label_sizes):
            raise ValueError(f"label_sizes must be distinct numbers >= 2, got {self.label_sizes}")
        if self.ensemble_size == 1:
            raise ValueError("ensemble_size must be 0 (no ensemble) or >= 2")
        unknown = [n for n in self.rl_proxy_names() if n not in self.proxy_names()]
        if unknown:
            raise ValueError(f"rl_proxies {unknown} are not proxies of this lab; choose from {self.proxy_names()}")
        return self


class QuickstartConfig(Section):
    """The whole pipeline on the embedded model, sized for a 2-core laptop CPU (about 12 minutes)."""

    output_dir: str = "runs/quickstart"
    seed: int = 0
    policy: str = "smollm2-135m-instruct"
    reward_model: str = "minilm"
    """Backbone of the sentiment reward model (MiniLM encoder: fast on CPU, good at sentiment)."""
    hhh_reward_model: str = "minilm"
    """Backbone of the reward model trained on the BIG-bench HHH pairs."""
    lora_layers: int = Field(6, gt=0)
    """LoRA on the last N layers of the policy only (backward stops early: ~3x faster on CPU)."""
    lora_r: int = Field(16, gt=0)
    n_train_prompts: int = Field(80, gt=0)
    samples_per_prompt: int = Field(8, ge=2)
    """Responses per training prompt; the annotators compare all K-choose-2 pairs (the reward model trains on all)."""
    n_eval_prompts: int = Field(42, gt=0)
    eval_samples: int = Field(16, gt=0)
    """Samples per held-out prompt: the gains over SFT are paired by prompt and averaged over these (16: s.e. ~0.02
    gold on the 42 prompts; 4 gave ~0.037, too wide to tell a gain of 0.08 from none)."""
    rm_test_samples: int = Field(4, ge=2)
    """The reward model's held-out pairs: all pairs among the first N SFT samples of each held-out prompt, labelled
    by gold."""
    kl_samples: int = Field(2, gt=0)
    """KL to the SFT reference is estimated on this many of each held-out prompt's samples (fp32, 2 forwards each;
    the exact next-token KL per prefix, so 2 give a s.e. of ~0.015 nats)."""
    bon_n: int = Field(4, ge=1)
    """Best-of-n by the proxy reward model among this many SFT samples per held-out prompt."""
    max_new_tokens: int = Field(24, gt=0)
    generation_batch_size: int = Field(128, gt=0)
    """Rows (prompt x sample) per generate() call when the quickstart samples or evaluates."""
    gold: str = "vader"
    """The gold reward the simulated annotators and the report use: ``vader`` (VADER sentiment), or your own
    ``file.py:function`` / ``module:function`` taking a list of response texts, returning one float each."""
    annotator_agreement: float = Field(0.72, gt=0.5, lt=1.0)
    """Target agreement of the simulated annotator pool with the gold (VADER) preference."""
    n_annotators: int = Field(5, gt=0)
    votes_per_pair: int = Field(3, gt=0)
    """Distinct annotators who label each pair (odd); the label is their majority, like crowd-sourced preference
    data. Each annotator alone agrees with gold about ``annotator_agreement`` of the time."""
    sft_epochs: int = Field(1, gt=0)
    sft_lr: float = Field(3e-4, gt=0)
    rm_epochs: int = Field(2, gt=0)
    rm_lr: float = Field(1e-4, gt=0)
    hhh_epochs: int = Field(2, gt=0)
    hhh_lr: float = Field(3e-4, gt=0)
    dpo_pairs_per_prompt: int = Field(2, gt=0)
    """DPO pairs per prompt, best vs worst by the annotators' votes (1st-last, 2nd-2nd last, ...)."""
    dpo_epochs: int = Field(2, gt=0)
    dpo_lr: float = Field(1e-3, gt=0)
    dpo_beta: float = Field(0.1, gt=0)
    ppo_iterations: int = Field(9, ge=0)
    """PPO iterations (0 skips PPO); each samples ppo_rollout_batch_size training prompts x ppo_samples_per_prompt."""
    ppo_rollout_batch_size: int = Field(16, gt=0)
    ppo_samples_per_prompt: int = Field(4, ge=1)
    """Responses per prompt; with 2 or more each score is taken relative to its prompt's other responses
    (``ppo.score_baseline: loo``)."""
    ppo_epochs: int = Field(2, gt=0)
    """Passes over each rollout batch. Within the CPU budget, fresh rollouts buy more than reuse: 9 iterations x 2
    epochs beat 5 x 4 on gold at a lower KL (README, "What made PPO work": benchmarks/quickstart_ppo.py)."""
    ppo_lr: float = Field(5e-4, gt=0)
    ppo_kl_coef: float = Field(0.5, ge=0)
    value_layers: int = Field(4, gt=0)
    """PPO critic: the SFT backbone's first N layers + a value head."""
    value_lr: float = Field(3e-4, gt=0)
    mixed_precision: YamlNo[Literal["auto", "no", "bf16"]] = "auto"
    """Autocast for every training stage and for sampling. ``auto``: bf16 where the hardware computes it natively (a
    CUDA GPU with bf16, a CPU with AVX512-BF16/AMX: ~2-3x faster), else fp32 (a CPU without it emulates bf16 ~20x
    slower). The KL estimates of the report use fp32 log-probs."""

    batch_size: int = Field(8, gt=0)
    max_steps: int | None = Field(None, gt=0)
    """Cap every training stage at this many optimizer steps (for smoke runs)."""
    show_samples: int = Field(3, ge=0)
