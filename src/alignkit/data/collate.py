"""Collators: lists of tokenised examples -> padded ``LongTensor`` batches.

Training batches are right-padded (``attention_mask`` 0 and ``response_mask`` 0 on padding);
generation batches are left-padded so every prompt ends at the last column.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def pad_sequences(seqs: list[list[int]], pad_value: int, side: str = "right") -> Tensor:
    """Stack ``seqs`` into a ``[B, T]`` LongTensor, ``T = max len``, filling with ``pad_value`` on ``side``."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if not seqs:
        raise ValueError("cannot pad an empty list of sequences")
    T = max(len(s) for s in seqs)
    out = torch.full((len(seqs), T), pad_value, dtype=torch.long)  # [B, T]
    for i, s in enumerate(seqs):
        if s:
            row = torch.as_tensor(s, dtype=torch.long)
            if side == "right":
                out[i, : len(s)] = row
            else:
                out[i, T - len(s):] = row
    return out


def _check_pad(pad_token_id: int | None) -> int:
    if pad_token_id is None:
        raise ValueError("pad_token_id is None; set tokenizer.pad_token (e.g. to a token other than eos)")
    return pad_token_id


def _rows(ids: list[list[int]], masks: list[list[int]], pad_token_id: int, side: str = "right") -> dict[str, Tensor]:
    return {
        "input_ids": pad_sequences(ids, pad_token_id, side),  # [B, T]
        "attention_mask": pad_sequences([[1] * len(s) for s in ids], 0, side),  # [B, T]
        "response_mask": pad_sequences(masks, 0, side),  # [B, T]
    }


def collate_sft(examples: list[dict[str, Any]], pad_token_id: int) -> dict[str, Tensor]:
    """``{"input_ids", "attention_mask", "response_mask"}``, each ``[B, T]``, right-padded."""
    pad = _check_pad(pad_token_id)
    return _rows([e["input_ids"] for e in examples], [e["response_mask"] for e in examples], pad)


def collate_preference(examples: list[dict[str, Any]], pad_token_id: int) -> dict[str, Tensor]:
    """The concatenated forward: rows ``0..B-1`` are chosen, rows ``B..2B-1`` the rejected of the same pairs,
    all right-padded to one length. ``input_ids``/``attention_mask``/``response_mask``: ``[2B, T]``;
    ``margin``: ``[B]`` float; ``group``: ``[B]`` long."""
    pad = _check_pad(pad_token_id)
    ids = [e["chosen_input_ids"] for e in examples] + [e["rejected_input_ids"] for e in examples]
    masks = [e["chosen_response_mask"] for e in examples] + [e["rejected_response_mask"] for e in examples]
    batch = _rows(ids, masks, pad)
    batch["margin"] = torch.tensor([float(e.get("margin", 0.0)) for e in examples], dtype=torch.float32)  # [B]
    batch["group"] = torch.tensor([int(e.get("group", 0)) for e in examples], dtype=torch.long)  # [B]
    return batch


def collate_prompts(examples: list[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """``{"input_ids", "attention_mask"}`` ``[B, T]`` LEFT-padded for generation, plus ``extras``: list[dict]."""
    pad = _check_pad(pad_token_id)
    ids = [e["prompt_input_ids"] for e in examples]
    return {
        "input_ids": pad_sequences(ids, pad, "left"),  # [B, T]
        "attention_mask": pad_sequences([[1] * len(s) for s in ids], 0, "left"),  # [B, T]
        "extras": [e.get("extras", {}) for e in examples],
    }
