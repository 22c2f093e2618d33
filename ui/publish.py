"""The Publish tab: pick a finished model, preview its model card and loss curve as they will be
uploaded, tick the formats it can have, and upload it to the Hugging Face Hub with a token that is
used once and never kept."""
from __future__ import annotations

import gradio as gr

from jobs import service
from jobs.publish import PUBLISH_FORMATS, loss_curve, model_card, publish_choices

from . import auth
from .common import error_note, model_choices, models_opened

CARD_HINT = "*Pick a finished model to preview its model card.*"


def _card(job_id, repo, formats=None):
    if job_id is None:
        return CARD_HINT, None, gr.skip()
    try:
        job = service.get_job(int(job_id))
    except Exception as exc:
        return error_note(exc), None, gr.skip()
    repo = (repo or "").strip() or job["name"]
    # a bare name goes under the token's account when published; the snippet shows where
    repo_id = repo if "/" in repo else f"<your-hub-username>/{repo}"
    # the card's YAML header is metadata for the Hub; preview it as code, not as a heading
    _, meta, body = model_card(job, repo_id, formats).split("---\n", 2)
    body = body.replace("![loss curve](loss_curve.png)", "*(loss_curve.png: the image above)*")
    return f"```yaml\n{meta}```\n{body}", loss_curve(job), repo


def _publish_formats(job_id):
    """The format checkboxes for a job: every format it can have, all ticked; the others named
    with the reason underneath."""
    if job_id is None:
        return gr.skip(), ""
    try:
        ok, refused = publish_choices(service.get_job(int(job_id)))
    except Exception as exc:
        return gr.skip(), error_note(exc)
    why = "; ".join(f"{f} is not offered: {reason}" for f, reason in refused.items())
    return (gr.update(choices=[(PUBLISH_FORMATS[f], f) for f in ok], value=ok),
            f"*{why}*" if why else "")


def _publish(job_id, repo, private, token, formats=None, progress=gr.Progress(track_tqdm=True)):
    """Upload; the token field is cleared afterwards so the page does not keep it either."""
    if job_id is None:
        return error_note(ValueError("pick a finished model first.")), ""
    try:
        url = service.publish_job(int(job_id), repo, private=bool(private), token=token, formats=formats,
                                  progress=lambda fraction, text: progress(fraction, desc=text),
                                  allow_server_token=auth.current().server_token)
    except Exception as exc:
        return error_note(exc), ""
    return f"Published ({'private' if private else 'public'}): [{url}]({url})", ""


def build_publish_tab(tab):
    """Lay out the Publish tab inside ``tab`` and wire it; opening the tab refreshes the model list."""
    with gr.Row():
        with gr.Column(scale=1):
            model = gr.Dropdown([], value=None, label="Finished model", elem_id="publish-model")
            refresh = gr.Button("↻ Refresh list")
            repo = gr.Textbox(label="Repository name", placeholder="name or namespace/name", elem_id="publish-repo")
            private = gr.Checkbox(True, label="Private repository")
            formats = gr.CheckboxGroup([(v, k) for k, v in PUBLISH_FORMATS.items()],
                                       value=list(PUBLISH_FORMATS), label="Formats to upload",
                                       elem_id="publish-formats")
            formats_note = gr.Markdown(elem_id="publish-formats-note")
            token = gr.Textbox(label="Hugging Face token (optional)", type="password", elem_id="publish-token",
                               info="Used for this upload only, never stored. Empty: HF_TOKEN or your "
                                    "`hf auth login`.")
            publish = gr.Button("Publish to the Hub", variant="primary", elem_id="publish-button")
            result = gr.Markdown(elem_id="publish-result")
        with gr.Column(scale=2):
            curve = gr.Image(label="Loss curve (uploaded as loss_curve.png)", show_label=False, type="pil",
                             elem_id="publish-curve", buttons=["download", "fullscreen"])
            card = gr.Markdown(CARD_HINT, elem_id="card-preview")
    refresh.click(lambda: gr.update(choices=model_choices()), None, model)
    model.change(_publish_formats, model, [formats, formats_note]).then(
        _card, [model, gr.State(""), formats], [card, curve, repo])
    repo.blur(_card, [model, repo, formats], [card, curve, repo])
    formats.input(_card, [model, repo, formats], [card, curve, repo])
    publish.click(_publish, [model, repo, private, token, formats], [result, token])
    # finished models appear when the tab is opened; the current choice is kept
    tab.select(models_opened, model, model)
