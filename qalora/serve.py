"""An OpenAI-compatible HTTP API for one finished model, on the runtime the chat uses.

    python -m qalora serve RUN_DIR [--host 127.0.0.1] [--port 8000]

Routes: ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/chat/completions`` and
``POST /v1/completions``, each streaming (server-sent events, ``data: {...}`` chunks ending with
``data: [DONE]``) or not. The model id is the run's folder name. Bad requests get OpenAI's error
shape, ``{"error": {"message", "type", "param", "code"}}``, with 400 (invalid request, including a
context overflow), 404 (unknown model or route) or 405. Sampling defaults are OpenAI's
(temperature 1, top-p 1); ``temperature: 0`` is greedy, as in the app's chat. The runtime's name
is sent as ``system_fingerprint`` and in the ``X-QALoRA-Runtime`` header.

Built on Starlette (installed with Gradio); ``qalora.cli`` runs it with uvicorn. Generation runs in
worker threads, one request at a time per model (the runtime's lock), so the event loop stays free.
"""
from __future__ import annotations

import contextlib
import json
import time
import uuid
from typing import Iterator

from .runtime import ContextError, Generation, Runtime

DEFAULT_MAX_TOKENS = {"chat": 512, "completion": 16}  # OpenAI's completions default is 16
MAX_STOP = 4
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            (low < value if low_open else low <= value) and value <= high):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise APIError(400, f"{value!r} is not valid for '{name}': expected a number in {interval}.", name,
                       "invalid_value")
    return float(value)


def _integer(body: dict, name: str, low: int = 1) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise APIError(400, f"{value!r} is not valid for '{name}': expected an integer of at least {low}.", name,
                       "invalid_value")
    return value


