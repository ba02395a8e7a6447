"""Score (prompt, response) pairs with a trained reward model.

REFERENCES (PPO; Stiennon et al. 2020, Ouyang et al. 2022, Huang et al. 2024): the reward
model sees prompt + response and the score is its output at the LAST REAL token,

    r(x, y) = w · h_L[t*],   t* = max{t : attention_mask[t] = 1},

read with position ids derived from the attention mask, so a sequence scores the same
whether its batch pads it on the left (prompt), on the right (response), both, or not at all.
``transformers``' own pooling finds the last token by comparing ids with ``pad_token_id``,
which fails when a real token equals the pad id; decoder reward models are therefore scored
here with the base model + head at t*. Encoder classifiers (CLS pooling, e.g. MiniLM) get their
real tokens packed to the left and are run through their own forward.

Optional normalisation (Ziegler et al. 2019; Stiennon et al. 2020): reference-policy samples
get mean 0, std 1 via ``score = gain * raw + bias``; gain/bias are stored in the model config
as ``alignkit_reward_norm = {"gain": g, "bias": b}``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from alignkit.ops.logprobs import position_ids_from_mask
from alignkit.ops.stats import last_index

NORM_ATTR = "alignkit_reward_norm"


def _plain_model(model):
    """Strip DDP/DeepSpeed (``.module``) and peft (``get_base_model``; LoRA layers stay active)."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    if hasattr(model, "get_base_model") and hasattr(model, "peft_config"):
        model = model.get_base_model()
    return model


def pack_left(input_ids: Tensor, attention_mask: Tensor, pad_token_id: int) -> tuple[Tensor, Tensor]:
    """Move each row's real tokens to the front (order kept); pads after them. [B, T] -> [B, T]."""
    keep = attention_mask != 0  # [B, T]
    order = torch.sort((~keep).long(), dim=1, stable=True).indices  # real tokens first, stable
    packed_ids = input_ids.gather(1, order).masked_fill(~keep.gather(1, order), pad_token_id)
    return packed_ids, keep.gather(1, order).long()


