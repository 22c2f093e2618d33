"""An OpenAI-compatible HTTP API for one finished model, on the runtime the chat uses.

    python -m qalora serve RUN_DIR [--host 127.0.0.1] [--port 8000]

Routes: ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/chat/completions`` and
``POST /v1/completions``, each streaming (server-sent events, ``data: {...}`` chunks ending with
``data: [DONE]``) or not. The model id is the run's folder name. Bad requests get OpenAI's error
shape, ``{"error": {"message", "type", "param", "code"}}``, with 400 (invalid request, including a
context overflow), 404 (unknown model or route) or 405. Sampling defaults are OpenAI's
(temperature 1, top-p 1); ``temperature: 0`` is greedy, as in the app's chat. The runtime's name
is sent as ``system_fingerprint`` and in the ``X-QALoRA-Runtime`` header.

Built on Starlette (installed with Gradio); ``qalora.cli`` runs it with uvicorn. Generation runs a
token at a time in worker threads, one request at a time per model (the runtime's lock), so the
event loop stays free. What keeps it standing:

- an API key (``build_app(api_key=...)``, ``--api-key`` / ``QALORA_API_KEY``), sent as
  ``Authorization: Bearer KEY`` and compared in constant time; ``qalora serve`` refuses to listen
  beyond loopback without one unless told ``--no-auth``;
- a bounded wait: past ``max_waiting`` requests waiting for the model, a request is answered 503
  with ``Retry-After`` at once instead of queueing without end;
- a client that disconnects stops its generation within a token, and frees the model;
- a request timeout: a request that has waited and generated for ``timeout_s`` seconds ends (504,
  or an error event in a stream).
"""
from __future__ import annotations

import hmac
import json
import threading
import time
import uuid

import anyio
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, StreamingResponse

from qalora.deployment.runtime.base import Busy, ContextError, Generation, Runtime

