"""Datasets by Hugging Face Hub id, written ``ID[:CONFIG][@SPLIT]``: checked for the form in about
two seconds without reading a row, downloaded by the worker through ``datasets`` (into its usual
caches) with progress per data file. Also the paper's five training sets by name, with their Hub
ids and how their columns map to a prompt and a response. Torch is never imported here.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

from qalora.errors import DataError
from qalora.models.hub import endpoint, failure

HUB_CHECK_S = 2.0  # the form's budget for asking the Hub about a dataset
# 'ID[:CONFIG][@SPLIT]': an id is 'name' or 'org/name'; config and split names as the Hub writes them.
_REF = re.compile(r"^(?P<id>[A-Za-z0-9][\w.-]*(?:/[\w.-]+)?)(?::(?P<config>[\w.+-]+))?(?:@(?P<split>[\w.-]+))?$")
ROLES = ("prompt", "input", "response", "messages", "text")
# The columns that name a record format by themselves (qalora.data.records.FORMATS): no mapping needed.
RECORD_COLUMNS = ("messages", "conversations", "instruction", "text")


@dataclass(frozen=True)
class HubRef:
    id: str
    config: str | None = None
    split: str | None = None

    def __str__(self) -> str:
        return self.id + (f":{self.config}" if self.config else "") + (f"@{self.split}" if self.split else "")


@dataclass(frozen=True)
class PaperDataset:
    """One of the QA-LoRA paper's training sets: where it is on the Hub and how its columns map."""
    label: str
    ref: str
    columns: dict = field(default_factory=dict)
    max_samples: int | None = None
    note: str = ""


# The paper (Xu et al. 2023, after QLoRA) fine-tunes on Alpaca and on a 320K subset of FLAN v2, and
# reports Self-instruct, Longform and Chip2 in its ablations. Column names are those of each
# dataset's card; they were not fetched from this build's machine (it has no Hub access).
PAPER_DATASETS: dict[str, PaperDataset] = {
    "alpaca": PaperDataset("Alpaca (52K)", "tatsu-lab/alpaca",
                           {"prompt": "instruction", "input": "input", "response": "output"}),
    "flan-v2": PaperDataset("FLAN v2 (320K subset)", "itay1itzhak/flan_2022_350k",
                            {"prompt": "prompt", "response": "completion"}, 320_000,
                            "a 350K sample of the FLAN 2022 collection, sampled again to the paper's 320K"),
    "self-instruct": PaperDataset("Self-instruct (82K)", "yizhongw/self_instruct:self_instruct",
                                  {"prompt": "prompt", "response": "completion"}),
    "longform": PaperDataset("Longform (23K)", "akoksal/LongForm", {"prompt": "input", "response": "output"}),
    "chip2": PaperDataset("Chip2 (OIG, 210K)", "0-hero/OIG-small-chip2", {"prompt": "user", "response": "chip2"}),
}


def paper_dataset(ref: str) -> PaperDataset | None:
    """The paper's dataset ``ref`` names: ``paper:NAME``, or its Hub id as listed."""
    ref = str(ref).strip()
    if ref.startswith("paper:"):
        name = ref[len("paper:"):]
        if name not in PAPER_DATASETS:
            raise DataError(f"{ref!r}: the paper's datasets are {', '.join('paper:' + n for n in PAPER_DATASETS)}.")
        return PAPER_DATASETS[name]
    return next((d for d in PAPER_DATASETS.values() if ref in (d.ref, d.ref.split(":")[0])), None)


def resolve(data: str, columns: dict | None = None, max_samples: int | None = None) -> tuple[str, dict, int | None]:
    """``(data, columns, max_samples)`` with the paper's datasets spelled out: ``paper:alpaca`` (or
    its Hub id) becomes the Hub reference with its column mapping and sample size, where the caller
    gave none. Anything else passes through, its mapping checked."""
    paper = paper_dataset(data)
    if paper is None:
        return data, check_columns(columns), max_samples
    return (paper.ref, check_columns(columns) or dict(paper.columns),
            max_samples if max_samples is not None else paper.max_samples)


def parse_ref(text: str) -> HubRef:
    match = _REF.match(str(text).strip())
    if not match:
        raise DataError(f"{text!r} is not a Hub dataset reference; write ID[:CONFIG][@SPLIT], e.g. "
                        "'tatsu-lab/alpaca', 'yizhongw/self_instruct:self_instruct' or 'org/name@train'.")
    return HubRef(match["id"], match["config"], match["split"])


def looks_like_ref(text: str) -> bool:
    """``org/name[:config][@split]`` (a bare name is a Hub id too, but also a possible typo of a path)."""
    text = str(text).strip()
    return bool(_REF.match(text)) and "/" in text.split(":")[0] and not text.startswith((".", "/", "~"))


