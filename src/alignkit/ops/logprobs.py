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


def forward_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int = 0) -> torch.Tensor:
    """Causal-LM logits with padding-aware position ids: [B, T, V], or [B, k, V] for the last k positions."""
    kwargs = {"logits_to_keep": logits_to_keep} if logits_to_keep else {}
    out = model(
        input_ids=input_ids,
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
):
    """Log-prob of each token given its prefix, aligned to ``input_ids``.

    Returns [B, T] where column t is log p(input_ids[:, t] | input_ids[:, :t]); columns before
    ``first_index`` (at least column 0, which has no prediction) are 0. Mask it with ``response_mask``.
    ``first_index`` = the first response column lets the LM head skip the prompt positions
    (``logits_to_keep``): the vocabulary projection is a fifth of a small model's forward.
    """
    T = input_ids.shape[1]
    first = max(int(first_index), 1)
    keep = T - first + 1  # logits at positions first-1 .. T-1 predict tokens first .. T
    logits = forward_logits(model, input_ids, attention_mask, logits_to_keep=keep if first > 1 else 0)
    logits = logits[:, -keep:]  # [B, keep, V] (a model that ignores logits_to_keep returns all T)
    shifted = gather_logprobs(logits[:, :-1], input_ids[:, first:], temperature)  # [B, T-first]
    logps = F.pad(shifted, (first, 0), value=0.0)  # [B, T]
    if not return_entropy:
        return logps
    ent = F.pad(entropy_from_logits(logits[:, :-1], temperature), (first, 0), value=0.0)
    return logps, ent


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
) -> torch.Tensor:
    """Summed (or per-token averaged) response log-prob: [B]. The DPO reference repo sums."""
    logps = token_logprobs(model, input_ids, attention_mask, temperature,
                           first_index=first_response_index(response_mask))  # [B, T]
    mask = response_mask.to(logps.dtype)
    total = (logps * mask).sum(-1)
    if average:
        return total / mask.sum(-1).clamp(min=1.0)
    return total
