"""Tests for the vLLM backend (alignkit.rollout.vllm) that run on a CPU without vLLM: the sampling-parameter
mapping, what the weight sync sends (names, count, merged LoRA values, trainer's model untouched), the error
without vLLM/CUDA, and the backend's plumbing against a fake ``vllm`` module whose engine is a real
transformers model loaded from the checkpoint the backend wrote (so HF names and merged values are checked
end to end)."""

from __future__ import annotations

import copy
import importlib.machinery
import importlib.util
import sys
import types

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

from alignkit.config import GenerationSection, LoraConfig
from alignkit.models.loading import apply_lora
from alignkit.models.tiny import save_tiny_models, tiny_causal_lm
from alignkit.rollout import vllm as vb
from alignkit.rollout.engine import GenerationBackend, SamplingParams

PROJS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_model(seed: int = 0, **lora_kwargs):
    model, tok = tiny_causal_lm(seed)
    peft_model = apply_lora(model, LoraConfig(enabled=True, r=4, alpha=8, **lora_kwargs))
    torch.manual_seed(seed + 1)
    with torch.no_grad():  # a non-trivial adapter (lora_B starts at zero)
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    return peft_model, tok


class Wrapper(torch.nn.Module):
    """Stands for DDP: the policy under ``.module``, no ``generate``."""

    def __init__(self, module):
        super().__init__()
        self.module = module


# ---------------------------------------------------------------- sampling parameters
def test_sampling_kwargs_map_each_field():
    params = SamplingParams(max_new_tokens=7, temperature=0.7, top_p=0.9, top_k=5)
    assert vb.to_vllm_sampling_kwargs(params, seed=11) == {
        "n": 1, "max_tokens": 7, "temperature": 0.7, "top_p": 0.9, "top_k": 5, "seed": 11,
    }


def test_sampling_kwargs_top_k_zero_is_vllm_off():
    kw = vb.to_vllm_sampling_kwargs(SamplingParams(max_new_tokens=3, top_k=0), seed=None)
    assert kw["top_k"] == -1
    assert kw["top_p"] == 1.0 and kw["temperature"] == 1.0


def test_sampling_kwargs_greedy_is_temperature_zero():
    params = SamplingParams(max_new_tokens=4, temperature=0.5, top_p=0.8, top_k=3, do_sample=False)
    kw = vb.to_vllm_sampling_kwargs(params, seed=None)
    assert kw == {"n": 1, "max_tokens": 4, "temperature": 0.0, "top_p": 1.0, "top_k": -1, "seed": None}


def test_sampling_kwargs_seed_and_eos():
    params = SamplingParams(max_new_tokens=2)
    assert vb.to_vllm_sampling_kwargs(params, seed=None)["seed"] is None
    kw = vb.to_vllm_sampling_kwargs(params, seed=torch.tensor(123456789012)[()], eos_token_id=2)
    assert kw["seed"] == 123456789012 and type(kw["seed"]) is int
    assert kw["stop_token_ids"] == [2] and kw["ignore_eos"] is True  # stop at the trainer's EOS only
    assert "stop_token_ids" not in vb.to_vllm_sampling_kwargs(params, seed=1)


def test_truncated_sampling_note():
    assert vb.truncated_sampling_note(SamplingParams(max_new_tokens=2)) == {}
    assert vb.truncated_sampling_note(SamplingParams(max_new_tokens=2, top_p=0.5, do_sample=False)) == {}
    assert vb.truncated_sampling_note(SamplingParams(max_new_tokens=2, top_p=0.9)) == {
        "sampling/truncated": 1.0, "sampling/top_p": 0.9, "sampling/top_k": 0.0}
    assert vb.truncated_sampling_note(SamplingParams(max_new_tokens=2, top_k=20))["sampling/top_k"] == 20.0


# ---------------------------------------------------------------- what the sync sends
def test_sync_without_lora_sends_every_parameter_once():
    model, _ = tiny_causal_lm()
    sent = list(vb.weights_to_sync(Wrapper(model)))
    names = [n for n, _ in sent]
    assert names == [n for n, _ in model.named_parameters()]
    assert len(names) == 2 + 2 * 9  # embeddings, final norm, per layer 7 projections + 2 norms
    assert "lm_head.weight" not in names  # tied to the embeddings: sent once
    params = dict(model.named_parameters())
    for n, t in sent:
        assert t.data_ptr() == params[n].data_ptr() and not t.requires_grad


