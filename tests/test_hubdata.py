"""Datasets by Hub id through the real ``datasets`` client, against the fake Hub (tests/fakehub.py):
download with progress and cache, configs and splits, column mapping, seeded samples, and what a
gated, private, missing or unreachable dataset is told."""
import pytest

from fakehub import TOKEN, parquet_bytes
from qalora.data import records as data, hub as hubdata
from qalora.errors import DataError

ALPACA = [{"instruction": f"Name the colour number {i}.", "input": "" if i % 2 else f"hint {i}",
           "output": f"Colour {i}."} for i in range(24)]
QA = [{"question": f"What is {i} + 1?", "answer": f"{i + 1}", "context": f"count {i}"} for i in range(30)]
CARD = """---
configs:
- config_name: easy
  data_files:
  - split: train
    path: easy/train-*.parquet
  - split: test
    path: easy/test.parquet
- config_name: hard
  data_files:
  - split: train
    path: hard/train.parquet
---
# Two configs
"""


def add_repos(hub):
    hub.add("team/alpaca-mini", {"data/train-00000-of-00002.parquet": parquet_bytes(ALPACA[:12]),
                                 "data/train-00001-of-00002.parquet": parquet_bytes(ALPACA[12:])})
    hub.add("team/qa", {"README.md": CARD, "easy/train-00000.parquet": parquet_bytes(QA[:20]),
                        "easy/test.parquet": parquet_bytes(QA[20:25]), "hard/train.parquet": parquet_bytes(QA[25:])})
    hub.add("team/gated", {"data/train.parquet": parquet_bytes(ALPACA)}, gated=True)
    hub.add("team/private", {"data/train.parquet": parquet_bytes(ALPACA)}, private=True)


def alpaca_record(row):
    user = f"{row['instruction']}\n\n{row['input']}" if row["input"] else row["instruction"]
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]}


def test_parse_ref():
    assert hubdata.parse_ref("org/name") == hubdata.HubRef("org/name")
    assert hubdata.parse_ref(" org/name:cfg@test ") == hubdata.HubRef("org/name", "cfg", "test")
    assert str(hubdata.parse_ref("org/name@validation")) == "org/name@validation"
    with pytest.raises(DataError, match=r"ID\[:CONFIG\]\[@SPLIT\]"):
        hubdata.parse_ref("org/name:a:b")
    assert hubdata.looks_like_ref("tatsu-lab/alpaca") and not hubdata.looks_like_ref("./data/x.jsonl")


def test_download_with_progress_then_cached(dataset_hub):
    add_repos(dataset_hub)
    seen = []
    records = data.load_records("team/alpaca-mini", on_progress=lambda done, total: seen.append((done, total)))
    assert records == [alpaca_record(r) for r in ALPACA]
    assert seen == [(1, 2), (2, 2)]
    fetched = [p for p in dataset_hub.fetched() if p.endswith(".parquet")]
    assert len(fetched) == 2
    assert data.load_records("team/alpaca-mini") == records  # the second time from the cache
    assert [p for p in dataset_hub.fetched() if p.endswith(".parquet")] == fetched


def test_configs_splits_and_column_mapping(dataset_hub):
    add_repos(dataset_hub)
    view = hubdata.overview("team/qa")
    assert (view.configs, view.config, view.splits, view.split) == (["easy", "hard"], "easy", ["train", "test"],
                                                                    "train")
    assert sorted(view.columns) == ["answer", "context", "question"]
    assert hubdata.overview("team/qa:hard").splits == ["train"]
    assert not [p for p in dataset_hub.fetched() if p.endswith(".parquet")]  # the form's check reads no rows
    with pytest.raises(DataError, match=r"match no known record format"):
        data.load_records("team/qa:easy@test")
    columns = {"prompt": "question", "input": "context", "response": "answer"}
    test = data.load_records("team/qa:easy@test", columns=columns)
    assert test == [{"messages": [{"role": "user", "content": f"{r['question']}\n\n{r['context']}"},
                                  {"role": "assistant", "content": r["answer"]}]} for r in QA[20:25]]
    hard = data.load_records("team/qa:hard", columns={"prompt": "question", "response": "answer"})
    assert [r["messages"][1]["content"] for r in hard] == [r["answer"] for r in QA[25:]]
    with pytest.raises(DataError, match=r"no column 'reply' \(mapped as response\).*'answer'"):
        data.load_records("team/qa:hard", columns={"prompt": "question", "response": "reply"})
    with pytest.raises(DataError, match=r"no config 'medium'; its configs are \['easy', 'hard'\]"):
        hubdata.overview("team/qa:medium")
    with pytest.raises(DataError, match=r"no split 'validation'; its splits are \['train', 'test'\]"):
        hubdata.overview("team/qa:easy@validation")


def test_seeded_sample(dataset_hub):
    add_repos(dataset_hub)
    full = data.load_records("team/alpaca-mini")
    a = data.load_records("team/alpaca-mini", max_samples=10, seed=3)
    assert len(a) == 10 and a == data.load_records("team/alpaca-mini", max_samples=10, seed=3)
    assert a != data.load_records("team/alpaca-mini", max_samples=10, seed=4)
    assert [full.index(r) for r in a] == sorted(full.index(r) for r in a)  # a subset, in the source's order


