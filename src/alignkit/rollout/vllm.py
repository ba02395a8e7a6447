"""The vLLM generation backend (``generation.backend: vllm``): a colocated ``vllm.LLM`` engine on the
trainer's GPU, sampling from the current policy.

    backend = VLLMBackend(cfg.generation, policy, tokenizer)
    raw = backend.generate(prompt_ids, prompt_mask, params, row_seeds)   # [B, R]
    backend.update_weights(policy)                                       # after every policy update

- Start: the engine loads the policy's own checkpoint directory when it is a local safetensors checkpoint
  with the same architecture (then the live weights are synced into it at once), otherwise the (LoRA-merged)
  policy written to a temporary directory with ``save_pretrained`` and the tokenizer.
- Sync (:meth:`VLLMBackend.update_weights`): :func:`weights_to_sync` yields, under HF checkpoint names, only the
  tensors an update can change -- under LoRA the merged ``W + scale * B @ A`` of every adapted layer (the
  trainer's model is not modified, the adapter tensors are never sent), otherwise every parameter -- and the
  engine's model loads them in place (``load_weights``). The prefix cache is reset afterwards: cached KV blocks
  were computed with the old weights.
- Log-probs: vLLM only samples token ids. The log-probs used in the loss (old, new and reference) are always
  recomputed by the trainer (:func:`alignkit.rollout.engine.response_logprobs`), never taken from vLLM, so
  numerical differences between the engines never enter the importance ratio.
- Top-p / top-k: see :func:`truncated_sampling_note`.

This module imports ``vllm`` lazily (inside :class:`VLLMBackend`), so :func:`to_vllm_sampling_kwargs`,
:func:`weights_to_sync` and :func:`truncated_sampling_note` work without vLLM or a GPU.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from torch import Tensor

from alignkit.config import GenerationSection, VLLMSection
from alignkit.rollout.engine import (  # noqa: F401  (re-exported)
    TRUNCATED_SAMPLING_MESSAGE,
    SamplingParams,
    truncated_sampling_note,
    unwrap_for_generation,
)

INSTALL_HINT = "generation.backend=vllm needs a CUDA GPU and `pip install alignkit[vllm]`"

# ---------------------------------------------------------------- pure helpers (no vLLM needed)
def to_vllm_sampling_kwargs(params: SamplingParams, seed: int | None, *, eos_token_id: int | None = None) -> dict:
    """``SamplingParams`` -> keyword arguments of ``vllm.SamplingParams``, one request (one row).

    One-to-one: ``max_new_tokens -> max_tokens``, ``temperature``, ``top_p``, ``top_k`` (0 = off -> vLLM's
    -1), ``seed`` (the row's sample is a deterministic function of it; None = the engine's own RNG), ``n = 1``.
    Greedy (``do_sample = False``) is ``temperature = 0.0`` with top-p/top-k off.
    With ``eos_token_id`` the request stops at that token only (``stop_token_ids``, ``ignore_eos``), as
    ``transformers`` ``generate`` does with the trainer's tokenizer, whatever EOS ids the checkpoint lists.
    """
    kwargs = {
        "n": 1,
        "max_tokens": params.max_new_tokens,
        "temperature": params.temperature if params.do_sample else 0.0,
        "top_p": params.top_p if params.do_sample else 1.0,
        "top_k": (params.top_k or -1) if params.do_sample else -1,
        "seed": None if seed is None else int(seed),
    }
    if eos_token_id is not None:
        kwargs.update(stop_token_ids=[int(eos_token_id)], ignore_eos=True)
    return kwargs


_MODULES_TO_SAVE = re.compile(r"\.modules_to_save\.[^.]+\.")


def hf_name(peft_name: str) -> str:
    """A peft parameter/module name -> the name of the same tensor in the base model's HF checkpoint
    (``base_model.model.`` and ``.base_layer`` stripped, ``modules_to_save.<adapter>.`` unwrapped)."""
    name = peft_name.removeprefix("base_model.model.").replace(".base_layer", "")
    return _MODULES_TO_SAVE.sub(".", name)


def _is_adapter_tensor(name: str) -> bool:
    return any(part.startswith("lora_") for part in name.split(".")) or ".original_module." in name


@torch.no_grad()
def merged_lora_weight(layer: LoraLayer) -> Tensor:
    """``W + sum_a scale_a * B_a @ A_a`` over the layer's active adapters not merged into ``W`` already.

    Computed with peft's ``get_delta_weight``; the layer is not modified. Variants (DoRA, ...) and
    ``lora_bias`` are not supported (alignkit never creates them).
    """
    weight = layer.get_base_layer().weight  # [out, in]
    merged = weight.detach()
    for adapter in layer.active_adapters:
        if adapter in layer.merged_adapters or adapter not in layer.scaling:
            continue
        if getattr(layer, "lora_variant", {}).get(adapter) is not None or getattr(layer, "use_dora", {}).get(adapter):
            raise NotImplementedError(f"vLLM weight sync: LoRA variants (DoRA, ...) are not supported ({adapter!r})")
        if getattr(layer, "lora_bias", {}).get(adapter):
            raise NotImplementedError(f"vLLM weight sync: lora_bias is not supported ({adapter!r})")
        merged = merged + layer.get_delta_weight(adapter).to(weight.dtype)  # new tensor: W is untouched
    return merged


def weights_to_sync(model) -> Iterator[tuple[str, Tensor]]:
    """(HF checkpoint name, tensor) of every weight a policy update can change; what the engine is sent.

    ``model`` is the trainer's policy, possibly wrapped (DDP/DeepSpeed ``.module``, ``torch.compile``).
    - peft LoRA model: the merged weight of each LoRA layer (:func:`merged_lora_weight`) under its base name
      (``...q_proj.weight``), then any other trainable non-adapter parameter (e.g. ``modules_to_save``).
      The ``lora_A``/``lora_B`` tensors themselves and frozen base tensors are never yielded.
    - plain model: every parameter (tied weights once, as ``named_parameters`` lists them).
    Tensors are detached views (merged ones are new tensors), produced one at a time.
    """
    model = unwrap_for_generation(model)
    if not isinstance(model, PeftModel):
        for name, param in model.named_parameters():
            yield name, param.detach()
        return
    lora_layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    for name, layer in lora_layers.items():
        yield hf_name(name) + ".weight", merged_lora_weight(layer)
    merged_names = {name + ".base_layer.weight" for name in lora_layers}
    for name, param in model.named_parameters():
        if param.requires_grad and not _is_adapter_tensor(name) and name not in merged_names:
            yield hf_name(name), param.detach()


def merged_state_dict(model) -> dict[str, Tensor]:
    """The policy as a plain HF state dict on the CPU (LoRA merged, adapter tensors dropped): what is saved
    for the engine to start from."""
    model = unwrap_for_generation(model)
    if not isinstance(model, PeftModel):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    state = {
        hf_name(k): v.detach().cpu()
        for k, v in model.get_base_model().state_dict().items()
        if not _is_adapter_tensor(k)
    }
    state.update((name, t.cpu()) for name, t in weights_to_sync(model))
    return state


def _checkpoint_matches(path: str, config) -> bool:
    """Is ``path`` a local safetensors checkpoint of the same architecture and shapes as ``config``?"""
    p = Path(path) if path else None
    if p is None or not (p / "config.json").is_file() or not any(p.glob("*.safetensors")):
        return False
    saved = json.loads((p / "config.json").read_text(encoding="utf-8"))
    keys = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size",
            "num_attention_heads", "num_key_value_heads", "tie_word_embeddings")
    return all(saved.get(k) == getattr(config, k, None) for k in keys)


def engine_kwargs(v: VLLMSection, model_path: str, tokenizer_path: str, world_size: int = 1, rank: int = 0) -> dict:
    """Keyword arguments of ``vllm.LLM`` for a colocated engine (one per training process)."""
    kwargs = {
        "model": model_path,
        "tokenizer": tokenizer_path,
        "dtype": v.dtype,
        "gpu_memory_utilization": v.gpu_memory_utilization,
        "tensor_parallel_size": v.tensor_parallel_size,
        "max_model_len": v.max_model_len,
        "enforce_eager": v.enforce_eager,
        "enable_prefix_caching": True,
        "seed": rank,
    }
    if world_size > 1:  # one engine per training process, in the process group the launcher made
        kwargs["distributed_executor_backend"] = "external_launcher"
    return kwargs


def check_vllm_available() -> None:
    """Raise a clear error when vLLM is not installed or no CUDA GPU is visible (naming which)."""
    missing = []
    if importlib.util.find_spec("vllm") is None:
        missing.append("vllm is not installed")
    if not torch.cuda.is_available():
        missing.append("no CUDA GPU is visible")
    if missing:
        raise RuntimeError(f"{INSTALL_HINT} ({'; '.join(missing)})")


def _load_into_engine(llm, weights: Iterable[tuple[str, Tensor]]) -> None:
    """Load (name, tensor) pairs into the engine's model in place (the engine core runs in this process)."""

    def load(model) -> None:
        model.load_weights(weights)

    if hasattr(llm, "apply_model"):  # vLLM >= 0.8: runs ``load`` on the worker's model
        llm.apply_model(load)
    else:  # older engines: the model is reachable through the driver worker
        load(llm.llm_engine.model_executor.driver_worker.model_runner.model)