# ---- column mapping --------------------------------------------------------------------------------

def check_columns(columns: dict | None) -> dict:
    """A column mapping, normalised: ``{prompt, response[, input]}``, ``{messages}`` or ``{text}``,
    each naming one of the dataset's columns. Raises ``DataError`` naming what is wrong."""
    columns = {k: str(v).strip() for k, v in (columns or {}).items() if v not in (None, "")}
    if not columns:
        return {}
    unknown = sorted(set(columns) - set(ROLES))
    if unknown:
        raise DataError(f"column mapping: unknown role(s) {unknown}; map columns to {', '.join(ROLES)}.")
    if "messages" in columns or "text" in columns:
        only = "messages" if "messages" in columns else "text"
        if set(columns) != {only}:
            raise DataError(f"column mapping: '{only}' stands alone; map either one {only} column, or a prompt "
                            "and a response column (and an optional input).")
        return columns
    if not {"prompt", "response"} <= set(columns):
        missing = " and ".join(r for r in ("prompt", "response") if r not in columns)
        raise DataError(f"column mapping: no {missing} column; pick the column that holds the "
                        f"{'question or instruction' if missing == 'prompt' else 'answer'}.")
    return columns


def parse_columns(text: str | None) -> dict:
    """``prompt=question,response=answer[,input=context]`` (the CLI's ``--columns``) as a mapping."""
    out = {}
    for part in filter(None, (p.strip() for p in str(text or "").split(","))):
        role, sep, column = part.partition("=")
        if not sep or not column.strip():
            raise DataError(f"--columns: {part!r} is not ROLE=COLUMN; write e.g. prompt=question,response=answer.")
        out[role.strip()] = column.strip()
    return check_columns(out)


def map_row(row: dict, columns: dict, where: str) -> dict:
    """One raw row as the record format the mapping names (Alpaca's fields, messages, or text)."""
    missing = [c for c in columns.values() if c not in row]
    if missing:
        found = ", ".join(repr(c) for c in sorted(row)[:8])
        raise DataError(f"{where}: no column {missing[0]!r} (mapped as {_role_of(columns, missing[0])}); its "
                        f"columns are {found}. Fix the column mapping.")
    if "messages" in columns:
        return {"messages": row[columns["messages"]]}
    if "text" in columns:
        return {"text": row[columns["text"]]}
    out = {"instruction": row[columns["prompt"]], "output": row[columns["response"]]}
    if "input" in columns:
        out["input"] = row[columns["input"]]
    return out


def _role_of(columns: dict, column: str) -> str:
    return next(r for r, c in columns.items() if c == column)


def guess_columns(names) -> dict:
    """A likely mapping for columns that match no record format (for the form's defaults), or {}."""
    lower = {str(n).lower(): n for n in names}
    pick = lambda options: next((lower[o] for o in options if o in lower), None)  # noqa: E731
    prompt = pick(("instruction", "prompt", "question", "query", "input", "inputs", "user", "source", "context"))
    response = pick(("output", "response", "answer", "completion", "target", "targets", "reply", "chip2", "label"))
    if prompt and response and prompt != response:
        guess = {"prompt": prompt, "response": response}
        extra = pick(("input", "context")) if prompt not in (lower.get("input"), lower.get("context")) else None
        if extra and extra not in (prompt, response):
            guess["input"] = extra
        return guess
    for role in ("messages", "conversations", "dialog", "dialogue", "chat"):
        if role in lower:
            return {"messages": lower[role]}
    return {}


# ---- the Hub -----------------------------------------------------------------------------------------

def hub_message(ref: HubRef | str, exc: BaseException) -> str:
    """What a failure to reach or read a Hub dataset becomes: exists, gated, private, unreachable."""
    name = ref.id if isinstance(ref, HubRef) else str(ref)
    text, status = failure(exc)
    if "GatedRepo" in text or "is a gated dataset" in text or status == 403:
        return (f"dataset {name!r} is gated: accept its conditions on its Hub page, then set HF_TOKEN (a token of "
                "the account that accepted them) where the studio runs, and try again.")
    if "RepositoryNotFound" in text or "DatasetNotFound" in text or status in (401, 404):
        return (f"dataset {name!r} was not found on the Hub at {endpoint()}, or it is private: check the id "
                "(ID[:CONFIG][@SPLIT], e.g. 'tatsu-lab/alpaca'), or set HF_TOKEN to a token that can read it.")
    if "OfflineMode" in text or "offline" in text.lower():
        return (f"dataset {name!r} is not in the local datasets cache and Hub downloads are off (HF_HUB_OFFLINE=1): "
                "unset HF_HUB_OFFLINE, or export the dataset to a .jsonl or .parquet file and give that path.")
    return (f"cannot reach the Hub at {endpoint()} to read dataset {name!r} ({type(exc).__name__}): check the "
            "network or HF_ENDPOINT, or export the dataset to a .jsonl or .parquet file and give that path.")


