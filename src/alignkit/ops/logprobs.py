"""Token log-probabilities: the one place every algorithm gets them from.

Conventions
- ``input_ids`` [B, T] hold prompt + response, padded on either side; ``attention_mask`` marks real tokens.
- ``response_mask`` [B, T] marks response tokens (EOS included) in ``input_ids`` coordinates.
- Position ids are derived from the attention mask, so left padding does not change the
  log-probs of real tokens (REFERENCES: "real-token logprobs must not change with padding").
- Logits are divided by the sampling temperature before ``log_softmax`` (REFERENCES, PPO:
  "divide logits by the sampling temperature"), so recomputed log-probs match the sampler's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] -> [B, T]: 0, 1, 2, ... over real tokens; pads get 0 (they are masked anyway)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def gather_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0, chunk_size: int = 4) -> torch.Tensor:
    """log softmax(logits / temperature)[labels], computed in row chunks to bound memory.

    logits [B, T, V], labels [B, T] -> [B, T]. Equals ``-cross_entropy(logits, labels, reduction='none')``.
    Uses logit[label] - logsumexp(logits) so no [B, T, V] log-softmax tensor is materialised at once.
    """
    out = []
    for start in range(0, logits.shape[0], chunk_size):
        lg = logits[start : start + chunk_size].float()  # [b, T, V]
        if temperature != 1.0:
            lg = lg / temperature
        lab = labels[start : start + chunk_size]
        picked = lg.gather(-1, lab.unsqueeze(-1)).squeeze(-1)  # [b, T]
        out.append(picked - torch.logsumexp(lg, dim=-1))
    return torch.cat(out, dim=0)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-token entropy of softmax(logits / temperature): [B, T, V] -> [B, T]."""
    lg = logits.float() / temperature
    logp = F.log_softmax(lg, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def _inputs(input_ids: torch.Tensor, inputs_embeds: torch.Tensor | None) -> dict:
    """The model's token input: the ids, or precomputed states (``inputs_embeds``) in their place."""
    return {"input_ids": input_ids} if inputs_embeds is None else {"inputs_embeds": inputs_embeds}


def forward_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int = 0,
                   inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """Causal-LM logits with padding-aware position ids: [B, T, V], or [B, k, V] for the last k positions.
    ``inputs_embeds`` [B, T, d] replaces the token embeddings (then ``input_ids`` only sets the shape)."""
    kwargs = {"logits_to_keep": logits_to_keep} if logits_to_keep else {}
    out = model(
        **_inputs(input_ids, inputs_embeds),
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
        **kwargs,
    )
    return out.logits


def token_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    first_index: int = 1,
    logits_budget_bytes: int | None = None,
    padding_free: bool = False,
    hidden: torch.Tensor | None = None,
    hidden_layers: int = 0,
):
    """Log-prob of each token given its prefix, aligned to ``input_ids``.

    Returns [B, T] where column t is log p(input_ids[:, t] | input_ids[:, :t]); columns before
    ``first_index`` (at least column 0, which has no prediction) are 0. Mask it with ``response_mask``.
    ``first_index`` = the first response column lets the LM head skip the prompt positions
    (``logits_to_keep``): the vocabulary projection is a fifth of a small model's forward.

    When the fp32 logits [B, keep, V] would take more than ``logits_budget_bytes`` (default
    :data:`LOGITS_BUDGET_BYTES`), they are never materialised: the LM head runs on chunks of tokens
    (:func:`chunked_head_logprobs`), so peak memory stops growing with the vocabulary.

    ``padding_free``: the rows' real tokens run as ONE packed sequence [1, N] whose position ids restart at
    every row (transformers then keeps attention inside each row), so no compute is spent on padding; the
    result is scattered back to the [B, T] layout and equals the padded path up to float rounding.

    ``hidden`` [B, T, d]: the states entering decoder layer ``hidden_layers``, computed once by
    ``ops.prefix.prefix_states``; only the layers from there on run (frozen-prefix reuse, ``ops/prefix.py``).
    """
    if hidden is not None and hidden_layers > 0:
        if padding_free:
            raise ValueError("token_logprobs: padding_free and a precomputed frozen prefix cannot be combined")
        from alignkit.ops.prefix import only_layers

        with only_layers(model, hidden_layers):
            return _token_logprobs(model, input_ids, attention_mask, temperature, return_entropy, first_index,
                                   logits_budget_bytes, False, hidden)
    return _token_logprobs(model, input_ids, attention_mask, temperature, return_entropy, first_index,
                           logits_budget_bytes, padding_free, None)


