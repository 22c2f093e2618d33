"""The network half of publishing, in a process of its own (``python -m jobs.hub_upload ACTION``).

``huggingface_hub`` reads its offline switch (``HF_HUB_OFFLINE``) from one module global at every
request, so lifting it in the web process for an upload lifted it for every thread there (a form's
Hub check, the chat loading a Hub base) as long as the upload ran. Here it is off for this process
alone. The parent (``jobs.publish``) sends the request as JSON on stdin and the token in
``QALORA_PUBLISH_TOKEN`` (never on the command line); this prints JSON lines: ``{"step": [fraction,
message]}`` as it goes, then ``{"result": ...}`` or ``{"error": message}``.

Actions: ``whoami`` (the token's user name), ``upload`` (create the repository, commit the files).
"""
from __future__ import annotations

import json
import os
import sys


def _say(**item) -> None:
    print(json.dumps(item), flush=True)


def main(action: str) -> int:
    os.environ["HF_HUB_OFFLINE"] = "0"  # before huggingface_hub reads it: this process only
    import httpx2
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from .publish import _http_error

    request = json.load(sys.stdin)
    token, endpoint = os.environ.get("QALORA_PUBLISH_TOKEN") or None, request["endpoint"]
    repo_id = request.get("repo_id", "")
    api = HfApi(endpoint=endpoint)
    try:
        if action == "whoami":
            _say(result=api.whoami(token=token, cache=False)["name"])
            return 0
        _say(step=[0.15, f"creating {'private' if request['private'] else 'public'} repository {repo_id}"])
        url = str(api.create_repo(repo_id, token=token, private=request["private"], exist_ok=False))
        files = request["files"]
        _say(step=[0.3, f"uploading {len(files)} files ({request['size_mb']:.1f} MB)"])
        api.create_commit(repo_id, [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=path) for rel, path in files],
                          commit_message="Upload QA-LoRA low-bit model", token=token)
        _say(result=url)
    except HfHubHTTPError as exc:
        _say(error=str(_http_error(exc, repo_id, endpoint)))
    except (OSError, httpx2.TransportError) as exc:  # refused, DNS, TLS: name the endpoint, never the token
        _say(error=f"Cannot reach {endpoint} ({type(exc).__name__}); check the network or HF_ENDPOINT and try again.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
