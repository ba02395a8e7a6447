"""Load -> validate -> split -> tokenise, with every count reported: the data path of every algorithm."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from alignkit.config import DataConfig
from alignkit.data.formats import load_examples
from alignkit.data.tokenize import tokenize_kto, tokenize_preference, tokenize_prompts, tokenize_sft, tokenize_stepwise

TOKENIZERS = {
    "sft": tokenize_sft,
    "preference": tokenize_preference,
    "kto": tokenize_kto,
    "prompt": tokenize_prompts,
    "stepwise": tokenize_stepwise,
}


@dataclass
class PreparedData:
    train: list[dict]
    eval: list[dict]
    report: dict = field(default_factory=dict)


def split_train_eval(examples: list, data: DataConfig, seed: int) -> tuple[list, list]:
    """Hold out ``data.eval_fraction`` of train (deterministic in ``seed``) when no eval file is given."""
    if data.eval is not None or data.eval_fraction == 0.0 or len(examples) < 2:
        return examples, []
    n_eval = max(1, int(round(len(examples) * data.eval_fraction)))
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed + 12345)).tolist()
    held = set(order[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def prepare_data(data: DataConfig, kind: str, tokenizer, seed: int, log=print) -> PreparedData:
    if not data.train:
        raise ValueError("data.train is not set: give a file path, a saved datasets dir, or builtin:<name>")
    train_raw, stats = load_examples(data.train, kind, on_error=data.on_error, split="train", limit=data.limit)
    report: dict = {"train_file": data.train, "n_read": stats.n_read, "n_skipped": stats.n_skipped}
    if stats.n_skipped:
        log(f"data.on_error=skip: skipped {stats.n_skipped} of {stats.n_read} records in {data.train}; first reasons:")
        for reason in stats.skipped_reasons[:5]:
            log(f"  {reason}")
    if stats.n_pairs_from_rankings:
        log(f"rankings expanded into {stats.n_pairs_from_rankings} pairs")
    if data.eval is not None:
        eval_raw, estats = load_examples(data.eval, kind, on_error=data.on_error, split="test")
        report.update(eval_file=data.eval, eval_n_skipped=estats.n_skipped)
    else:
        train_raw, eval_raw = split_train_eval(train_raw, data, seed)
    tok_fn = TOKENIZERS[kind]
    train, tstats = tok_fn(train_raw, tokenizer, data)
    log(f"train: {len(train)} examples; {tstats.summary()}")
    report["train_truncation"] = vars(tstats)
    evaluation: list[dict] = []
    if eval_raw:
        evaluation, estats_t = tok_fn(eval_raw, tokenizer, data)
        log(f"eval: {len(evaluation)} examples; {estats_t.summary()}")
        report["eval_truncation"] = vars(estats_t)
    report.update(n_train=len(train), n_eval=len(evaluation))
    return PreparedData(train, evaluation, report)
