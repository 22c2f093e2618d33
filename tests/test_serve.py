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
from qalora.export.native import save_quantized
from qalora.merge import merge_adapters
from qalora.runtime import open_runtime
from qalora.serve import build_app

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