def test_sync_under_lora_sends_only_merged_target_weights():
    peft_model, _ = lora_model()
    base_names = set(tiny_causal_lm()[0].state_dict())
    names = [n for n, _ in vb.weights_to_sync(peft_model)]
    assert sorted(names) == sorted(f"model.layers.{i}.{kind}.{p}.weight" for i in range(2) for p in PROJS
                                   for kind in ["self_attn" if p in PROJS[:4] else "mlp"])
    assert len(names) == 14 and set(names) <= base_names  # HF checkpoint names, nothing else

    few, _ = lora_model(target_modules=["q_proj", "v_proj"], layers_to_transform=[1])
    assert sorted(n for n, _ in vb.weights_to_sync(Wrapper(few))) == [
        "model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight"]


def test_hf_name_strips_peft_prefixes():
    assert vb.hf_name("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight") == \
        "model.layers.0.self_attn.q_proj.weight"
    assert vb.hf_name("base_model.model.score.modules_to_save.default.weight") == "score.weight"


def test_merged_lora_equals_merge_and_unload_and_leaves_model_untouched():
    peft_model, _ = lora_model()
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    reference = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    sent = dict(vb.weights_to_sync(peft_model))
    for name, tensor in sent.items():
        assert_close(tensor, reference[name])
        assert not torch.equal(tensor, before[f"base_model.model.{name.removesuffix('.weight')}.base_layer.weight"])
    for n, p in peft_model.named_parameters():  # the trainer's model is not modified
        assert torch.equal(p, before[n]), n
    assert not any(m.merged for m in peft_model.modules() if isinstance(m, vb.LoraLayer))
    state = vb.merged_state_dict(peft_model)  # the checkpoint written for the engine
    assert set(state) == set(reference)
    for name in reference:
        assert_close(state[name], reference[name])


def test_already_merged_adapter_is_not_added_twice():
    peft_model, _ = lora_model()
    expected = {n: t.clone() for n, t in vb.weights_to_sync(peft_model)}
    peft_model.merge_adapter()
    try:
        for name, tensor in vb.weights_to_sync(peft_model):
            assert_close(tensor, expected[name])
    finally:
        peft_model.unmerge_adapter()


# ---------------------------------------------------------------- error without vLLM / CUDA
@pytest.mark.parametrize("has_vllm,has_cuda,missing", [
    (False, False, "vllm is not installed; no CUDA GPU is visible"),
    (False, True, "vllm is not installed"),
    (True, False, "no CUDA GPU is visible"),
])
def test_clear_error_without_vllm_or_cuda(monkeypatch, has_vllm, has_cuda, missing):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name == "vllm":
            return importlib.machinery.ModuleSpec("vllm", None) if has_vllm else None
        return real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: has_cuda)
    model, tok = tiny_causal_lm()
    with pytest.raises(RuntimeError) as err:
        vb.VLLMBackend(GenerationSection(backend="vllm"), model, tok)
    assert str(err.value) == (
        f"generation.backend=vllm needs a CUDA GPU and `pip install alignkit[vllm]` ({missing})")


# ---------------------------------------------------------------- the backend against a fake engine
class FakeEngineModel:
    """vLLM's model side: a transformers model read from the directory the backend gave ``LLM``;
    ``load_weights`` copies HF-named tensors into it (an unknown name fails)."""

    def __init__(self, path):
        self.hf = AutoModelForCausalLM.from_pretrained(path)
        self.loads: list[list[str]] = []

    def load_weights(self, weights):
        params = dict(self.hf.named_parameters())
        names = []
        with torch.no_grad():
            for name, tensor in weights:
                params[name].copy_(tensor)
                names.append(name)
        self.loads.append(names)
        return set(names)


class FakeLLM:
    instances: list["FakeLLM"] = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.model = FakeEngineModel(kwargs["model"])
        self.requests = None
        self.prefix_resets = 0
        FakeLLM.instances.append(self)

    def apply_model(self, func):
        return [func(self.model)]

    def reset_prefix_cache(self):
        self.prefix_resets += 1

    def generate(self, requests, sampling_params, use_tqdm):
        self.requests, self.sampling = requests, sampling_params
        outs = []
        for i, sp in enumerate(sampling_params):  # row i: i + 1 tokens, a function of its seed
            ids = [3 + ((sp.kwargs["seed"] or 0) + k) % 40 for k in range(i + 1)][: sp.kwargs["max_tokens"]]
            outs.append(types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=tuple(ids))]))
        return outs


class FakeSamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