def _text(content, where: str) -> str:
    """A message's content: a string, or a list of ``{"type": "text", "text": ...}`` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise APIError(400, f"{where}.content must be a string or a list of text parts ({{'type': 'text', 'text': "
                        "...}); this model reads text only.", "messages", "invalid_value")


def parse_messages(value) -> list[dict]:
    """OpenAI chat messages as ``[{"role", "content"}]`` with text content; 400 for anything else."""
    if not isinstance(value, list) or not value:
        raise APIError(400, "'messages' must be a non-empty list of {'role': ..., 'content': ...} objects.",
                       "messages", "invalid_value" if value is not None else "missing_required_parameter")
    messages = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or "content" not in m or m.get("role") not in ROLES:
            raise APIError(400, f"{where} must be an object with a 'role' (one of {', '.join(ROLES)}) and a "
                                f"'content'; got {json.dumps(m)[:200]}.", "messages", "invalid_value")
        messages.append({"role": ROLES[m["role"]], "content": _text(m["content"], where)})
    return messages


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is None:
        return []
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) for s in stop):
        raise APIError(400, f"'stop' must be a string or a list of at most {MAX_STOP} strings.", "stop",
                       "invalid_value")
    return stop


class Endpoint:
    """One model behind the API: request checks, then generation on its runtime."""

    def __init__(self, runtime: Runtime, model_id: str):
        self.runtime, self.model_id, self.created = runtime, model_id, int(time.time())

    def model(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "qalora"}

    def check_model(self, body: dict) -> None:
        name = body.get("model")
        if not isinstance(name, str) or not name:
            raise APIError(400, "you must provide a model parameter (GET /v1/models lists it).", "model",
                           "missing_required_parameter")
        if name != self.model_id:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{self.model_id}`.",
                           "model", "model_not_found")

    def prepare(self, body: dict, kind: str) -> tuple[list[int], dict]:
        """``(prompt ids, generation arguments)`` for a chat or completion request, or APIError."""
        self.check_model(body)
        if _integer(body, "n") not in (None, 1):
            raise APIError(400, "only n=1 is supported: one model answers once per request.", "n", "invalid_value")
        if kind == "chat":
            messages = parse_messages(body.get("messages"))
            try:
                ids, where = self.runtime.chat_ids(messages), "messages"
            except Exception as exc:  # the chat template refuses this conversation (e.g. role order)
                raise APIError(400, f"the model's chat template cannot render these messages: {exc}", "messages",
                               "invalid_value") from exc
        else:
            prompt = body.get("prompt")
            prompt = prompt[0] if isinstance(prompt, list) and len(prompt) == 1 else prompt
            if not isinstance(prompt, str):
                raise APIError(400, "'prompt' must be a string (or a list of one string).", "prompt",
                               "invalid_value" if prompt is not None else "missing_required_parameter")
            ids, where = self.runtime.text_ids(prompt), "prompt"
        asked = _integer(body, "max_completion_tokens") or _integer(body, "max_tokens")
        room = self.runtime.context_length - len(ids)
        max_tokens = asked or max(min(DEFAULT_MAX_TOKENS[kind], room), 1)
        try:
            self.runtime.check_fits(len(ids), max_tokens)
        except ContextError as exc:
            param = "max_tokens" if asked and room > 0 else where
            raise APIError(400, str(exc), param, "context_length_exceeded") from exc
        generation = dict(max_new_tokens=max_tokens, temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                          top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True), stop=_stop(body),
                          seed=_integer(body, "seed", low=0))
        return ids, generation

    def _head(self, kind: str, rid: str) -> dict:
        obj = {"chat": "chat.completion", "completion": "text_completion"}[kind]
        return {"id": rid, "object": obj, "created": int(time.time()), "model": self.model_id,
                "system_fingerprint": self.runtime.name}

    @staticmethod
    def _usage(g: Generation) -> dict:
        return {"prompt_tokens": g.prompt_tokens, "completion_tokens": g.completion_tokens,
                "total_tokens": g.prompt_tokens + g.completion_tokens}

    def respond(self, kind: str, ids: list[int], generation: dict) -> dict:
        g = self.runtime.generate(ids, **generation)
        rid = _new_id(kind)
        choice = ({"message": {"role": "assistant", "content": g.text}} if kind == "chat" else {"text": g.text})
        return {**self._head(kind, rid), "choices": [{"index": 0, **choice, "logprobs": None,
                                                      "finish_reason": g.finish_reason}], "usage": self._usage(g)}

    def chunks(self, kind: str, ids: list[int], generation: dict, include_usage: bool) -> Iterator[dict]:
        """The streamed reply as OpenAI chunks: text deltas, then the finish reason, then usage if asked."""
        rid = _new_id(kind)
        head = {**self._head(kind, rid), "object": "chat.completion.chunk" if kind == "chat" else "text_completion"}

        def chunk(delta: str | None, finish=None, role=False) -> dict:
            if kind == "chat":
                d = {"role": "assistant", "content": ""} if role else ({} if delta is None else {"content": delta})
                choice = {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
            return {**head, "choices": [choice], **({"usage": None} if include_usage else {})}

        if kind == "chat":
            yield chunk(None, role=True)
        sent, last = "", None
        stream = self.runtime.stream(ids, **generation)
        try:
            for last in stream:
                if len(last.text) > len(sent):
                    yield chunk(last.text[len(sent):])
                    sent = last.text
        finally:
            stream.close()
        yield chunk(None, finish=last.finish_reason)
        if include_usage:
            yield {**head, "choices": [], "usage": self._usage(last)}


def _new_id(kind: str) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"


def build_app(runtime: Runtime, model_id: str):
    """The Starlette application serving ``runtime`` as ``model_id``."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    endpoint = Endpoint(runtime, model_id)
    headers = {"X-QALoRA-Runtime": runtime.name}

    def error(exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    async def models(request):
        return JSONResponse({"object": "list", "data": [endpoint.model()]}, headers=headers)

    async def model(request):
        name = request.path_params["name"]
        if name != model_id:
            return error(APIError(404, f"The model `{name}` does not exist; this server serves `{model_id}`.",
                                  "model", "model_not_found"))
        return JSONResponse(endpoint.model(), headers=headers)

    async def read_body(request) -> dict:
        try:
            body = json.loads(await request.body() or b"null")
        except ValueError as exc:
            raise APIError(400, f"the request body is not valid JSON ({exc}).") from exc
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object.")
        return body

    def handler(kind: str):
        async def handle(request):
            try:
                body = await read_body(request)
                ids, generation = endpoint.prepare(body, kind)
                stream = body.get("stream") or False
                if not isinstance(stream, bool):
                    raise APIError(400, "'stream' must be true or false.", "stream", "invalid_value")
                options = body.get("stream_options") or {}
                include_usage = bool(isinstance(options, dict) and options.get("include_usage"))
                if not stream:
                    return JSONResponse(await run_in_threadpool(endpoint.respond, kind, ids, generation),
                                        headers=headers)
            except APIError as exc:
                return error(exc)
            return StreamingResponse(_sse(endpoint.chunks(kind, ids, generation, include_usage)),
                                     media_type="text/event-stream", headers={**headers, "Cache-Control": "no-cache"})
        return handle

    async def _sse(chunks: Iterator[dict]):
        """Server-sent events from a blocking iterator, each ``next`` in a worker thread."""
        done = object()
        try:
            while (item := await run_in_threadpool(next, chunks, done)) is not done:
                yield f"data: {json.dumps(item)}\n\n"
        except Exception as exc:  # headers are sent: report in the stream, OpenAI style
            yield f"data: {json.dumps(APIError(500, str(exc), kind='server_error').body())}\n\n"
        finally:
            with contextlib.suppress(ValueError):  # still running in a thread: it closes when collected
                chunks.close()
        yield "data: [DONE]\n\n"

    async def http_error(request, exc: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = (f"{request.method} {request.url.path} is not a route of this server; it serves "
                   "/v1/models, /v1/chat/completions and /v1/completions.")
        return error(APIError(exc.status_code, message, None, code))

    routes = [Route("/v1/models", models), Route("/v1/models/{name:path}", model),
              Route("/v1/chat/completions", handler("chat"), methods=["POST"]),
              Route("/v1/completions", handler("completion"), methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error})
