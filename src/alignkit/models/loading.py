"""Load the policy, reference, reward and value models; save them back.

- Everything goes through ``from_pretrained``: a user's local path or hub id, or the
  embedded SmolLM2 (``smollm2-135m-instruct``), resolved to its converted cache.
- Dropout is switched off everywhere (REFERENCES, PPO: ratio 1 on the first minibatch needs it).
- pad != eos: a tokenizer whose pad is missing or equals eos gets a distinct pad token.
- Reward model: ``AutoModelForSequenceClassification`` with one label; a fresh head is
  initialised N(0, 1/sqrt(d+1)), bias 0 (Stiennon et al. 2020).
- Under LoRA the reference model is the policy with adapters disabled (no second copy).
"""

from __future__ import annotations

import contextlib
import copy
import math
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
)

from alignkit.config import LoraConfig, ModelConfig
from alignkit.io_utils import atomic_save_dir

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    pass


def resolve_path(name_or_path: str) -> str:
    from alignkit.models.embedded import resolve_model_path

    return resolve_model_path(name_or_path)


def _wrap_load(fn, name_or_path: str, what: str):
    from safetensors import SafetensorError, safe_open

    try:
        return fn()
    except SafetensorError as e:  # a corrupt or truncated weights file: name it (the library's message does not)
        folder = Path(resolve_path(name_or_path))
        bad = []
        for file in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
            try:
                with safe_open(str(file), framework="pt"):
                    pass
            except SafetensorError as file_error:
                bad.append(f"{file} ({file_error})")
        files = "; ".join(bad) or f"a .safetensors file under {folder} ({e})"
        raise ModelLoadError(
            f"could not load {what} from {name_or_path!r}: the weights file is corrupt or truncated: {files}. "
            "Copy or save the model again (an interrupted download or copy leaves such a file)"
        ) from None
    except (OSError, ValueError) as e:
        local = Path(name_or_path).exists()
        hint = (
            f"{name_or_path!r} is a local path but could not be read as a {what}: {e}"
            if local
            else f"{name_or_path!r} is not a local directory, and loading it from the Hugging Face hub failed "
            f"(offline, or no such repo). Give a local path, 'smollm2-135m-instruct' for the embedded model, or "
            f"'tiny-random' for a tiny random model that smoke-tests a config in seconds. "
            f"Cause: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        )
        raise ModelLoadError(f"could not load {what}: {hint}") from None


def load_tokenizer(name_or_path: str, padding_side: str = "right"):
    path = resolve_path(name_or_path)
    tok = _wrap_load(lambda: AutoTokenizer.from_pretrained(path), name_or_path, "tokenizer")
    if tok.eos_token is None:
        # Encoders (BERT/MiniLM) have no EOS; their [SEP] ends a sequence and plays that role.
        if getattr(tok, "sep_token", None) is None:
            raise ModelLoadError(f"tokenizer of {name_or_path!r} has no eos_token (nor sep_token); "
                                 f"set eos_token in its tokenizer_config.json")
        tok.eos_token = tok.sep_token
    if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        # REFERENCES (N+ details): pad must differ from eos, or EOS gets masked out with the padding.
        if tok.unk_token is not None and tok.unk_token_id != tok.eos_token_id:
            tok.pad_token = tok.unk_token
        else:
            tok.add_special_tokens({"pad_token": "<|pad|>"})
    tok.padding_side = padding_side
    return tok


def disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    cfg = getattr(model, "config", None)
    for attr in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop",
                 "hidden_dropout_prob", "attention_probs_dropout_prob"):
        if cfg is not None and isinstance(getattr(cfg, attr, None), float):
            setattr(cfg, attr, 0.0)


def _fit_vocab(model, tokenizer) -> None:
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.pad_token_id = tokenizer.pad_token_id
        gen.eos_token_id = tokenizer.eos_token_id


def apply_lora(model, lora: LoraConfig, task_type: str = "CAUSAL_LM"):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        layers_to_transform=lora.layers_to_transform,
        task_type=task_type,
    )
    return get_peft_model(model, peft_cfg)


