"""``alignkit serve``: an OpenAI-compatible chat server for a local checkpoint (FastAPI + uvicorn).

    alignkit serve model.name_or_path=runs/dpo/model serve.port=8000
    # then, from any OpenAI client:
    openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused").chat.completions.create(
        model="runs/dpo/model", messages=[{"role": "user", "content": "Hi"}])

:func:`build_app` loads the model and returns the app (tests serve it on a free port); :func:`run` serves it.
"""

from __future__ import annotations

import os

from alignkit.config import ServeConfig
from alignkit.serve.app import create_app
from alignkit.serve.engine import ServingEngine

__all__ = ["build_app", "run", "create_app", "ServingEngine"]


def build_app(cfg: ServeConfig):
    """Load ``cfg.model`` (frozen, eval mode; ``embedded`` / ``tiny-random`` / a path / a hub id) and return
    ``(app, engine)``."""
    import torch

    from alignkit.models.loading import load_policy, load_tokenizer

    tokenizer = load_tokenizer(cfg.model.name_or_path, padding_side="left")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"model {cfg.model.name_or_path!r} has no chat template (tokenizer_config.json "
                         "'chat_template'); alignkit serve renders chat messages with it")
    model = load_policy(cfg.model, tokenizer, trainable=False)
    if torch.cuda.is_available():
        model = model.to("cuda")
    s = cfg.serve
    engine = ServingEngine(model, tokenizer, max_queue=s.max_queue, max_batch_size=s.max_batch_size,
                           batch_wait_ms=s.batch_wait_ms)
    context = getattr(model.config, "max_position_embeddings", None)
    api_key = s.api_key or os.environ.get("ALIGNKIT_API_KEY") or None
    app = create_app(engine, s.served_model_name or cfg.model.name_or_path, s, api_key=api_key,
                     context_length=context, seed=cfg.seed)
    return app, engine


def run(cfg: ServeConfig, resume: bool = False) -> None:
    """Serve until interrupted (Ctrl-C)."""
    import uvicorn

    app, engine = build_app(cfg)
    s = cfg.serve
    name = s.served_model_name or cfg.model.name_or_path
    key = "an API key (Bearer)" if (s.api_key or os.environ.get("ALIGNKIT_API_KEY")) else "no API key"
    print(f"alignkit serve: model {name!r} at http://{s.host}:{s.port}/v1 ({key}); Ctrl-C stops", flush=True)
    try:
        uvicorn.run(app, host=s.host, port=s.port, log_level="info")
    finally:
        engine.close()
