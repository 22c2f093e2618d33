"""Heap handed back during a CPU forward: the hooks, where they go, and that they change nothing."""
import torch

from helpers import DEVICE, tiny_qalora
from qalora import memory


def test_freed_heap_is_released_a_few_times_per_forward_on_the_cpu_only(monkeypatch):
    model, _ = tiny_qalora()
    calls = []
    monkeypatch.setattr(memory, "release_freed_memory", lambda: calls.append(1))
    ids = torch.randint(0, 250, (2, 9), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    plain = model(input_ids=ids).logits
    with memory.released_between_layers(model, "cpu") as n:
        assert n == 2  # 2 layers: after each
        assert torch.equal(model(input_ids=ids).logits, plain)
    assert len(calls) == 2
    model(input_ids=ids)
    assert len(calls) == 2  # the hooks are gone after the block
    with memory.released_between_layers(model, "cuda") as n:
        assert n == 0  # the caching allocator owns GPU memory


def test_thirty_layers_release_four_times():
    layers = torch.nn.ModuleList(torch.nn.Identity() for _ in range(30))
    model = torch.nn.Module()
    model.base_model_prefix = "model"
    model.model = torch.nn.Module()
    model.model.layers = layers
    with memory.released_between_layers(model, "cpu") as n:
        assert n == memory.TRIMS_PER_FORWARD == 4
        assert [i for i, m in enumerate(layers) if m._forward_hooks] == [7, 14, 22, 29]