def _extra_kwargs(cfg: ModelConfig) -> dict:
    return {} if cfg.num_hidden_layers is None else {"num_hidden_layers": cfg.num_hidden_layers}


def load_policy(cfg: ModelConfig, tokenizer, trainable: bool = True):
    """Causal LM, dropout off, LoRA applied if ``cfg.lora.enabled`` (and ``trainable``)."""
    path = resolve_path(cfg.name_or_path)
    model = _wrap_load(
        lambda: AutoModelForCausalLM.from_pretrained(
            path, dtype=DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code, **_extra_kwargs(cfg)
        ),
        cfg.name_or_path,
        "causal language model",
    )
    _fit_vocab(model, tokenizer)
    disable_dropout(model)
    if cfg.gradient_checkpointing and trainable:
        model.gradient_checkpointing_enable()
    if not trainable:
        return freeze(model)
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
    elif cfg.freeze_embeddings:
        model.get_input_embeddings().requires_grad_(False)
    return model


def freeze(model):
    model.eval()
    model.requires_grad_(False)
    return model


def load_reference(cfg: ModelConfig, tokenizer, name_or_path: str | None = None):
    """A frozen copy (only when not using LoRA and reference log-probs are not precomputed)."""
    ref_cfg = cfg if name_or_path is None else cfg.model_copy(update={"name_or_path": name_or_path})
    return load_policy(ref_cfg, tokenizer, trainable=False)


def copy_frozen(model):
    return freeze(copy.deepcopy(model))


def is_peft(model) -> bool:
    """Adapters (LoRA) on frozen base weights: a peft ``PeftModel``, a transformers model with adapters loaded
    (``load_adapter``), or a container that declares its policy's (both carry ``peft_config``). Its trainable
    weights are the adapters (a checkpoint stores only those), and with them disabled it is the reference."""
    return hasattr(model, "peft_config")


@contextlib.contextmanager
def _adapters_disabled(model):
    model.disable_adapters()
    try:
        yield
    finally:
        model.enable_adapters()


def reference_context(model):
    """Context in which ``model`` computes reference log-probs: adapters disabled under LoRA."""
    unwrapped = getattr(model, "module", model)
    if not is_peft(unwrapped):
        return contextlib.nullcontext()
    if hasattr(unwrapped, "disable_adapter"):  # peft PeftModel
        return unwrapped.disable_adapter()
    if hasattr(unwrapped, "disable_adapters"):  # transformers model with adapters loaded
        return _adapters_disabled(unwrapped)
    raise TypeError(f"{type(unwrapped).__name__} carries peft_config but cannot disable its adapters")


def init_reward_head(head: torch.nn.Linear) -> None:
    """Stiennon et al. 2020 / N+ details: head weights N(0, 1/sqrt(d_model + 1)), bias 0."""
    torch.nn.init.normal_(head.weight, std=1.0 / math.sqrt(head.in_features + 1))
    if head.bias is not None:
        torch.nn.init.zeros_(head.bias)


SCORE_HEAD_NAMES = ("score", "classifier")


def find_score_head(model, per_position: bool = False) -> torch.nn.Linear | None:
    """The linear layer that outputs a sequence classifier's score: ``score`` (decoders such as
    LlamaForSequenceClassification), ``classifier`` (BERT-style encoders), or ``classifier.out_proj`` (heads
    with a dense layer before the projection, e.g. RoBERTa); None if there is none.

    ``per_position``: only a head that maps a backbone hidden state straight to the score (``score`` or a linear
    ``classifier``), i.e. one that may be applied at every position (the value model)."""
    for name in SCORE_HEAD_NAMES:
        head = getattr(model, name, None)
        if isinstance(head, torch.nn.Linear):
            return head
        if not per_position and head is not None and isinstance(getattr(head, "out_proj", None), torch.nn.Linear):
            return head.out_proj
    return None


HEADS_ATTR = "alignkit_reward_heads"