DEFAULT_MAX_TOKENS = {"chat": 512, "completion": 16}  # OpenAI's completions default is 16
MAX_WAITING = 32  # requests waiting for the model beyond the one it answers; more get 503 at once
TIMEOUT_S = 600.0  # one request's wait and generation together
RETRY_AFTER_S = 2
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

    def response(self, kind: str, g: Generation) -> dict:
        """The non-streamed body of a finished reply."""
        choice = ({"message": {"role": "assistant", "content": g.text}} if kind == "chat" else {"text": g.text})
        return {**self._head(kind, _new_id(kind)), "choices": [{"index": 0, **choice, "logprobs": None,
                                                                "finish_reason": g.finish_reason}],
                "usage": self._usage(g)}

    def chunker(self, kind: str, include_usage: bool):
        """``chunk(delta, finish=None, role=False)`` building the stream's OpenAI chunks, and
        ``usage(g)`` for its last chunk when asked."""
        head = {**self._head(kind, _new_id(kind)),
                "object": "chat.completion.chunk" if kind == "chat" else "text_completion"}

        def chunk(delta: str | None, finish=None, role=False) -> dict:
            if kind == "chat":
                d = {"role": "assistant", "content": ""} if role else ({} if delta is None else {"content": delta})
                choice = {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
            return {**head, "choices": [choice], **({"usage": None} if include_usage else {})}

        def usage(g: Generation) -> dict:
            return {**head, "choices": [], "usage": self._usage(g)}

        return chunk, usage


class _Reply:
    """One generation driven from the event loop a token at a time, each step in a worker thread.

    :meth:`close` waits for a step in flight (at most one token), then ends the runtime's stream,
    which frees the model for the next request.
    """

    def __init__(self, runtime: Runtime, ids: list[int], generation: dict, deadline: float):
        self.deadline = deadline
        self._stream = runtime.stream(ids, **generation, wait_s=deadline - time.monotonic())
        self._lock = threading.Lock()
        self.timed_out = False

    def step(self) -> Generation | None:
        """The reply so far (``finish_reason`` set on the last), None once it ended or timed out."""
        with self._lock:
            if time.monotonic() > self.deadline:
                self.timed_out = True
                return None
            return next(self._stream, None)

    def close(self) -> None:
        with self._lock:
            self._stream.close()


class _Gate:
    """Admits at most ``1 + max_waiting`` requests at a time (the one answered, the rest waiting)."""

    def __init__(self, max_waiting: int):
        self.limit, self.inside, self._lock = max_waiting + 1, 0, threading.Lock()

    def enter(self) -> bool:
        with self._lock:
            if self.inside >= self.limit:
                return False
            self.inside += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self.inside -= 1


def _new_id(kind: str) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"


async def _read_body(request) -> dict:
    """The request's JSON object, or APIError 400."""
    try:
        body = json.loads(await request.body() or b"null")
    except ValueError as exc:
        raise APIError(400, f"the request body is not valid JSON ({exc}).") from exc
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object.")
    return body


def _stream_options(body: dict) -> tuple[bool, bool]:
    """``(stream, include_usage)`` of a generation request, or APIError 400."""
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise APIError(400, "'stream' must be true or false.", "stream", "invalid_value")
    options = body.get("stream_options") or {}
    return stream, bool(isinstance(options, dict) and options.get("include_usage"))


class _Server:
    """The routes of one served model (see the module docstring) and what guards them: the API key,
    the bounded wait for the model and the request timeout."""

    def __init__(self, endpoint: Endpoint, api_key: str | None, max_waiting: int, timeout_s: float):
        self.endpoint, self.max_waiting, self.timeout_s = endpoint, max_waiting, timeout_s
        self.headers = {"X-QALoRA-Runtime": endpoint.runtime.name}
        self.gate = _Gate(max_waiting)
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    def error(self, exc: APIError, extra: dict | None = None):
        return JSONResponse(exc.body(), status_code=exc.status, headers={**self.headers, **(extra or {})})

    def busy(self, why: str):
        return self.error(APIError(503, f"the server is busy: {why}; retry in a few seconds.", None, "server_busy",
                                   "server_error"), {"Retry-After": str(RETRY_AFTER_S)})

    def refused(self, request):
        """401 unless the request carries the API key (constant-time comparison); else None."""
        if self.expected is None:
            return None
        given = request.headers.get("authorization", "").encode()
        if hmac.compare_digest(given, self.expected):
            return None
        return self.error(APIError(401, "a valid API key is required: send 'Authorization: Bearer YOUR_KEY' (the "
                                        "key the server was started with).", None, "invalid_api_key",
                                   "invalid_request_error"))

    def timed_out(self) -> APIError:
        return APIError(504, f"the request took longer than this server's timeout ({self.timeout_s:g} s) to answer; "
                             "ask for fewer tokens, or retry when the server is less busy.", None, "timeout",
                        "server_error")

    async def models(self, request):
        """``GET /v1/models``."""
        if (no := self.refused(request)) is not None:
            return no
        return JSONResponse({"object": "list", "data": [self.endpoint.model()]}, headers=self.headers)

    async def model(self, request):
        """``GET /v1/models/{name}``."""
        if (no := self.refused(request)) is not None:
            return no
        name, model_id = request.path_params["name"], self.endpoint.model_id
        if name != model_id:
            return self.error(APIError(404, f"The model `{name}` does not exist; this server serves `{model_id}`.",
                                       "model", "model_not_found"))
        return JSONResponse(self.endpoint.model(), headers=self.headers)

    async def chat(self, request):
        """``POST /v1/chat/completions``."""
        return await self.generate(request, "chat")

    async def completions(self, request):
        """``POST /v1/completions``."""
        return await self.generate(request, "completion")

    async def generate(self, request, kind: str):
        """A chat or completion request: checked, admitted (or 503), then answered whole or streamed."""
        if (no := self.refused(request)) is not None:
            return no
        try:
            body = await _read_body(request)
            ids, generation = self.endpoint.prepare(body, kind)
            stream, include_usage = _stream_options(body)
        except APIError as exc:
            return self.error(exc)
        if not self.gate.enter():
            return self.busy(f"{self.max_waiting} requests are already waiting for the model")
        reply = _Reply(self.endpoint.runtime, ids, generation, time.monotonic() + self.timeout_s)
        if stream:
            return StreamingResponse(self.events(kind, reply, include_usage), media_type="text/event-stream",
                                     headers={**self.headers, "Cache-Control": "no-cache"})
        try:
            response = await self.answer(request, kind, reply)
        except Busy as exc:
            return self.busy(str(exc))
        return response if response is not None else JSONResponse({}, status_code=499)

    async def finish(self, reply: _Reply) -> None:
        """End the reply whatever happened (a cancelled request included) and let the next one in."""
        try:
            with anyio.CancelScope(shield=True):
                await run_in_threadpool(reply.close)
        finally:
            self.gate.leave()

    async def answer(self, request, kind: str, reply: _Reply):
        """The whole reply, a token at a time; None when the client went away (generation stopped)."""
        try:
            while True:
                g = await run_in_threadpool(reply.step)
                if g is None:
                    return self.error(self.timed_out()) if reply.timed_out else None
                if g.finish_reason is not None:
                    return JSONResponse(self.endpoint.response(kind, g), headers=self.headers)
                if await request.is_disconnected():
                    return None
        finally:
            await self.finish(reply)

    async def events(self, kind: str, reply: _Reply, include_usage: bool):
        """Server-sent events; a disconnect cancels this generator, and ``finish`` stops the reply."""
        chunk, usage = self.endpoint.chunker(kind, include_usage)
        try:
            if kind == "chat":
                yield _event(chunk(None, role=True))
            sent = ""
            while True:
                g = await run_in_threadpool(reply.step)
                if g is None:
                    if reply.timed_out:
                        yield _event(self.timed_out().body())
                    break
                if len(g.text) > len(sent):
                    yield _event(chunk(g.text[len(sent):]))
                    sent = g.text
                if g.finish_reason is not None:
                    yield _event(chunk(None, finish=g.finish_reason))
                    if include_usage:
                        yield _event(usage(g))
                    break
        except Busy as exc:
            yield _event(APIError(503, f"the server is busy: {exc}", None, "server_busy", "server_error").body())
        except Exception as exc:  # headers are sent: report in the stream, OpenAI style
            yield _event(APIError(500, str(exc), kind="server_error").body())
        finally:
            await self.finish(reply)
        yield "data: [DONE]\n\n"

    async def http_error(self, request, exc):
        """404 and 405 in OpenAI's error shape."""
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = (f"{request.method} {request.url.path} is not a route of this server; it serves "
                   "/v1/models, /v1/chat/completions and /v1/completions.")
        return self.error(APIError(exc.status_code, message, None, code))


def build_app(runtime: Runtime, model_id: str, *, api_key: str | None = None, max_waiting: int = MAX_WAITING,
              timeout_s: float = TIMEOUT_S):
    """The Starlette application serving ``runtime`` as ``model_id`` (see the module docstring)."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.routing import Route

    server = _Server(Endpoint(runtime, model_id), api_key, max_waiting, timeout_s)
    routes = [Route("/v1/models", server.models), Route("/v1/models/{name:path}", server.model),
              Route("/v1/chat/completions", server.chat, methods=["POST"]),
              Route("/v1/completions", server.completions, methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: server.http_error})


def _event(item: dict) -> str:
    return f"data: {json.dumps(item)}\n\n"
