"""Frozen-prefix reuse: run a decoder's first k layers once and only its last layers many times.

Under LoRA on the last layers (``model.lora.layers_to_transform``), every layer before the first adapted one is
frozen and identical in the policy, its adapter-disabled reference and every later policy iterate. PPO then
recomputes the same hidden states four times per sample (old log-probs, reference log-probs, and once per PPO
epoch); a KL estimate between a merged DPO/PPO policy and its SFT reference runs the shared layers twice.
Here the first ``k`` layers run once (``prefix_states``, [B, T, d]); the rest runs from those states
(``only_layers(model, k)`` + ``inputs_embeds``). The arithmetic of every layer is unchanged, so the results equal
the full forward up to float reassociation (tested in ``tests/test_prefix.py``).

Supported: decoders whose layers do not depend on their index and that do not rescale ``inputs_embeds``
(Llama / SmolLM, Mistral, Qwen2/3 without sliding-window layers). Anything else reports 0 shared layers, and
callers fall back to the plain forward.
"""

from __future__ import annotations

import contextlib

import torch

SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


def decoder_of(model) -> torch.nn.Module | None:
    """The inner decoder (``.embed_tokens``, ``.layers``, ``.norm``) of a supported causal LM, unwrapping DDP and
    PEFT; None when the architecture is not supported."""
    inner = getattr(model, "module", model)  # DistributedDataParallel
    if hasattr(inner, "get_base_model"):  # peft.PeftModel
        inner = inner.get_base_model()
    config = getattr(inner, "config", None)
    if config is None or getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        return None
    if len(set(getattr(config, "layer_types", None) or ["full_attention"])) > 1:  # sliding layers: index-dependent
        return None
    dec = getattr(inner, "model", None)
    if dec is None or not all(hasattr(dec, a) for a in ("embed_tokens", "layers", "norm")):
        return None
    return dec


def frozen_prefix_layers(model) -> int:
    """Leading decoder layers without any trainable parameter (and a frozen embedding): these states never change
    during training. 0 for unsupported models or a trainable embedding."""
    dec = decoder_of(model)
    if dec is None or any(p.requires_grad for p in dec.embed_tokens.parameters()):
        return 0
    n = 0
    for layer in dec.layers:
        if any(p.requires_grad for p in layer.parameters()):
            break
        n += 1
    return n


def shared_prefix_layers(a, b) -> int:
    """Leading decoder layers (with the embedding) that hold identical weights in models ``a`` and ``b``, e.g. a
    policy trained with LoRA on its last layers (merged or not) and its reference. 0 when none or unsupported."""
    da, db = decoder_of(a), decoder_of(b)
    if da is None or db is None or len(da.layers) != len(db.layers) or not _same(da.embed_tokens, db.embed_tokens):
        return 0
    n = 0
    for la, lb in zip(da.layers, db.layers):
        if not _same(la, lb):
            break
        n += 1
    return n


def _same(ma: torch.nn.Module, mb: torch.nn.Module) -> bool:
    pa, pb = dict(ma.named_parameters()), dict(mb.named_parameters())
    if pa.keys() != pb.keys():  # e.g. LoRA modules in one of them
        return False
    return all(x is y or (x.shape == y.shape and torch.equal(x, y)) for x, y in ((pa[k], pb[k]) for k in pa))


@contextlib.contextmanager
def only_layers(model, start: int, stop: int | None = None, final_norm: bool = True):
    """Within the block, ``model`` runs decoder layers [start, stop) only (the same module objects), and skips the
    final norm unless ``final_norm``. Feed it ``inputs_embeds`` = the states entering layer ``start``."""
    dec = decoder_of(model)
    if dec is None:
        raise ValueError(f"{type(getattr(model, 'module', model)).__name__}: frozen-prefix reuse supports the model "
                         f"types {sorted(SUPPORTED_MODEL_TYPES)} only")
    layers, norm = dec.layers, dec.norm
    dec.layers = torch.nn.ModuleList(list(layers)[start:stop])
    if not final_norm:
        dec.norm = torch.nn.Identity()
    try:
        yield dec
    finally:
        dec.layers, dec.norm = layers, norm


@torch.no_grad()
def prefix_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_layers: int,
                  micro_batch_size: int | None = None) -> torch.Tensor:
    """[B, T] -> [B, T, d]: the hidden states entering decoder layer ``n_layers`` (padding-aware positions)."""
    from alignkit.ops.logprobs import position_ids_from_mask

    step = input_ids.shape[0] if micro_batch_size is None else micro_batch_size
    out = []
    with only_layers(model, 0, n_layers, final_norm=False) as dec:
        for s in range(0, input_ids.shape[0], step):
            mask = attention_mask[s : s + step]
            out.append(dec(input_ids=input_ids[s : s + step], attention_mask=mask,
                           position_ids=position_ids_from_mask(mask), use_cache=False).last_hidden_state)
    return torch.cat(out, 0)
