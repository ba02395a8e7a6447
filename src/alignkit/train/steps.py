"""Step functions shared by several algorithms: ``step_fn(model, batch) -> StepOutput`` (``train.loop``)."""

from __future__ import annotations

from alignkit.losses import sft_loss
from alignkit.ops.logprobs import first_response_index, token_logprobs
from alignkit.train.loop import StepOutput


def sft_step(model, batch: dict, padding_free: bool = False) -> StepOutput:
    """Mean SFT loss (NLL of the response tokens, EOS included) of a ``collate_sft`` batch, + nll/token."""
    logps = token_logprobs(model, batch["input_ids"], batch["attention_mask"],
                           first_index=first_response_index(batch["response_mask"]),
                           padding_free=padding_free)  # [B, T]
    losses = sft_loss(logps, batch["response_mask"])  # [B]
    nll_sum = float(-(logps.detach() * batch["response_mask"]).sum())
    return StepOutput(
        loss=losses.mean(),
        metrics={"nll/token": (nll_sum, int(batch["response_mask"].sum()))},  # (sum, count): per token over the step
        num_tokens=int(batch["attention_mask"].sum()),
    )