class RewardModelScorer:
    """A frozen sequence-classification reward model used as a reward function."""

    def __init__(
        self, model, tokenizer, batch_size: int = 16, normalize: bool = True, name: str = "reward_model",
        head: int = 0,
    ):
        if batch_size < 1:
            raise ValueError(f"RewardModelScorer batch_size must be >= 1, got {batch_size}")
        if tokenizer.eos_token is None:
            raise ValueError(
                "RewardModelScorer needs a tokenizer with an eos_token (appended to each completion)"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.normalize = normalize
        self.name = name
        self.head = head
        """Which output is the score (a multi-head model's objective; 0 for an ordinary reward model)."""

    # ------------------------------------------------------------ normalisation
    @property
    def norm(self) -> tuple[Tensor, Tensor] | None:
        """(gain [H], bias [H]) stored with the model (one float each, or one per head), or None."""
        cfg = getattr(_plain_model(self.model), "config", None)
        stored = getattr(cfg, NORM_ATTR, None)
        if stored is None:
            return None
        try:
            gain = torch.as_tensor(stored["gain"], dtype=torch.float32).flatten()
            bias = torch.as_tensor(stored["bias"], dtype=torch.float32).flatten()
            if gain.shape != bias.shape or gain.numel() == 0:
                raise ValueError
        except (KeyError, TypeError, ValueError, RuntimeError):
            raise ValueError(
                f"reward model config has an invalid {NORM_ATTR!r}: {stored!r} "
                "(expected {'gain': g, 'bias': b}, floats or one list entry per head)"
            ) from None
        return gain, bias

    @property
    def head_names(self) -> list[str]:
        """The names of the model's outputs (``config.id2label``; several for a multi-objective or heads-ensemble
        model trained with ``rm.heads`` / ``rm.ensemble_mode: heads``)."""
        cfg = getattr(_plain_model(self.model), "config", None)
        id2label = getattr(cfg, "id2label", None) or {0: "score"}
        return [str(id2label[i]) for i in sorted(int(k) for k in id2label)]

    def _apply_norm(self, raw: Tensor) -> Tensor:
        """raw [B, H] -> gain * raw + bias (per head) when normalising."""
        norm = self.norm if self.normalize else None
        if norm is None:
            return raw
        gain, bias = (t.to(raw.device) for t in norm)  # [H] or [1]
        return gain * raw + bias

    # ------------------------------------------------------------ scoring
    def _raw_scores(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """[B, T] -> [B, H]: every output of the model at the last real token."""
        plain = _plain_model(self.model)
        head = getattr(plain, "score", None)
        base = getattr(plain, getattr(plain, "base_model_prefix", ""), None)
        if isinstance(head, torch.nn.Module) and isinstance(base, torch.nn.Module):  # decoder: read at t*
            hidden = base(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask),
                use_cache=False,
            ).last_hidden_state  # [B, T, d]
            t_star = last_index(attention_mask)  # [B]
            h_last = hidden[torch.arange(hidden.shape[0], device=hidden.device), t_star]  # [B, d]
            return head(h_last)  # [B, H]
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        packed_ids, packed_mask = pack_left(input_ids, attention_mask, pad_id)
        return self.model(input_ids=packed_ids, attention_mask=packed_mask).logits  # [B, H]

    def score_heads_ids(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """[B, T] ids + mask (pads anywhere) -> [B, H] float32 scores of every head (normalised if configured)."""
        device = next(self.model.parameters()).device
        out = []
        with torch.no_grad():
            for start in range(0, input_ids.shape[0], self.batch_size):
                ids = input_ids[start : start + self.batch_size].to(device)
                mask = attention_mask[start : start + self.batch_size].to(device)
                out.append(self._raw_scores(ids, mask).float())
        return self._apply_norm(torch.cat(out, dim=0))

    def score_ids(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """[B, T] ids + mask (pads anywhere) -> [B] float32 scores of head ``self.head`` (normalised if configured)."""
        return self.score_heads_ids(input_ids, attention_mask)[:, self.head]

    def heads(self, prompts: list[str], completions: list[str]) -> Tensor:
        """[B, H] scores of every head (CPU)."""
        if not prompts:
            return torch.zeros(0, len(self.head_names))
        ids, mask = self.tokenize(prompts, completions)
        return self.score_heads_ids(ids, mask).cpu()

    def render(self, prompt: str, completion: str) -> str:
        """prompt text + completion + EOS (EOS not doubled when the completion already ends with it)."""
        eos = self.tokenizer.eos_token
        return prompt + completion + ("" if completion.endswith(eos) else eos)

    def tokenize(self, prompts: list[str], completions: list[str]) -> tuple[Tensor, Tensor]:
        """Rendered texts -> right-padded ids and mask [B, T] (no special tokens added beyond the text)."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
        seqs = [
            self.tokenizer(self.render(p, c), add_special_tokens=False)["input_ids"]
            for p, c in zip(prompts, completions)
        ]
        width = max(len(s) for s in seqs)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.stack(
            [F.pad(torch.tensor(s, dtype=torch.long), (0, width - len(s)), value=pad_id) for s in seqs]
        )
        mask = torch.stack([F.pad(torch.ones(len(s), dtype=torch.long), (0, width - len(s))) for s in seqs])
        return ids, mask

    def __call__(
        self, prompts: list[str], completions: list[str], extras: list[dict] | None = None
    ) -> Tensor:
        if not prompts:
            return torch.zeros(0)
        ids, mask = self.tokenize(prompts, completions)
        return self.score_ids(ids, mask).cpu()


def load_reward_model_scorer(path: str, batch_size: int = 16, normalize: bool = True) -> RewardModelScorer:
    """Load a trained reward model (frozen, eval mode) and its tokenizer from ``path``."""
    from alignkit.config import ModelConfig
    from alignkit.models.loading import load_reward_model, load_tokenizer, resolve_path

    tokenizer = load_tokenizer(path)
    model = load_reward_model(ModelConfig(name_or_path=path), tokenizer, trainable=False)
    archs = getattr(model.config, "architectures", None) or []
    if not any("SequenceClassification" in a for a in archs):
        raise ValueError(
            f"{path!r} ({resolve_path(path)}) is not a reward model checkpoint (architectures={archs}); "
            "its score head would be random. Train one with `alignkit rm` and give that output directory."
        )
    return RewardModelScorer(model, tokenizer, batch_size=batch_size, normalize=normalize)