def load_reward_model(cfg: ModelConfig, tokenizer, trainable: bool = True, head_names: list[str] | None = None):
    """Sequence classifier; score read at the last real token (decoders). One output, or one per name of
    ``head_names`` (a multi-objective or heads-ensemble reward model, names kept in ``config.id2label`` and
    ``config.alignkit_reward_heads``); a saved multi-head reward model keeps its outputs when ``head_names`` is None."""
    path = resolve_path(cfg.name_or_path)
    labels = {"num_labels": 1} if head_names is None else {
        "num_labels": len(head_names), "id2label": dict(enumerate(head_names)),
        "label2id": {n: i for i, n in enumerate(head_names)}}
    try:
        saved_heads = getattr(AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code), HEADS_ATTR, None)
    except (OSError, ValueError):
        saved_heads = None
    if head_names is None and saved_heads:
        labels = {}
    new_heads = head_names is not None and list(head_names) != list(saved_heads or [])
    if new_heads:
        labels["ignore_mismatched_sizes"] = True  # a 1-output reward model as the backbone of several heads
    model = _wrap_load(
        lambda: AutoModelForSequenceClassification.from_pretrained(
            path, dtype=DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code, **labels,
            **_extra_kwargs(cfg),
        ),
        cfg.name_or_path,
        "reward model",
    )
    if head_names is not None:
        setattr(model.config, HEADS_ATTR, list(head_names))
    archs = getattr(model.config, "architectures", None) or []
    fresh_head = new_heads or not any("SequenceClassification" in a for a in archs)
    _fit_vocab(model, tokenizer)
    disable_dropout(model)
    if fresh_head:
        head = find_score_head(model)
        if head is not None:
            init_reward_head(head)
    if not trainable:
        return freeze(model)
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora, task_type="SEQ_CLS")
    elif cfg.freeze_embeddings:
        model.get_input_embeddings().requires_grad_(False)
    return model


def load_prm_model(cfg: ModelConfig, tokenizer, trainable: bool = True):
    """Process reward model: a token classifier with one output, a scalar head on every position's hidden state
    (read at the step separators; ``alignkit.rewards.prm``). A checkpoint that is not a token classifier gets a
    fresh head initialised like a reward model's."""
    path = resolve_path(cfg.name_or_path)
    model = _wrap_load(
        lambda: AutoModelForTokenClassification.from_pretrained(
            path, num_labels=1, dtype=DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code,
            **_extra_kwargs(cfg),
        ),
        cfg.name_or_path,
        "process reward model",
    )
    archs = getattr(model.config, "architectures", None) or []
    _fit_vocab(model, tokenizer)
    disable_dropout(model)
    if not any("TokenClassification" in a for a in archs):
        head = find_score_head(model, per_position=True)
        if head is not None:
            init_reward_head(head)
    if not trainable:
        return freeze(model)
    if cfg.lora.enabled:
        lora = cfg.lora
        if lora.target_modules == "all-linear":  # peft's all-linear would wrap the head too (it spares it for SEQ_CLS only)
            names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear) and m is not find_score_head(model, per_position=True)}
            lora = lora.model_copy(update={"target_modules": sorted(names)})
        model = apply_lora(model, lora, task_type="TOKEN_CLS")
    elif cfg.freeze_embeddings:
        model.get_input_embeddings().requires_grad_(False)
    return model


def merged_for_saving(model):
    """A plain transformers model: LoRA merged into the base weights (no peft needed to load)."""
    unwrapped = getattr(model, "module", model)
    if is_peft(unwrapped) and hasattr(unwrapped, "merge_and_unload"):
        return copy.deepcopy(unwrapped).merge_and_unload()
    return unwrapped


def save_model(model, tokenizer, out_dir: str | Path) -> Path:
    """Atomically write a ``from_pretrained``-loadable model + tokenizer to ``out_dir``."""
    out_dir = Path(out_dir)
    plain = merged_for_saving(model)

    def write(tmp: Path) -> None:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    atomic_save_dir(out_dir, write)
    return out_dir
