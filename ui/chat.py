"""The Chat tab: talk to a finished model, alone or side by side with its base; each bubble says
what it waits for while its model loads, the status names the runtime that answers, and the
command that serves the same model to OpenAI clients is shown above."""
from __future__ import annotations

import time

import gradio as gr

from jobs import service
from jobs.chat import build_messages, loaded_models, runtime_of, stream_side_by_side

from .common import error_note, model_choices, models_opened


def _send(message, tuned, base, job_id, compare, system, max_new, temperature, top_p):
    """Stream the reply (and, side by side, the base model's reply to the same message)."""
    message = (message or "").strip()
    if not message:
        yield gr.skip(), gr.skip(), gr.skip(), gr.skip()
        return
    if job_id is None:
        yield gr.skip(), gr.skip(), gr.skip(), error_note(ValueError("pick a finished model first."))
        return
    histories = {"tuned": tuned or [], "base": base or []}
    replies: dict = {}
    try:
        keys = service.chat_keys(int(job_id), bool(compare))
        requests = {side: (key, build_messages(histories[side], message, system or ""))
                    for side, key in keys.items()}
        turn = lambda side, reply: [*histories[side], {"role": "user", "content": message},  # noqa: E731
                                    {"role": "assistant", "content": reply}]
        loaded = loaded_models()
        replies = {side: "" if loaded.get(side) == key else None for side, key in keys.items()}
        t0 = time.monotonic()
        shown = lambda replies: _chat_shown(replies, keys, job_id, time.monotonic() - t0)  # noqa: E731
        texts = shown(replies)
        yield "", turn("tuned", texts["tuned"]), turn("base", texts["base"]) if compare else gr.skip(), \
            _chat_progress(replies, keys, job_id, 0.0)
        # each side answers as soon as it is loaded: the fine-tuned reply streams while the base loads
        for replies in stream_side_by_side(requests, max_new_tokens=max_new, temperature=temperature, top_p=top_p):
            texts = shown(replies)
            yield (gr.skip(), turn("tuned", texts["tuned"]), turn("base", texts["base"]) if compare else gr.skip(),
                   _chat_progress(replies, keys, job_id, time.monotonic() - t0))
    except Exception as exc:
        # a side that never loaded says so in its bubble; a reply already given stays
        failed = {side: turn(side, "*(no reply: see the message below)*") if replies.get(side, "") is None
                  else gr.skip() for side in ("tuned", "base")}
        yield gr.skip(), failed["tuned"], failed["base"], error_note(exc)
        return
    loaded = f"Model #{job_id}" + (f" and base `{keys['base']}`" if compare else "")
    yield gr.skip(), gr.skip(), gr.skip(), f"{loaded} loaded; kept in memory for the next turn. {_answered_by(compare)}"


def _who(side: str, keys: dict, job_id) -> str:
    return f"the fine-tuned model #{job_id}" if side == "tuned" else f"the base model `{keys['base']}`"


def _chat_shown(replies: dict, keys: dict, job_id, waited: float) -> dict:
    """Each side's bubble: its reply so far, or what it waits for while its model loads."""
    return {side: (f"*Loading {_who(side, keys, job_id)} into memory… {waited:.0f} s (once: it stays loaded for "
                   "the next turns)*" if replies.get(side) is None else replies[side])
            for side in keys}


def _chat_progress(replies: dict, keys: dict, job_id, waited: float) -> str:
    """The status while answering: which runtime answers each side, named before it replies, and
    which side still loads."""
    parts = []
    for side in keys:
        if replies.get(side) is None:
            parts.append(f"loading {_who(side, keys, job_id)} into memory… {waited:.0f} s")
        elif side == "tuned":
            parts.append(f"Generating with {(runtime_of('tuned') or {}).get('name', 'the model')}…")
        else:
            parts.append(f"base model `{keys['base']}` on {(runtime_of('base') or {}).get('name', '?')}")
    text = " · ".join(parts)
    return f"*{text[:1].upper() + text[1:]}*"


def _answered_by(compare: bool) -> str:
    """Which runtime answered each side, and why that one."""
    tuned = runtime_of("tuned")
    if tuned is None:  # another session switched models meanwhile
        return ""
    text = f"Answered by **{tuned['name']}** ({tuned['reason']})."
    if compare and (base := runtime_of("base")):
        text += f" Base model: **{base['name']}** ({base['reason']})."
    return text


def _serve_note(job_id) -> str:
    """The command that serves the picked model to OpenAI clients, on the same runtime as this chat."""
    if job_id is None:
        return ""
    try:
        serve = service.serve_command(int(job_id))
    except Exception as exc:
        return error_note(exc)
    return (f"OpenAI-compatible API for this model (same runtime as this chat): `{serve['command']}` "
            f"({serve['where']}), then "
            f"`OpenAI(base_url=\"{serve['base_url']}\", api_key=\"-\")` with `model=\"{serve['model_id']}\"`.")


def build_chat_tab(tab):
    """Lay out the Chat tab inside ``tab`` and wire it; opening the tab refreshes the model list."""
    with gr.Row():
        model = gr.Dropdown([], value=None, label="Finished model", elem_id="chat-model", scale=3)
        refresh = gr.Button("↻ Refresh list", scale=1)
        compare = gr.Checkbox(False, label="Side by side with the base model", elem_id="chat-compare", scale=2)
    serve_note = gr.Markdown(elem_id="chat-serve")
    with gr.Accordion("Generation settings", open=False):
        system = gr.Textbox(label="System prompt", placeholder="(none)")
        with gr.Row():
            temperature = gr.Slider(0.0, 2.0, 0.0, step=0.05, label="Temperature (0 = greedy)")
            top_p = gr.Slider(0.05, 1.0, 0.95, step=0.05, label="Top-p")
            max_new = gr.Slider(8, 1024, 128, step=8, label="Max new tokens")
    with gr.Row():
        tuned = gr.Chatbot(label="Fine-tuned low-bit model", elem_id="chat-tuned", height=360, buttons=["copy"])
        base = gr.Chatbot(label="Base model", elem_id="chat-base", height=360, visible=False, buttons=["copy"])
    with gr.Row():
        message = gr.Textbox(placeholder="Type a message and press Enter", show_label=False, elem_id="chat-input",
                             scale=5)
        send = gr.Button("Send", variant="primary", elem_id="chat-send", scale=1)
        clear = gr.Button("Clear", scale=1)
    status = gr.Markdown(elem_id="chat-status")

    refresh.click(lambda: gr.update(choices=model_choices()), None, model)
    compare.change(lambda c: gr.update(visible=c), compare, base)
    model.change(lambda job_id: ([], [], _serve_note(job_id)), model, [tuned, base, serve_note])
    args = ([message, tuned, base, model, compare, system, max_new, temperature, top_p], [message, tuned, base, status])
    send.click(_send, *args)
    message.submit(_send, *args)
    clear.click(lambda: ([], []), None, [tuned, base])
    # finished models appear when the tab is opened; the current choice is kept
    tab.select(models_opened, model, model)
