"""The OpenAI-compatible HTTP API (FastAPI): ``POST /v1/chat/completions`` (JSON or SSE stream), ``GET /v1/models``.

The contract follows OpenAI's Chat Completions API, so the official ``openai`` client (or any tool built on it)
talks to a local checkpoint::

    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="...")
    client.chat.completions.create(model="my-model", messages=[{"role": "user", "content": "Hi"}])

Supported request fields: ``model``, ``messages`` (roles system / developer / user / assistant; content a string or
a list of text parts), ``max_tokens`` / ``max_completion_tokens``, ``temperature`` (0 = greedy), ``top_p``,
``n`` (1), ``stop``, ``seed``, ``logprobs`` + ``top_logprobs``, ``stream`` + ``stream_options.include_usage``.
Other fields OpenAI defines (``user``, penalties, ...) are accepted and ignored.

Errors are OpenAI-shaped, ``{"error": {"message", "type", "param", "code"}}``: 400 for a malformed body or a
value out of range (naming the field), 401 for a missing / wrong API key, 404 for an unknown model or path,
413 for a body over ``serve.max_body_bytes``, 429 when ``serve.max_queue`` requests are already queued.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from alignkit.ops.seeds import derive_seed
from alignkit.serve.engine import GenerationJob, QueueFull, ServingEngine


# ---------------------------------------------------------------- request schema
class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, gt=0)
    max_completion_tokens: int | None = Field(None, gt=0)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    stream: bool = False
    stream_options: StreamOptions | None = None


# ---------------------------------------------------------------- OpenAI-style errors
class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _validation_error(err: ValidationError) -> APIError:
    first = err.errors()[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    got = first.get("input")
    got_s = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
    more = f" ({len(err.errors()) - 1} more error(s))" if len(err.errors()) > 1 else ""
    return APIError(400, f"invalid request: {param}: {first['msg']}{got_s}{more}", param=param,
                    code="invalid_value" if first["type"] != "missing" else "missing_required_parameter")


# ---------------------------------------------------------------- the app
def create_app(engine: ServingEngine, model_name: str, settings, api_key: str | None = None,
               context_length: int | None = None, seed: int = 0) -> FastAPI:
    """The FastAPI app serving ``engine`` as ``model_name``; ``settings``: a :class:`alignkit.config.ServeSection`
    (limits). ``context_length``: prompt + completion tokens the model can take (None: no check)."""
    app = FastAPI(title="alignkit serve", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())
    counter = {"requests": 0}
    tokenizer = engine.tokenizer

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code)

    def check_key(request: Request) -> None:
        if not api_key:
            return
        header = request.headers.get("authorization", "")
        if not header.lower().startswith("bearer "):
            raise APIError(401, "You didn't provide an API key: send 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")
        if not hmac.compare_digest(header[7:].strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")

    @app.get("/v1/models")
    async def list_models(request: Request):
        check_key(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "alignkit"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "pending": engine.pending}

    async def read_request(request: Request) -> ChatRequest:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > settings.max_body_bytes:
            raise APIError(413, f"request body of {declared} bytes exceeds the limit of {settings.max_body_bytes} "
                                "bytes (serve.max_body_bytes)", code="request_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > settings.max_body_bytes:
                raise APIError(413, f"request body exceeds the limit of {settings.max_body_bytes} bytes "
                                    "(serve.max_body_bytes)", code="request_too_large")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}",
                           code="invalid_json")
        try:
            return ChatRequest.model_validate(data)
        except ValidationError as e:
            raise _validation_error(e) from None

    def build_job(req: ChatRequest) -> GenerationJob:
        if req.model != model_name:
            raise APIError(404, f"The model '{req.model}' does not exist; this server serves '{model_name}' "
                                "(see /v1/models).", param="model", code="model_not_found")
        if len(req.messages) > settings.max_messages:
            raise APIError(400, f"too many messages: {len(req.messages)} (this server allows at most "
                                f"{settings.max_messages}, serve.max_messages)", param="messages",
                           code="too_many_messages")
        asked = req.max_completion_tokens or req.max_tokens
        param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        if asked is not None and asked > settings.max_tokens:
            raise APIError(400, f"{param} is too large: {asked}. This server allows at most {settings.max_tokens} "
                                "completion tokens (serve.max_tokens).", param=param, code="invalid_value")
        max_tokens = asked or settings.default_max_tokens
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs", code="invalid_value")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if req.stream and stop:
            raise APIError(400, "stop sequences are not supported with stream=true on this server", param="stop",
                           code="unsupported_parameter")
        if req.stream and req.logprobs:
            raise APIError(400, "logprobs are not supported with stream=true on this server", param="logprobs",
                           code="unsupported_parameter")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # a template that rejects the role order, e.g. two system messages
            raise APIError(400, f"the chat template rejected these messages: {e}", param="messages",
                           code="invalid_value") from None
        prompt_ids = tokenizer.encode(text, add_special_tokens=False)
        if context_length is not None and len(prompt_ids) + max_tokens > context_length:
            raise APIError(400, f"This model's maximum context length is {context_length} tokens. However, you "
                                f"requested {len(prompt_ids) + max_tokens} tokens ({len(prompt_ids)} in the messages, "
                                f"{max_tokens} in the completion).", param="messages",
                           code="context_length_exceeded")
        counter["requests"] += 1
        return GenerationJob(prompt_ids=prompt_ids, max_tokens=max_tokens, temperature=req.temperature,
                             top_p=req.top_p, seed=req.seed if req.seed is not None else derive_seed(seed, counter["requests"]),
                             stop=stop, top_logprobs=(req.top_logprobs or 0) if req.logprobs else None,
                             stream=req.stream)

    def submit(job: GenerationJob) -> GenerationJob:
        try:
            return engine.submit(job)
        except QueueFull as e:
            raise APIError(429, str(e), type_="requests", code="rate_limit_exceeded",
                           headers={"retry-after": "1"}) from None

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_key(request)
        req = await read_request(request)
        job = submit(build_job(req))
        cid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            return StreamingResponse(stream_events(job, cid, now, req), media_type="text/event-stream",
                                     headers={"cache-control": "no-cache"})
        try:
            result = await asyncio.wrap_future(job.future)
        except Exception as e:  # noqa: BLE001 (a generation failure is the server's, not the request's)
            raise APIError(500, f"generation failed: {type(e).__name__}: {e}", type_="server_error") from None
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": result.text},
                                  "finish_reason": result.finish_reason,
                                  "logprobs": None if result.logprobs is None else {"content": result.logprobs}}
        return {"id": cid, "object": "chat.completion", "created": now, "model": model_name, "choices": [choice],
                "usage": _usage(result)}

    async def stream_events(job: GenerationJob, cid: str, now: int, req: ChatRequest):
        def chunk(delta: dict, finish: str | None = None, usage: dict | None = None, choices: bool = True) -> str:
            body = {"id": cid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}] if choices else []}
            if usage is not None:
                body["usage"] = usage
            return f"data: {json.dumps(body)}\n\n"

        yield chunk({"role": "assistant", "content": ""})
        pieces = iter(job.streamer)
        while True:
            piece = await asyncio.to_thread(next, pieces, None)
            if piece is None:
                break
            if piece:
                yield chunk({"content": piece})
        try:
            result = await asyncio.wrap_future(job.future)
        except Exception as e:  # noqa: BLE001 (the stream has started: report in-band, as OpenAI does)
            yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error', 'param': None, 'code': None}})}\n\n"
            return
        yield chunk({}, result.finish_reason)
        if req.stream_options is not None and req.stream_options.include_usage:
            yield chunk({}, usage=_usage(result), choices=False)
        yield "data: [DONE]\n\n"

    return app


def _usage(result) -> dict[str, int]:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}