def _token_logprobs(model, input_ids, attention_mask, temperature, return_entropy, first_index, logits_budget_bytes,
                    padding_free, inputs_embeds):
    T = input_ids.shape[1]
    first = max(int(first_index), 1)
    keep = T - first + 1  # logits at positions first-1 .. T-1 predict tokens first .. T
    budget = LOGITS_BUDGET_BYTES if logits_budget_bytes is None else logits_budget_bytes
    head = plain_lm_head(model)
    if padding_free and input_ids.shape[0] > 1 and head is not None:
        return _token_logprobs_packed(model, head, input_ids, attention_mask, temperature, return_entropy,
                                      first, budget)
    if head is not None and input_ids.shape[0] * keep * head.out_features * 4 > budget:
        return _token_logprobs_chunked(model, head, input_ids, attention_mask, temperature, return_entropy,
                                       first, budget, inputs_embeds)
    logits = forward_logits(model, input_ids, attention_mask, logits_to_keep=keep if first > 1 else 0,
                            inputs_embeds=inputs_embeds)
    logits = logits[:, -keep:]  # [B, keep, V] (a model that ignores logits_to_keep returns all T)
    shifted = gather_logprobs(logits[:, :-1], input_ids[:, first:], temperature)  # [B, T-first]
    logps = F.pad(shifted, (first, 0), value=0.0)  # [B, T]
    if not return_entropy:
        return logps
    ent = F.pad(entropy_from_logits(logits[:, :-1], temperature), (first, 0), value=0.0)
    return logps, ent


LOGITS_BUDGET_BYTES = 1 << 30
"""fp32 logits larger than this (1 GiB) are computed chunk by chunk and never held whole."""


def plain_lm_head(model) -> torch.nn.Linear | None:
    """The model's output projection when it is a plain ``nn.Linear`` applied to the last hidden state
    (Llama, Qwen, Mistral, GPT-2 style), else None (soft-capped or scaled logits, LoRA on the head, ...)."""
    inner = getattr(model, "module", model)  # DistributedDataParallel
    get = getattr(inner, "get_output_embeddings", None)
    head = get() if get is not None else None
    config = getattr(inner, "config", None)
    if type(head) is not torch.nn.Linear or config is None:
        return None
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None
    return head


