"""The OpenAI-compatible server, driven by the official ``openai`` client over real HTTP.

The server runs in a thread (uvicorn on a free port) on the tiny model's llama.cpp runtime; every
reply is compared with the runtime's own greedy reply, so the API adds nothing and loses nothing.
One test starts ``python -m qalora serve`` as a user would.
"""
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn

from helpers import tiny_qalora
from qalora.deployment.export.native import save_quantized
from qalora.method.merge import merge_adapters
from qalora.deployment.runtime import open_runtime
from qalora.deployment.serve import build_app

ROOT = Path(__file__).resolve().parents[1]
MODEL = "tiny-run"
MESSAGES = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "contact card -> Hana lives in Oslo."}]
MAX_TOKENS = 12
ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve") / MODEL
    model, tok = tiny_qalora()
    save_quantized(merge_adapters(model, use_kernel=False), tok, path / "merged")
    return path


@pytest.fixture(scope="module")
def runtime(run):
    rt = open_runtime(run)
    yield rt
    rt.close()


@pytest.fixture(scope="module")
def base_url(runtime):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(build_app(runtime, MODEL), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs=dict(sockets=[sock]), daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    server.should_exit = True
    thread.join()


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)


def test_models_list_the_run(client):
    models = client.models.list().data
    assert [(m.id, m.object, m.owned_by) for m in models] == [(MODEL, "model", "qalora")]
    assert client.models.retrieve(MODEL).id == MODEL


def test_chat_completion_is_the_runtimes_greedy_reply(client, runtime):
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=MAX_TOKENS)
    want = runtime.chat(MESSAGES, max_new_tokens=MAX_TOKENS)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == want.text != ""
    assert choice.finish_reason == want.finish_reason == "length"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == \
        (len(runtime.chat_ids(MESSAGES)), MAX_TOKENS, len(runtime.chat_ids(MESSAGES)) + MAX_TOKENS)
    assert reply.model == MODEL and reply.system_fingerprint == "llama.cpp (GGUF Q4_1)"


def test_streamed_chat_adds_up_to_the_non_streamed_reply(client):
    kwargs = dict(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=MAX_TOKENS)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks[1:-2]]
    assert len(pieces) > 3 and all(pieces)  # it streamed, piece by piece
    assert "".join(pieces) == whole.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == "length" and chunks[-1].choices == []
    assert chunks[-1].usage == whole.usage
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"


def test_completions_streamed_or_not_and_stop_strings(client, runtime):
    prompt = "contact card ->"
    want = runtime.complete(prompt, max_new_tokens=MAX_TOKENS)
    reply = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=MAX_TOKENS)
    assert reply.choices[0].text == want.text and reply.usage.prompt_tokens == len(runtime.text_ids(prompt))
    streamed = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=MAX_TOKENS, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == want.text
    stop = want.text[4:6]
    cut = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=MAX_TOKENS, stop=[stop])
    assert cut.choices[0].text == want.text[:want.text.find(stop)] and cut.choices[0].finish_reason == "stop"


def _error_of(call, exc_type, status):
    with pytest.raises(exc_type) as info:
        call()
    assert info.value.status_code == status
    body = info.value.response.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS
    return body["error"]


def test_bad_requests_get_openais_error_shape(client, base_url):
    chat = client.chat.completions.create
    err = _error_of(lambda: chat(model="gpt-4o", messages=MESSAGES), openai.NotFoundError, 404)
    assert err == {"message": f"The model `gpt-4o` does not exist; this server serves `{MODEL}`.",
                   "type": "invalid_request_error", "param": "model", "code": "model_not_found"}
    for messages in ([], [{"role": "user"}], [{"role": "robot", "content": "hi"}], "hi",
                     [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]):
        err = _error_of(lambda: chat(model=MODEL, messages=messages), openai.BadRequestError, 400)
        assert err["param"] == "messages" and err["type"] == "invalid_request_error"
    err = _error_of(lambda: chat(model=MODEL, messages=MESSAGES, max_tokens=10_000), openai.BadRequestError, 400)
    assert (err["param"], err["code"]) == ("max_tokens", "context_length_exceeded")
    assert err["message"].startswith("This model's maximum context length is 512 tokens, but the prompt has ")
    long = [{"role": "user", "content": "x" * 600}]  # one token per byte: past the window on its own
    err = _error_of(lambda: chat(model=MODEL, messages=long), openai.BadRequestError, 400)
    assert (err["param"], err["code"]) == ("messages", "context_length_exceeded")
    err = _error_of(lambda: chat(model=MODEL, messages=MESSAGES, temperature=3), openai.BadRequestError, 400)
    assert err["param"] == "temperature" and "[0, 2]" in err["message"]
    err = _error_of(lambda: chat(model=MODEL, messages=MESSAGES, n=2), openai.BadRequestError, 400)
    assert err["param"] == "n"
    raw = httpx.post(f"{base_url}/chat/completions", content=b"{not json")
    assert raw.status_code == 400 and raw.json()["error"]["message"].startswith("the request body is not valid JSON")
    raw = httpx.get(f"{base_url}/embeddings")
    assert raw.status_code == 404 and raw.json()["error"]["code"] == "not_found"


def test_the_serve_command_answers_openai_clients(run, runtime):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "qalora", "serve", str(run), "--port", str(port)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        deadline = time.monotonic() + 120
        while True:
            try:
                models = client.models.list().data
                break
            except openai.APIConnectionError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
                time.sleep(0.2)
        assert [m.id for m in models] == [MODEL]
        reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=MAX_TOKENS)
        assert reply.choices[0].message.content == runtime.chat(MESSAGES, max_new_tokens=MAX_TOKENS).text
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert f"serving '{MODEL}' with llama.cpp (GGUF Q4_1) (CPU, with the run's GGUF export " \
           f"exports/model-q4_1.gguf) at http://127.0.0.1:{port}/v1" in out


