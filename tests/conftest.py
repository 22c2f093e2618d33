import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.pop("QALORA_ARTIFACTS", None)  # job folders go under each test's own QALORA_HOME
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# The device switch: QALORA_TEST_DEVICE=cuda runs the same tests on a GPU. Unit tests take it from
# helpers.DEVICE (or the `device` fixture); the pipeline, the worker and the chat take it from
# QALORA_DEVICE, which qalora.models.model.pick_device honours.
TEST_DEVICE = os.environ.get("QALORA_TEST_DEVICE", "cpu")
os.environ["QALORA_DEVICE"] = TEST_DEVICE
# Eager by default: compiling costs seconds per graph, more than the tiny models' whole runs. The
# compiled paths have their own tests (tests/test_compiled.py), which switch it on and compare
# with eager; QALORA_COMPILE=auto runs the whole suite the way the product runs.
os.environ.setdefault("QALORA_COMPILE", "0")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    # a test that takes `db_url` runs on both job databases unless marked for one
    config.addinivalue_line("markers", "sqlite_only(reason): runs on SQLite only; the reason says why")
    config.addinivalue_line("markers", "postgresql_only: runs on PostgreSQL only")
    if TEST_DEVICE.startswith("cuda") and not torch.cuda.is_available():
        pytest.exit(f"QALORA_TEST_DEVICE={TEST_DEVICE} but PyTorch sees no CUDA GPU", returncode=4)


def pytest_report_header(config):
    return f"qalora test device: {TEST_DEVICE}"


@pytest.fixture
def device() -> torch.device:
    from helpers import resolve_device
    return resolve_device(TEST_DEVICE)


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA; the CPU tests cover the same logic")
        for item in items:
            if "requires_cuda" in item.keywords:
                item.add_marker(skip)


# ---- the job database: a test that takes `db_url` (or `job_store`) runs on SQLite and PostgreSQL ----

BACKENDS = ("sqlite", "postgresql")


def pytest_generate_tests(metafunc):
    if "db_url" in metafunc.fixturenames:
        only = [b for b in BACKENDS if metafunc.definition.get_closest_marker(f"{b}_only")]
        metafunc.parametrize("db_url", only or BACKENDS, indirect=True)


@pytest.fixture(scope="session")
def postgres_url():
    """A database on one throwaway PostgreSQL server for the whole run (tests/pg.py); the test
    skips without Debian's postgresql package (fails, in CI)."""
    import pg
    with pg.server() as url:
        yield url


@pytest.fixture
def db_url(request):
    """None for SQLite (the default file under QALORA_HOME), else the URL of a new PostgreSQL
    database of this test's own: no rows, and no engine cached by storage.db, from another test."""
    if request.param == "sqlite":
        yield None
        return
    import pg
    from storage.db import _engines

    url = pg.create_database(request.getfixturevalue("postgres_url"))
    yield url
    for key in [k for k in _engines if k[1] == url]:
        _engines.pop(key)[0].dispose()
    pg.drop_database(url)


@pytest.fixture
def job_store(db_url, tmp_path, monkeypatch):
    """QALORA_HOME in tmp_path/home, the jobs in ``db_url``'s database; returns the settings."""
    from storage import get_settings

    monkeypatch.setenv("QALORA_HOME", str(tmp_path / "home"))
    if db_url:
        monkeypatch.setenv("QALORA_DB_URL", db_url)
    else:
        monkeypatch.delenv("QALORA_DB_URL", raising=False)
    return get_settings()


@pytest.fixture
def store(job_store, monkeypatch):
    """``job_store`` with a fast heartbeat and poll, for tests that run workers; returns the settings."""
    from storage import get_settings

    monkeypatch.setenv("QALORA_HEARTBEAT_S", "0.3")
    monkeypatch.setenv("QALORA_POLL_S", "0.1")
    return get_settings()


# ---- a fake Hugging Face Hub serving datasets (tests/fakehub.py), for the real datasets client ----

@pytest.fixture
def dataset_hub(monkeypatch, tmp_path):
    """The fake Hub, online, with empty caches of this test's own; ``hub.add(...)`` puts repos on it."""
    import datasets
    from huggingface_hub import constants

    from fakehub import DatasetHub

    with DatasetHub() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
        monkeypatch.setattr(datasets.config, "HF_ENDPOINT", hub.url)
        monkeypatch.setattr(datasets.config, "HUB_DATASETS_URL",
                            hub.url + "/datasets/{repo_id}/resolve/{revision}/{path}")
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
        yield hub


# ---- lm-evaluation-harness tasks written as YAML over local data (no download) ----

CITIES = ["Porto", "Oslo", "Lima", "Kyiv", "Quito", "Accra"]


@pytest.fixture(scope="session")
def lm_eval_tasks(tmp_path_factory):
    """Two lm-eval tasks as YAML files over local JSON data: multiple choice and log-likelihood."""
    folder = tmp_path_factory.mktemp("tasks")
    rows = [{"question": f"{name} lives in {city}. Where does {name} live?", "choices": CITIES[:4],
             "answer": CITIES[:4].index(city)}
            for name, city in zip(["Ana", "Bo", "Cy", "Di", "Ed", "Flo"], ["Porto", "Oslo", "Lima", "Kyiv", "Lima",
                                                                          "Oslo"])]
    from qalora.evaluation.benchmarks import write_choice_task

    write_choice_task(folder, "qa_mc", rows, prompt="Question: {{question}}\nAnswer:")
    (folder / "ll.jsonl").write_text("".join(json.dumps({"context": f"{r['question']} Answer:",
                                                         "target": " " + CITIES[r["answer"]]}) + "\n" for r in rows))
    (folder / "qa_ll.yaml").write_text(f"""task: qa_ll
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'll.jsonl'}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{target}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    return folder