class _ChunkedHeadLogprobs(torch.autograd.Function):
    """log softmax(h W^T + b)[y] / temperature, chunk by chunk over tokens; backward never holds [N, V].

    d logp_t / d h_t = (e_{y_t} - p_t) W / tau is formed in the forward pass, one chunk at a time, and kept
    ([N, d], small). The weight's gradient sum_t g_t (e_{y_t} - p_t)^T h_t / tau needs p_t again, so the backward
    pass recomputes each chunk's logits; a frozen head (LoRA) skips that entirely.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature: float, chunk: int):
        # hidden [N, d], weight [V, d], bias [V] | None, labels [N]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        w = weight.float()
        logps, lses = [], []
        grad_h = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        for s in range(0, hidden.shape[0], chunk):
            logits = hidden[s:s + chunk].float() @ w.t()  # [c, V]
            if bias is not None:
                logits = logits + bias.float()
            logits = logits / temperature
            lse = torch.logsumexp(logits, dim=-1)  # [c]
            lab = labels[s:s + chunk]
            logps.append(logits.gather(-1, lab[:, None]).squeeze(-1) - lse)
            lses.append(lse)
            if need_h:
                coef = torch.softmax(logits, dim=-1).neg_()  # [c, V]: e_y - p
                coef.scatter_add_(-1, lab[:, None], torch.ones_like(lab[:, None], dtype=coef.dtype))
                grad_h[s:s + chunk] = (coef @ w) / temperature  # [c, d]
        ctx.temperature, ctx.chunk, ctx.has_bias = temperature, chunk, bias is not None
        ctx.save_for_backward(grad_h if need_h else None, hidden if need_w else None,
                              weight if need_w else None, bias if need_w else None,
                              labels if need_w else None, torch.cat(lses) if need_w else None)
        return torch.cat(logps)

    @staticmethod
    def backward(ctx, g):  # g [N]
        grad_h_unit, hidden, weight, bias, labels, lse = ctx.saved_tensors
        g = g.float()
        d_hidden = d_weight = d_bias = None
        if ctx.needs_input_grad[0]:
            d_hidden = (grad_h_unit * g[:, None]).to(grad_h_unit.dtype)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            w = weight.float()
            d_w = torch.zeros_like(w)
            d_b = torch.zeros(w.shape[0], dtype=torch.float32, device=w.device)
            for s in range(0, hidden.shape[0], ctx.chunk):
                h = hidden[s:s + ctx.chunk].float()
                logits = h @ w.t()
                if bias is not None:
                    logits = logits + bias.float()
                coef = torch.exp(logits / ctx.temperature - lse[s:s + ctx.chunk, None]).neg_()  # -p [c, V]
                lab = labels[s:s + ctx.chunk]
                coef.scatter_add_(-1, lab[:, None], torch.ones_like(lab[:, None], dtype=coef.dtype))
                coef.mul_(g[s:s + ctx.chunk, None] / ctx.temperature)  # g_t (e_y - p) / tau
                d_w += coef.t() @ h
                d_b += coef.sum(0)
            d_weight = d_w.to(weight.dtype) if ctx.needs_input_grad[1] else None
            d_bias = d_b.to(bias.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return d_hidden, d_weight, d_bias, None, None, None


def chunked_head_logprobs(hidden: torch.Tensor, head: torch.nn.Linear, labels: torch.Tensor,
                          temperature: float = 1.0, budget_bytes: int = LOGITS_BUDGET_BYTES) -> torch.Tensor:
    """log softmax(head(hidden) / temperature)[labels] without holding the [N, V] logits: [..., d] -> [...].

    Chunks hold about ``budget_bytes`` of fp32 logits each (at least one token). Equals
    ``gather_logprobs(head(hidden), labels, temperature)`` and has the same gradients (up to float rounding)."""
    lead = labels.shape
    h = hidden.reshape(-1, hidden.shape[-1])  # [N, d]
    chunk = max(1, budget_bytes // (4 * head.out_features))
    out = _ChunkedHeadLogprobs.apply(h, head.weight, head.bias, labels.reshape(-1), float(temperature), chunk)
    return out.reshape(lead)


def _token_logprobs_chunked(model, head, input_ids, attention_mask, temperature, return_entropy, first, budget,
                            inputs_embeds=None):
    """:func:`token_logprobs` through the hidden states: the LM head runs chunk by chunk."""
    hidden = _last_states(model, input_ids, attention_mask, first, inputs_embeds)  # [B, T-first, d]
    logps = F.pad(chunked_head_logprobs(hidden, head, input_ids[:, first:], temperature, budget), (first, 0))
    if not return_entropy:
        return logps
    with torch.no_grad():  # entropy is a diagnostic: computed per chunk, no gradient
        flat = hidden.reshape(-1, hidden.shape[-1])
        chunk = max(1, budget // (4 * head.out_features))
        ent = torch.cat([entropy_from_logits(head(flat[s:s + chunk]), temperature)
                         for s in range(0, flat.shape[0], chunk)]).reshape(hidden.shape[:-1])
    return logps, F.pad(ent, (first, 0))


def _head_logprobs(hidden, head, labels, temperature, budget, return_entropy):
    """[n, d] hidden states -> log-probs of ``labels`` [n] (and entropies [n]); chunked over the budget."""
    if hidden.shape[0] * head.out_features * 4 > budget:
        logps = chunked_head_logprobs(hidden, head, labels, temperature, budget)
        if not return_entropy:
            return logps, None
        with torch.no_grad():
            chunk = max(1, budget // (4 * head.out_features))
            ent = torch.cat([entropy_from_logits(head(hidden[s:s + chunk]), temperature)
                             for s in range(0, hidden.shape[0], chunk)])
        return logps, ent
    logits = head(hidden)  # [n, V]
    logps = gather_logprobs(logits[None], labels[None], temperature)[0]
    return logps, (entropy_from_logits(logits, temperature) if return_entropy else None)


def _token_logprobs_packed(model, head, input_ids, attention_mask, temperature, return_entropy, first, budget):
    """:func:`token_logprobs` with ``padding_free``: one packed row, position ids restarting per sequence."""
    B, T = input_ids.shape
    real = attention_mask.bool()  # [B, T]
    ids = input_ids[real]  # [N] row after row
    pos = position_ids_from_mask(attention_mask)[real]  # [N] 0 at every row's first token
    col = torch.arange(T, device=input_ids.device).expand(B, T)[real]  # [N] each token's column
    out = model(input_ids=ids[None], position_ids=pos[None], attention_mask=None, use_cache=False,
                output_hidden_states=True, logits_to_keep=1)
    hidden = out.hidden_states[-1][0]  # [N, d]
    # token j is predicted by token j-1 when both lie in one row (pos > 0) and its column is one we keep
    target = (pos[1:] > 0) & (col[1:] >= first)  # [N-1]
    logps, ent = _head_logprobs(hidden[:-1][target], head, ids[1:][target], temperature, budget, return_entropy)
    flat = torch.zeros(ids.shape[0], dtype=logps.dtype, device=logps.device)
    flat = flat.index_put((target.nonzero().squeeze(-1) + 1,), logps)  # [N]
    result = torch.zeros(B, T, dtype=logps.dtype, device=logps.device).index_put((real.nonzero(as_tuple=True)), flat)
    if not return_entropy:
        return result
    flat_ent = torch.zeros_like(flat).index_put((target.nonzero().squeeze(-1) + 1,), ent)
    return result, torch.zeros_like(result).index_put(real.nonzero(as_tuple=True), flat_ent)


def final_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, first: int,
                 hidden: torch.Tensor | None = None, hidden_layers: int = 0) -> torch.Tensor:
    """[B, T] -> [B, T - first, d]: the last (normed) hidden states at the positions that predict tokens
    ``first`` .. T-1, i.e. what the LM head reads. ``hidden`` / ``hidden_layers`` as in :func:`token_logprobs`."""
    first = max(int(first), 1)
    positions = position_ids_from_mask(attention_mask)
    if hidden is not None and hidden_layers > 0:
        from alignkit.ops.prefix import only_layers

        with only_layers(model, hidden_layers) as dec:  # the inner decoder ends with the final norm
            out = dec(inputs_embeds=hidden, attention_mask=attention_mask, position_ids=positions, use_cache=False)
        return out.last_hidden_state[:, first - 1:-1]
    return _last_states(model, input_ids, attention_mask, first)


def _last_states(model, input_ids, attention_mask, first: int, inputs_embeds=None) -> torch.Tensor:
    """[B, T - first, d]: the model's last (normed) hidden states at the positions predicting tokens first..T-1."""
    out = model(**_inputs(input_ids, inputs_embeds), attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask), use_cache=False,
                output_hidden_states=True, logits_to_keep=1)
    return out.hidden_states[-1][:, first - 1:-1]