# ---- what keeps the server standing: a key, a bounded wait, disconnects, a timeout, load ----

from contextlib import contextmanager  # noqa: E402

from qalora.deployment.runtime.base import Runtime  # noqa: E402


class SlowRuntime(Runtime):
    """Answers "a" for every token, ``delay`` seconds each, counting the tokens it made."""

    name = "slow"

    def __init__(self, delay: float = 0.05):
        from qalora.models.tiny import byte_tokenizer
        tok = byte_tokenizer()
        super().__init__(tok, [tok.eos_token_id], 100_000, "test")
        self.delay, self.made = delay, 0
        self.a = tok("a", add_special_tokens=False)["input_ids"][0]

    def _tokens(self, ids, max_new_tokens, temperature, top_p, seed):
        while True:
            time.sleep(self.delay)
            self.made += 1
            yield self.a


@contextmanager
def serving(app):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs=dict(sockets=[sock]), daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    finally:
        server.should_exit = True
        thread.join()


def _ask(url, max_tokens=5, stream=False, **kw):
    body = {"model": "slow", "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens,
            "temperature": 0, "stream": stream}
    return httpx.post(f"{url}/chat/completions", json=body, **{"timeout": 30, **kw})


def test_an_api_key_is_required_and_compared_whole():
    with serving(build_app(SlowRuntime(0.0), "slow", api_key="s3cret")) as url:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer s3cret-and-more"},
                        {"Authorization": "s3cret"}):
            r = httpx.get(f"{url}/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert _ask(url, headers=headers).status_code == 401
        client = openai.OpenAI(base_url=url, api_key="s3cret", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["slow"]
        reply = client.chat.completions.create(model="slow", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert reply.choices[0].message.content == "aaa"


def test_serve_refuses_to_listen_beyond_loopback_without_a_key(run):
    proc = subprocess.run([sys.executable, "-m", "qalora", "serve", str(run), "--host", "0.0.0.0"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--host 0.0.0.0 makes the model reachable from other machines, and no API key is set" in proc.stderr


def test_past_the_waiting_bound_requests_get_503_at_once_and_none_hang():
    runtime = SlowRuntime(0.05)
    with serving(build_app(runtime, "slow", max_waiting=2)) as url:
        results = [None] * 8
        t0 = time.monotonic()

        def one(i):
            r = _ask(url, max_tokens=6)
            results[i] = (r.status_code, time.monotonic() - t0, r.headers.get("retry-after"), r.json())

        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert all(r is not None for r in results)
        answered = [r for r in results if r[0] == 200]
        busy = [r for r in results if r[0] == 503]
        assert len(answered) == 3 and len(busy) == 5  # one answered at a time, two waiting
        assert all(r[3]["choices"][0]["message"]["content"] == "aaaaaa" for r in answered)
        assert all(r[2] == "2" and r[3]["error"]["code"] == "server_busy" and r[1] < 1.0 for r in busy)
        assert _ask(url, max_tokens=2).status_code == 200  # and the gate lets the next ones in


def _settled(runtime, every=0.25) -> int:
    """The runtime's token count once it stops growing."""
    before = -1
    while runtime.made != before:
        before = runtime.made
        time.sleep(every)
    return before


def test_a_client_that_disconnects_stops_its_generation_and_frees_the_model():
    runtime = SlowRuntime(0.02)
    with serving(build_app(runtime, "slow")) as url:
        with httpx.stream("POST", f"{url}/chat/completions", timeout=30,
                          json={"model": "slow", "messages": [{"role": "user", "content": "hi"}],
                                "max_tokens": 5000, "stream": True}) as r:
            events = (line for line in r.iter_lines() if line)
            assert all(next(events).startswith("data: {") for _ in range(3))
        made = _settled(runtime)
        assert made < 100  # it stopped within a token or so of the disconnect, not after 5000
        with pytest.raises(httpx.ReadTimeout):  # a client that gives up on a non-streamed reply
            _ask(url, max_tokens=5000, timeout=0.5)
        assert _settled(runtime) - made < 100
        assert _ask(url, max_tokens=3).json()["choices"][0]["message"]["content"] == "aaa"  # the model is free


def test_a_request_past_the_timeout_ends_with_504():
    with serving(build_app(SlowRuntime(0.05), "slow", timeout_s=0.5)) as url:
        r = _ask(url, max_tokens=1000)
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        r = _ask(url, max_tokens=1000, stream=True)
        events = [line for line in r.text.splitlines() if line.startswith("data: ")]
        assert '"code": "timeout"' in events[-2] and events[-1] == "data: [DONE]"
        assert _ask(url, max_tokens=3).status_code == 200


def test_sixteen_concurrent_clients_each_get_their_whole_correct_answer(base_url, runtime):
    """16 clients x 3 requests, streamed and not, over loopback (bench/serve_load.py runs more and
    reports latency): every answer is the runtime's own greedy reply, complete."""
    expected = runtime.chat(MESSAGES, max_new_tokens=MAX_TOKENS).text
    answers, errors = [], []

    def client_loop(i):
        client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
        for k in range(3):
            try:
                if (i + k) % 2:
                    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0,
                                                            max_tokens=MAX_TOKENS, stream=True)
                    answers.append("".join(c.choices[0].delta.content or "" for c in stream if c.choices))
                else:
                    answers.append(client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0,
                                                                  max_tokens=MAX_TOKENS).choices[0].message.content)
            except Exception as exc:  # reported below with the others
                errors.append(repr(exc))

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert errors == [] and answers == [expected] * 48
