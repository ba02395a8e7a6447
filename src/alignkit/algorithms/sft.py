"""Supervised fine-tuning on demonstrations (InstructGPT step 1).

Loss: mean negative log-likelihood of the response tokens (EOS included); prompt tokens
are masked out. Data: ``{"prompt", "completion"}`` or ``{"messages": [...]}``.
"""

from __future__ import annotations

from functools import partial

from alignkit.config import SFTConfig
from alignkit.data.collate import collate_sft
from alignkit.data.pipeline import prepare_data
from alignkit.models.loading import load_policy, load_tokenizer
from alignkit.train.loop import finish_run, train_loop
from alignkit.train.steps import sft_step
from alignkit.train.run import evaluate, log, prepare_run_dir, set_seed


def sft_eval_metrics(model, batch: dict) -> tuple[int, dict[str, float]]:
    out = sft_step(model, batch)  # evaluation stays padded: it takes no backward, and its numbers stay comparable
    nll_sum, n_tokens = out.metrics["nll/token"]
    return batch["input_ids"].shape[0], {"loss": float(out.loss), "nll/token": nll_sum / max(n_tokens, 1)}


def train(cfg: SFTConfig, resume: bool = False) -> dict:
    run_dir = prepare_run_dir(cfg, cfg.train.output_dir, resume, "sft")
    set_seed(cfg.train.seed)
    tokenizer = load_tokenizer(cfg.model.name_or_path)
    data = prepare_data(cfg.data, "sft", tokenizer, cfg.train.seed, log)
    model = load_policy(cfg.model, tokenizer)
    collate = partial(collate_sft, pad_token_id=tokenizer.pad_token_id)
    eval_bs = cfg.train.eval_batch_size or cfg.train.batch_size

    def eval_fn(m):
        return evaluate(m, data.eval, collate, sft_eval_metrics, eval_bs) if data.eval else None

    result = train_loop(
        cfg.train, model=model, train_examples=data.train, collate_fn=collate,
        step_fn=partial(sft_step, padding_free=cfg.train.padding_free),
        run_dir=run_dir, eval_fn=eval_fn, resume=resume, desc="sft",
    )
    finish_run(cfg.train, model, tokenizer, run_dir, result, data.report)
    log(f"sft done: {result.get('model_dir', run_dir)}")
    return result