def head_kl_exact(states: torch.Tensor, head: torch.nn.Linear, ref_states: torch.Tensor, ref_head: torch.nn.Linear,
                  temperature: float = 1.0, budget_bytes: int = LOGITS_BUDGET_BYTES) -> torch.Tensor:
    """[..., d], [..., d] -> [...]: KL(softmax(head(states)) || softmax(ref_head(ref_states))) over the whole
    vocabulary (``ops.kl.kl_exact``), token by token. Both heads run on chunks of about ``budget_bytes`` of fp32
    logits, so the [N, V] logits are never held whole."""
    from alignkit.ops.kl import kl_exact

    flat, flat_ref = states.reshape(-1, states.shape[-1]), ref_states.reshape(-1, ref_states.shape[-1])
    chunk = max(1, budget_bytes // (8 * head.out_features))  # two fp32 logit rows per token
    kl = [kl_exact(head(flat[s:s + chunk]), ref_head(flat_ref[s:s + chunk]), temperature)
          for s in range(0, flat.shape[0], chunk)]
    return (torch.cat(kl) if kl else flat.new_zeros(0)).reshape(states.shape[:-1])


def first_response_index(response_mask: torch.Tensor) -> int:
    """Smallest column holding a response token in the batch (0 if there is none)."""
    cols = response_mask.any(dim=0).nonzero()
    return int(cols[0]) if len(cols) else 0


def sequence_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    average: bool = False,
    temperature: float = 1.0,
    padding_free: bool = False,
) -> torch.Tensor:
    """Summed (or per-token averaged) response log-prob: [B]. The DPO reference repo sums."""
    logps = token_logprobs(model, input_ids, attention_mask, temperature,
                           first_index=first_response_index(response_mask), padding_free=padding_free)  # [B, T]
    mask = response_mask.to(logps.dtype)
    total = (logps * mask).sum(-1)
    if average:
        return total / mask.sum(-1).clamp(min=1.0)
    return total