@dataclass
class Overview:
    """What the form shows of a Hub dataset before anything is downloaded."""
    ref: HubRef
    configs: list[str]
    config: str
    splits: list[str]
    split: str
    columns: list[str]
    seconds: float


def overview(ref: HubRef | str, timeout: float = HUB_CHECK_S) -> Overview:
    """Exists? readable (not gated, not private)? its configs, the chosen config's splits and its
    columns, as ``datasets`` resolves them (the repo's listing and card, and one data file's schema:
    a Parquet footer or the first lines of a JSON/CSV file), never its rows. Raises ``DataError``
    with the fix."""
    import datasets
    from huggingface_hub import HfApi, constants

    ref = parse_ref(ref) if isinstance(ref, str) else ref
    start = time.perf_counter()
    if constants.HF_HUB_OFFLINE:
        raise DataError(hub_message(ref, RuntimeError("offline")))
    api = HfApi(endpoint=endpoint())
    try:
        api.dataset_info(ref.id, timeout=timeout)  # exists? within the budget (auth_check takes no timeout)
        api.auth_check(ref.id, repo_type="dataset")  # a gated repo's metadata is public, its files are not
        configs = list(datasets.get_dataset_config_names(ref.id))
        config = ref.config or configs[0]
        if config not in configs:
            raise DataError(f"dataset {ref.id!r} has no config {config!r}; its configs are {configs}.")
        builder = datasets.load_dataset_builder(ref.id, config)
    except DataError:
        raise
    except Exception as exc:  # huggingface_hub's typed HTTP errors, httpx's connection errors, datasets' own
        raise DataError(hub_message(ref, exc)) from None
    layout = {str(k): list(v) for k, v in (builder.config.data_files or {}).items()}
    splits = list(layout) or ["train"]
    split = ref.split or ("train" if "train" in splits else splits[0])
    if split not in splits:
        raise DataError(f"dataset {ref.id!r} ({config}) has no split {split!r}; its splits are {splits}.")
    features = builder.info.features
    columns = list(features) if features else _columns(layout.get(split, []))
    return Overview(HubRef(ref.id, config, split), configs, config, splits, split, columns,
                    time.perf_counter() - start)


def _columns(urls: list[str]) -> list[str]:
    """The first data file's column names: a Parquet footer, or the first JSON line / CSV header."""
    if not urls:
        return []
    from huggingface_hub import HfFileSystem

    fs, url = HfFileSystem(endpoint=endpoint()), str(urls[0])
    try:
        if url.endswith(".parquet"):
            import pyarrow.parquet as pq
            with fs.open(url, "rb") as f:
                return list(pq.read_schema(f).names)
        with fs.open(url, "rb", block_size=1 << 16) as f:
            head = f.read(1 << 16).decode("utf-8", "replace")
    except Exception:
        return []
    if url.endswith(".csv"):
        import csv
        return next(csv.reader(head.splitlines()), [])
    import json
    first = head.lstrip().lstrip("[").lstrip().splitlines()[0] if head.strip() else ""
    try:
        return list(json.loads(first.rstrip(",")))
    except ValueError:
        return []


# ---- the worker's download -----------------------------------------------------------------------------

def load(ref: HubRef | str, on_progress=None):
    """The split as a ``datasets.Dataset``: every data file of the config fetched through
    ``datasets``' own download path (``on_progress(files_done, files_total)``: the builder prepares
    all splits), then built by ``datasets`` from its cache, so a second call downloads nothing.
    With ``HF_HUB_OFFLINE=1`` only the local cache is read."""
    import datasets

    ref = parse_ref(ref) if isinstance(ref, str) else ref
    try:
        builder = datasets.load_dataset_builder(ref.id, ref.config)
        layout = {str(k): list(v) for k, v in (builder.config.data_files or {}).items()}
        split = ref.split or ("train" if "train" in layout or not layout else next(iter(layout)))
        if layout and split not in layout:
            raise DataError(f"dataset {ref.id!r} has no split {split!r}; its splits are {list(layout)}.")
        files = [url for urls in layout.values() for url in urls]
        if files and not datasets.config.HF_HUB_OFFLINE:
            from datasets.download import DownloadConfig, DownloadManager
            manager = DownloadManager(download_config=DownloadConfig())
            for done, url in enumerate(files, 1):
                manager.download(url)
                if on_progress:
                    on_progress(done, len(files))
        builder.download_and_prepare()
        return builder.as_dataset(split=split)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(hub_message(ref, exc)) from None