@pytest.mark.parametrize("repo, says", [
    ("team/gated", r"'team/gated' is gated: accept its conditions.*HF_TOKEN"),
    ("team/private", r"'team/private' was not found on the Hub at http://127\.0\.0\.1:\d+, or it is private"),
    ("team/nothing", r"'team/nothing' was not found on the Hub"),
])
def test_refusals(dataset_hub, repo, says):
    add_repos(dataset_hub)
    with pytest.raises(DataError, match=says):
        hubdata.overview(repo)
    with pytest.raises(DataError, match=says):
        data.load_records(repo)


def test_gated_and_private_with_a_token(dataset_hub, monkeypatch):
    add_repos(dataset_hub)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert hubdata.overview("team/gated").columns == ["instruction", "input", "output"]
    assert data.load_records("team/private") == [alpaca_record(r) for r in ALPACA]


def test_unreachable(dataset_hub, monkeypatch):
    import socket

    from huggingface_hub import constants
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("HF_ENDPOINT", dead)
    monkeypatch.setattr(constants, "ENDPOINT", dead)
    with pytest.raises(DataError, match=r"cannot reach the Hub at http://127\.0\.0\.1:\d+ to read dataset 'team/qa'"):
        hubdata.overview("team/qa")


def test_offline_reads_only_the_cache(dataset_hub, monkeypatch):
    import datasets
    from huggingface_hub import constants
    add_repos(dataset_hub)
    first = data.load_records("team/alpaca-mini")
    for module, name in ((constants, "HF_HUB_OFFLINE"), (datasets.config, "HF_HUB_OFFLINE")):
        monkeypatch.setattr(module, name, True)
    before = len(dataset_hub.requests)
    assert data.load_records("team/alpaca-mini") == first
    assert len(dataset_hub.requests) == before
    with pytest.raises(DataError, match=r"'team/qa' is not in the local datasets cache and Hub downloads are off"):
        data.load_records("team/qa")


def test_mapping_rules():
    # the columns that need no mapping are those that name a record format in qalora.data.records
    assert set(hubdata.RECORD_COLUMNS) == {key for key, _ in data.FORMATS.values()}
    assert hubdata.parse_columns("prompt=q, response=a") == {"prompt": "q", "response": "a"}
    with pytest.raises(DataError, match="no response column"):
        hubdata.parse_columns("prompt=q")
    with pytest.raises(DataError, match="'messages' stands alone"):
        hubdata.check_columns({"messages": "m", "prompt": "q"})
    with pytest.raises(DataError, match=r"unknown role\(s\) \['question'\]"):
        hubdata.check_columns({"question": "q"})
    assert hubdata.guess_columns(["user", "chip2"]) == {"prompt": "user", "response": "chip2"}
    assert hubdata.guess_columns(["inputs", "targets", "task"]) == {"prompt": "inputs", "response": "targets"}
    assert hubdata.paper_dataset("paper:alpaca").ref == "tatsu-lab/alpaca"
    assert hubdata.paper_dataset("akoksal/LongForm").columns == {"prompt": "input", "response": "output"}


def test_fine_tune_on_a_hub_dataset(dataset_hub, tmp_path):
    """The library's fine-tune downloads a Hub dataset in its data stage (progress per file), maps its
    columns, trains on the seeded sample, and the mapping and sample are in the run's fingerprint."""
    from qalora.config import AdapterConfig, QuantConfig, TrainConfig
    from qalora.training.finetune import finetune
    from qalora.training.loop import latest_checkpoint, read_fingerprint

    add_repos(dataset_hub)
    dataset_hub.add("team/qa-big", {f"data/train-{i}.parquet": parquet_bytes(QA[i * 10:(i + 1) * 10])
                                    for i in range(3)})
    events = []
    columns = {"prompt": "question", "response": "answer"}
    cfg = TrainConfig(steps=2, batch_size=2, seq_len=128, lr=1e-3, warmup_steps=1, eval_every=2, save_every=2,
                      eval_batches=1, seed=5)
    report = finetune("tiny-random", "team/qa-big", tmp_path, QuantConfig(4, 32), AdapterConfig(rank=4), cfg,
                      on_stage=lambda s: events.append(s), columns=columns, max_samples=20,
                      on_progress=lambda stage, done, total: events.append((stage, done, total)))
    data_events = events[events.index("data") + 1:events.index("quantize")]
    assert data_events == [("data", 1, 5), ("data", 2, 5), ("data", 3, 5), ("data", 3, 5), ("data", 4, 5),
                           ("data", 5, 5)]
    assert report["train_examples"] + report["eval_examples"] == 20
    assert (report["columns"], report["max_samples"]) == (columns, 20)
    saved = read_fingerprint(latest_checkpoint(tmp_path / "checkpoints"))
    assert saved["data_selection"] == {"columns": columns, "max_samples": 20}


def test_job_spec_carries_the_mapping_and_the_papers_datasets():
    from jobs.spec import JobSpec

    spec = JobSpec(data="paper:flan-v2")
    assert (spec.data, spec.columns, spec.max_samples) == ("itay1itzhak/flan_2022_350k",
                                                           {"prompt": "prompt", "response": "completion"}, 320_000)
    again = JobSpec.from_dict(spec.to_dict())
    assert (again.data, again.columns, again.max_samples) == (spec.data, spec.columns, spec.max_samples)
    mine = JobSpec(data="tatsu-lab/alpaca", columns={"prompt": "instruction", "response": "output"}, max_samples=100)
    assert mine.columns == {"prompt": "instruction", "response": "output"} and mine.max_samples == 100
    assert "columns" not in JobSpec().to_dict()  # a spec without them reads as it always did
    with pytest.raises(DataError, match=r"the paper's datasets are paper:alpaca, paper:flan-v2"):
        JobSpec(data="paper:nope")