# ---------------------------------------------------------------- the backend
class VLLMBackend:
    """Colocated vLLM engine behind :class:`alignkit.rollout.engine.GenerationBackend`.

    ``generate`` sends each row's real prompt tokens (left padding stripped) as one request with its own
    ``vllm.SamplingParams`` (:func:`to_vllm_sampling_kwargs`; ``row_seeds[b]`` seeds row b) and returns the raw
    new tokens [B, R], right-padded with the tokenizer's pad id. Only token ids come back: the log-probs of
    the loss are always recomputed by the trainer, never taken from vLLM.
    ``update_weights`` must be called after every policy update (:func:`weights_to_sync`).

    Needs a CUDA GPU, ``pip install alignkit[vllm]``, ``generation.vllm.tensor_parallel_size = 1`` and
    unsharded weights (single process or DDP; not DeepSpeed ZeRO-3/FSDP). The engine core runs in this
    process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so weights are loaded without copies between processes.
    """

    def __init__(self, gen: GenerationSection, model, tokenizer):
        check_vllm_available()
        if gen.vllm.tensor_parallel_size != 1:
            raise NotImplementedError(
                "generation.vllm.tensor_parallel_size must be 1: the colocated engine shares the trainer's GPU "
                "and is synced in-process"
            )
        if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None or \
                tokenizer.pad_token_id == tokenizer.eos_token_id:
            raise ValueError("VLLMBackend needs a tokenizer with distinct pad_token_id and eos_token_id "
                             "(load it with alignkit.models.loading.load_tokenizer)")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        import vllm

        self._vllm = vllm
        self.tokenizer = tokenizer
        self._tmp = tempfile.TemporaryDirectory(prefix="alignkit-vllm-")
        tokenizer.save_pretrained(self._tmp.name)
        base = unwrap_for_generation(model)
        base = base.get_base_model() if isinstance(base, PeftModel) else base
        source = getattr(base.config, "_name_or_path", "") or getattr(base, "name_or_path", "")
        from_base_path = _checkpoint_matches(source, base.config)
        if not from_base_path:  # write the current (merged) policy
            source = self._tmp.name
            lora = isinstance(unwrap_for_generation(model), PeftModel)
            base.save_pretrained(source, state_dict=merged_state_dict(model) if lora else None)
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        world_size, rank = (torch.distributed.get_world_size(), torch.distributed.get_rank()) if dist else (1, 0)
        self.llm = vllm.LLM(**engine_kwargs(gen.vllm, source, self._tmp.name, world_size, rank))
        if from_base_path:  # the checkpoint on disk may predate the live weights (resume, earlier stages)
            self.update_weights(model)

    def update_weights(self, model) -> None:
        """Send the policy's current weights into the engine (:func:`weights_to_sync`), then reset the
        prefix cache (its KV blocks were computed with the old weights)."""
        with torch.no_grad():
            _load_into_engine(self.llm, weights_to_sync(model))
        if hasattr(self.llm, "reset_prefix_cache"):
            self.llm.reset_prefix_cache()

    def generate(self, prompt_ids: Tensor, prompt_mask: Tensor, params: SamplingParams,
                 row_seeds: Tensor | None = None) -> Tensor:
        b = prompt_ids.shape[0]  # prompt_ids, prompt_mask: [B, P] left-padded
        if row_seeds is not None and row_seeds.shape != (b,):
            raise ValueError(f"row_seeds must have shape [{b}], got {tuple(row_seeds.shape)}")
        seeds = [None] * b if row_seeds is None else [int(s) for s in row_seeds.tolist()]
        requests = [{"prompt_token_ids": ids[m.bool()].tolist()} for ids, m in zip(prompt_ids, prompt_mask)]
        sampling = [
            self._vllm.SamplingParams(**to_vllm_sampling_kwargs(params, s, eos_token_id=self.tokenizer.eos_token_id))
            for s in seeds
        ]
        outputs = self.llm.generate(requests, sampling_params=sampling, use_tqdm=False)
        tokens = [list(out.outputs[0].token_ids) for out in outputs]
        width = max(1, max(len(t) for t in tokens))
        raw = torch.full((b, width), self.tokenizer.pad_token_id, dtype=torch.long)  # [B, R]
        for i, t in enumerate(tokens):
            raw[i, : len(t)] = torch.tensor(t, dtype=torch.long)
        return raw.to(prompt_ids.device)

    def close(self) -> None:
        """Free the engine and its temporary checkpoint."""
        self.llm = None
        self._tmp.cleanup()