@pytest.fixture
def fake_vllm(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: (
        importlib.machinery.ModuleSpec("vllm", None) if name == "vllm" else real_find_spec(name, *a, **k)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=FakeLLM, SamplingParams=FakeSamplingParams))
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    FakeLLM.instances.clear()
    return FakeLLM


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_backend_starts_from_merged_checkpoint_and_syncs_lora_updates(fake_vllm):
    peft_model, tok = lora_model()
    gen = GenerationSection(backend="vllm")
    backend = vb.VLLMBackend(gen, Wrapper(peft_model), tok)
    llm = fake_vllm.instances[-1]
    ids = torch.tensor([[1, 7, 8, 9, 2, 5]])
    assert llm.kwargs["model"] == llm.kwargs["tokenizer"] == backend._tmp.name  # written: no checkpoint on disk
    assert llm.kwargs["gpu_memory_utilization"] == gen.vllm.gpu_memory_utilization
    assert "distributed_executor_backend" not in llm.kwargs
    assert vb.os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert llm.model.loads == []  # the written checkpoint already holds the current weights
    assert_close(_logits(llm.model.hf, ids), _logits(peft_model, ids))

    with torch.no_grad():  # a policy update changes the adapters
        for n, p in peft_model.named_parameters():
            if "lora_A" in n:
                p.add_(0.2)
    assert not torch.allclose(_logits(llm.model.hf, ids), _logits(peft_model, ids))
    backend.update_weights(Wrapper(peft_model))
    assert len(llm.model.loads) == 1 and len(llm.model.loads[0]) == 14
    assert llm.prefix_resets == 1
    assert_close(_logits(llm.model.hf, ids), _logits(peft_model, ids))
    backend.close()


def test_backend_starts_from_base_checkpoint_and_syncs_at_once(fake_vllm, tmp_path):
    path = save_tiny_models(tmp_path)["policy"]
    model = AutoModelForCausalLM.from_pretrained(path)
    _, tok = tiny_causal_lm()
    with torch.no_grad():  # the live weights differ from the checkpoint on disk
        model.model.norm.weight.add_(1.0)
    backend = vb.VLLMBackend(GenerationSection(backend="vllm"), model, tok)
    llm = fake_vllm.instances[-1]
    assert llm.kwargs["model"] == str(path) and llm.kwargs["tokenizer"] == backend._tmp.name
    assert llm.model.loads == [[n for n, _ in model.named_parameters()]] and llm.prefix_resets == 1
    ids = torch.tensor([[1, 7, 8, 9]])
    assert_close(_logits(llm.model.hf, ids), _logits(model, ids))


def test_backend_generate_strips_left_padding_seeds_rows_and_pads_right(fake_vllm):
    model, tok = tiny_causal_lm()
    backend = vb.VLLMBackend(GenerationSection(backend="vllm"), model, tok)
    assert isinstance(backend, GenerationBackend)
    llm = fake_vllm.instances[-1]
    prompt_ids = torch.tensor([[0, 0, 5, 6], [0, 7, 8, 9], [4, 5, 6, 7]])  # [B, P] left-padded (pad 0)
    prompt_mask = (prompt_ids != 0).long()
    params = SamplingParams(max_new_tokens=2, temperature=0.9, top_k=4)
    raw = backend.generate(prompt_ids, prompt_mask, params, row_seeds=torch.tensor([10, 20, 30]))
    assert llm.requests == [{"prompt_token_ids": [5, 6]}, {"prompt_token_ids": [7, 8, 9]},
                            {"prompt_token_ids": [4, 5, 6, 7]}]
    assert [sp.kwargs for sp in llm.sampling] == [
        vb.to_vllm_sampling_kwargs(params, s, eos_token_id=tok.eos_token_id) for s in (10, 20, 30)]
    pad = tok.pad_token_id
    assert raw.tolist() == [[13, pad], [23, 24], [33, 34]]  # [B, R], R <= max_new_tokens
    backend.generate(prompt_ids, prompt_mask, params)
    assert [sp.kwargs["seed"] for sp in llm.sampling] == [None, None, None]
    with pytest.raises(ValueError, match="row_seeds"):
        backend.generate(prompt_ids, prompt_mask, params, row_seeds=torch.tensor([1, 2]))
    with pytest.raises(NotImplementedError, match="tensor_parallel_size"):
        vb.VLLMBackend(GenerationSection(backend="vllm", vllm={"tensor_parallel_size": 2}), model, tok)
