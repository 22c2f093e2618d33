"""Asking the Hugging Face Hub about a model, without torch: quick checks for the form and the
one readable message every Hub failure becomes."""
from __future__ import annotations

import os
from pathlib import Path

from qalora.errors import ModelError

HUB_CHECK_S = 2.0  # the form's budget for asking the Hub about a model


def endpoint() -> str:
    """The Hub this process talks to: ``HF_ENDPOINT``, else huggingface_hub's default."""
    from huggingface_hub import constants
    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def failure(exc: BaseException) -> tuple[str, int | None]:
    """A Hub failure read for a message: its causes' names and texts in one string, and the HTTP
    status of the first one that carries a response."""
    chain, seen = [], exc
    while seen is not None and len(chain) < 8:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    text = " ".join(f"{type(e).__name__} {e}" for e in chain)
    status = next((s for e in chain if (s := getattr(getattr(e, "response", None), "status_code", None))), None)
    return text, status


def hub_config(repo_id: str, timeout: float = HUB_CHECK_S) -> dict:
    """A Hub model's ``config.json``: from the local Hugging Face cache, else fetched within
    ``timeout`` seconds. Raises ``ModelError`` at once (naming the fix) when the Hub cannot be
    reached or has no such model, instead of a download failing minutes later in the worker.
    """
    import json

    from huggingface_hub import constants, try_to_load_from_cache

    path, where = try_to_load_from_cache(repo_id, "config.json"), endpoint()
    if not isinstance(path, str):
        if constants.HF_HUB_OFFLINE:
            raise ModelError(f"{repo_id!r} is not in the local Hugging Face cache and Hub downloads are off "
                             "(HF_HUB_OFFLINE=1): download the model first and give its folder, or unset "
                             "HF_HUB_OFFLINE.")
        path = _download_config(repo_id, where, timeout)
    try:  # a download is cached as it came, so a cached file may be unreadable too
        return json.loads(Path(path).read_text())
    except ValueError:
        raise ModelError(f"{repo_id!r} on {where} has no readable config.json; is it a transformers model? "
                         "Give a LLaMA-family model saved with save_pretrained.") from None


def _download_config(repo_id: str, where: str, timeout: float) -> str:
    """``config.json`` downloaded into the Hugging Face cache; its local path.

    One HEAD first, within ``timeout`` and without retries: ``hf_hub_download`` alone retries an
    unreachable Hub with a 60 s timeout and backs off for half a minute before it gives up, far past
    the form's budget. The download then records the revision in the cache, so the next check (and
    the worker's download) finds it there.
    """
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.errors import (FileMetadataError, GatedRepoError, HfHubHTTPError, HTTPError,
                                        LocalEntryNotFoundError, RepositoryNotFoundError)

    try:
        get_hf_file_metadata(hf_hub_url(repo_id, "config.json", endpoint=where), timeout=timeout)
        return hf_hub_download(repo_id, "config.json", endpoint=where, etag_timeout=timeout)
    except HfHubHTTPError as exc:  # the Hub answered: gated, not found, private, or a server error
        status = getattr(exc.response, "status_code", None)
        if status in (401, 403, 404) or isinstance(exc, (GatedRepoError, RepositoryNotFoundError)):
            raise ModelError(hub_error(repo_id, exc, where)) from None
        raise ModelError(f"the Hub at {where} answered {status} for {repo_id!r}; try again later, "
                         "or download the model first and give its folder.") from None
    except (HTTPError, LocalEntryNotFoundError, FileMetadataError) as exc:  # no answer, or not a Hub's
        while isinstance(exc, LocalEntryNotFoundError) and (exc.__cause__ or exc.__context__) is not None:
            exc = exc.__cause__ or exc.__context__  # the network error hf_hub_download gave up on
        raise ModelError(f"cannot reach the Hub at {where} to read {repo_id!r} ({type(exc).__name__} within "
                         f"{timeout:g} s): download the model first and give its folder, or set HF_ENDPOINT to a "
                         "Hub (or mirror) this server can reach.") from None


class _Status(Exception):
    """An HTTP status, shaped like the errors ``hub_error`` reads."""

    def __init__(self, status_code: int):
        super().__init__(f"HTTP {status_code}")
        self.response = type("Response", (), {"status_code": status_code})()


def hub_error(repo_id: str, exc: BaseException, endpoint: str) -> str:
    names, status = failure(exc)
    if "GatedRepo" in names or status == 403:
        return (f"could not fetch {repo_id!r}: it is gated. Accept its license on the Hub, then set HF_TOKEN "
                "(a token of the account that accepted it) for gated models, and submit again.")
    if "RepositoryNotFound" in names or status in (401, 404):
        return (f"could not fetch {repo_id!r}: the Hub at {endpoint} has no such model, or it is private. "
                "Check the id, or set HF_TOKEN for a private or gated model.")
    if "OfflineModeIsEnabled" in names:
        return (f"could not fetch {repo_id!r}: Hub downloads are off (HF_HUB_OFFLINE=1). Unset it, or download "
                "the model and give its folder.")
    return (f"could not fetch {repo_id!r}: cannot reach the Hub at {endpoint} ({type(exc).__name__}). Check the "
            "network (or HF_ENDPOINT), or download the model first and give its folder.")
