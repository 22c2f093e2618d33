import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# The device switch: QALORA_TEST_DEVICE=cuda runs the same tests on a GPU. Unit tests take it from
# helpers.DEVICE (or the `device` fixture); the pipeline, the worker and the chat take it from
# QALORA_DEVICE, which qalora.model.pick_device honours.
TEST_DEVICE = os.environ.get("QALORA_TEST_DEVICE", "cpu")
os.environ["QALORA_DEVICE"] = TEST_DEVICE

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
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
