import json
import os
import resource
from pathlib import Path

import pytest
import torch

from qalora.config import AdapterConfig, QuantConfig, TrainConfig
from qalora.training.finetune import BASE_CACHE, TrainingStopped, finetune

os.environ.setdefault("GPTQMODEL_DISABLE_PACK_EXT", "1")


def tcfg(**kw):
    return TrainConfig(**{**dict(steps=6, batch_size=2, seq_len=320, lr=2e-3, warmup_steps=1, eval_every=3,
                                 save_every=3, eval_batches=2), **kw})


def test_gptq_pipeline_merges_exactly(tmp_path):
    report = finetune("tiny-random", "builtin:default", tmp_path, QuantConfig(3, 32, "gptq"), AdapterConfig(rank=4),
                      tcfg(steps=3))
    assert report["quant_method"] == "gptq" and report["bits"] == 3
    assert report["merge_max_abs_logit_diff"] <= 1e-4
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["quantization_config"]["method"] == "gptq"
    # A finished run no longer needs the quantized-base cache kept for resumes (as big as the model).
    assert not (tmp_path / BASE_CACHE).exists()


def test_a_bf16_run_is_checked_for_exactness_in_fp32_and_saved_in_bf16(tmp_path):
    """A bf16 run (the default on a GPU) merges as exactly as an fp32 one: the check computes both
    models in fp32, since in bf16 the adapter and merged models round differently (~0.05 logits on
    an H200), and the merged model goes back to bf16 for its eval and its checkpoint."""
    from safetensors import safe_open
    report = finetune("tiny-random", "builtin:default", tmp_path, QuantConfig(4, 32), AdapterConfig(rank=4),
                      tcfg(steps=3, dtype="bfloat16"))
    assert report["dtype"] == "torch.bfloat16" and report["merge_check_dtype"] == "torch.float32"
    assert report["merge_max_abs_logit_diff"] <= 1e-4
    with safe_open(tmp_path / "merged" / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16
        assert f.get_tensor("model.embed_tokens.weight.q8_0").dtype == torch.int8  # 8 bits, never widened
        assert f.get_tensor("model.layers.0.mlp.up_proj.offset").dtype == torch.float32


def test_seed_decides_the_adapter_even_after_other_runs_in_the_process(tmp_path):
    """Two identical jobs in one worker process give identical adapters: the seed is applied
    before the adapter is initialised, not after (the global RNG has moved on between jobs)."""
    from safetensors.torch import load_file

    from qalora.models.tiny import tiny_random_llama

    model, tok = tiny_random_llama()
    model.save_pretrained(tmp_path / "base", max_shard_size="200KB")  # the streamed (safetensors) path
    tok.save_pretrained(tmp_path / "base")
    args = (str(tmp_path / "base"), "builtin:default")
    kw = dict(quant=QuantConfig(4, 32), adapter=AdapterConfig(rank=4), train_cfg=tcfg(steps=1, eval_every=1))
    first = finetune(*args, tmp_path / "a", **kw)
    torch.rand(1000)  # whatever else the process did in between
    second = finetune(*args, tmp_path / "b", **kw)
    a, b = (load_file(tmp_path / d / "adapter" / "adapter_model.safetensors") for d in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert first["train_losses"] == second["train_losses"]
    assert first["merge_max_abs_logit_diff"] <= 1e-4


def test_peak_rss_is_the_runs_own_not_the_process_lifetime(tmp_path):
    big = torch.ones(384 * 2 ** 20)  # 1.5 GiB, written, so resident
    big += 1
    del big
    lifetime_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report = finetune("tiny-random", "builtin:default", tmp_path, QuantConfig(4, 32), AdapterConfig(rank=4),
                      tcfg(steps=1))
    assert 0 < report["peak_rss_mb"] < lifetime_mb - 1000, (report["peak_rss_mb"], lifetime_mb)


def test_stop_then_resume_reuses_base_and_continues(tmp_path):
    stages, done = [], []
    with pytest.raises(TrainingStopped):  # asked to stop once a step is done: after step 1
        finetune("tiny-random", "builtin:default", tmp_path, QuantConfig(4, 32), AdapterConfig(rank=4), tcfg(),
                 should_stop=lambda: bool(done), on_stage=stages.append, on_step=lambda info: done.append(info))
    assert (tmp_path / BASE_CACHE).is_file() and "merge" not in stages
    steps = []
    report = finetune("tiny-random", "builtin:default", tmp_path, QuantConfig(4, 32), AdapterConfig(rank=4), tcfg(),
                      on_step=lambda info: steps.append(info.step))
    assert steps == [2, 3, 4, 5, 6]
    assert report["resumed_from_step"] == 1 and report["steps"] == 6 and len(report["train_losses"]) == 6
    uninterrupted = finetune("tiny-random", "builtin:default", tmp_path / "u", QuantConfig(4, 32),
                             AdapterConfig(rank=4), tcfg())
    assert report["train_losses"] == uninterrupted["train_losses"]
    assert report["eval_loss_merged"] == pytest.approx(uninterrupted["eval_loss_merged"], abs=1e-6)


def test_a_failed_save_leaves_the_previous_model_untouched(tmp_path, monkeypatch):
    import errno

    import safetensors.torch

    from jobs.pipeline import describe_error

    finetune("tiny-random", "builtin:default", tmp_path, QuantConfig(4, 32), AdapterConfig(rank=4), tcfg(steps=1))
    before = (tmp_path / "merged" / "model.safetensors").read_bytes()
    real = safetensors.torch.save_file

    def disk_full(tensors, filename, *args, **kwargs):
        if "merged" in str(filename):
            Path(filename).write_bytes(b"half a model")  # what a full disk leaves behind
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError) as exc:
        finetune("tiny-random", "builtin:default", tmp_path, QuantConfig(4, 32), AdapterConfig(rank=4), tcfg(steps=1))
    assert (tmp_path / "merged" / "model.safetensors").read_bytes() == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith((".partial-", ".old-"))]
    assert "Out of disk space" in describe_error(exc.value, None)


def test_resume_refuses_checkpoints_of_other_settings_or_data(tmp_path):
    from qalora.errors import ConfigError

    data = tmp_path / "data.jsonl"
    rows = [{"instruction": f"Say {w}.", "output": w} for w in ("red", "green", "blue", "cyan", "pink", "gold")]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    run = tmp_path / "run"
    args = ("tiny-random", str(data), run, QuantConfig(4, 32), AdapterConfig(rank=4))
    done = []
    with pytest.raises(TrainingStopped):  # stopped after step 1, leaving its checkpoint
        finetune(*args, tcfg(seq_len=64), should_stop=lambda: bool(done), on_step=done.append)
    with pytest.raises(ConfigError, match=r"different run \(train: .*'lr': 0.002.*'lr': 0.01"):
        finetune(*args, tcfg(seq_len=64, lr=1e-2))
    data.write_text("\n".join(json.dumps(r) for r in rows[::-1]))  # same size, other contents
    with pytest.raises(ConfigError, match="different run \\(data: was '.* bytes, sha256"):
        finetune(*args, tcfg(seq_len=64))
    data.write_text("\n".join(json.dumps(r) for r in rows))
    report = finetune(*args, tcfg(seq_len=64, eval_every=2))  # evaluation cadence may change
    assert report["resumed_from_step"] == 1 and report["steps"] == 6


def test_every_stage_reports_its_progress_and_finishing_reuses_the_last_evaluation(tmp_path):
    """data, quantize, merge, verify and save each report (done, total) ending at total; the adapter's
    eval loss is the training loop's last evaluation (not recomputed); the merged model's eval runs on
    the int4 kernel where the CPU has it, within kernel rounding of the exact (dequantized) loss."""
    from qalora.method.kernels import int4_kernel_supported

    seen: dict[str, list[tuple[int, int]]] = {}
    stages = []
    report = finetune("tiny-random", "builtin:default", tmp_path, QuantConfig(4, 32), AdapterConfig(rank=4),
                      tcfg(steps=4, eval_every=2), on_stage=stages.append,
                      on_progress=lambda stage, done, total: seen.setdefault(stage, []).append((done, total)))
    assert stages == ["load", "data", "quantize", "train", "merge", "verify", "save", "done"]
    for stage in ("data", "quantize", "merge", "verify", "save"):
        done = [d for d, _ in seen[stage]]
        total = seen[stage][-1][1]
        assert done == sorted(done) and done[-1] == total > 0, (stage, seen[stage])
    assert seen["merge"][-1][1] == 2 * 7  # tiny-random: 2 layers x 7 projections merged one by one
    assert seen["verify"][-1][1] == 4 + 2  # 4 check batches (under 1,024 tokens) + eval_batches=2
    assert report["eval_loss_adapter"] == report["eval_losses"]["4"]  # the last step's evaluation, reused
    from qalora.models.model import pick_device
    from qalora.models.tiny import tiny_random_llama
    supported = {int4_kernel_supported(pick_device(), 4, 32, m.in_features, m.out_features)
                 for n, m in tiny_random_llama()[0].named_modules() if ".layers." in n and isinstance(m, torch.nn.Linear)}
    assert report["eval_merged_path"] == {frozenset({True}): "int4 kernel",
                                          frozenset({False}): "dequantize"}.get(frozenset(supported), "mixed")
    # the kernel rounds scales and zeros to bf16: the loss moves by far less than training changed it
    assert abs(report["eval_loss_merged"] - report["eval_loss_adapter"]) < 0.02
    assert report["merge_max_abs_logit_diff"] <= 1e-4  # the exactness check stays on the reference path


class _Killed(Exception):
    """Stands for the process dying at the start of training: the quantized base is cached, no
    checkpoint is written."""


def _killed_at_train(name):
    if name == "train":
        raise _Killed


def test_the_quantized_base_cache_serves_only_the_base_and_data_it_was_made_from(tmp_path):
    """A resume with another base of the same shape (or, for GPTQ, other calibration data) before the
    first checkpoint quantizes again; it trained on the cached base's codes."""
    from qalora.deployment.export.native import load_quantized
    from qalora.models.model import quantize_model
    from qalora.models.tiny import tiny_random_llama

    bases = {}
    for seed in (1, 2):
        model, tok = tiny_random_llama(seed)
        bases[seed] = tmp_path / f"base-{seed}"
        model.save_pretrained(bases[seed])
        tok.save_pretrained(bases[seed])
    out, quant, targets = tmp_path / "run", QuantConfig(4, 32), AdapterConfig(rank=4).targets
    with pytest.raises(_Killed):
        finetune(str(bases[1]), "builtin:default", out, quant, AdapterConfig(rank=4), tcfg(), on_stage=_killed_at_train)
    assert (out / BASE_CACHE).is_file() and not (out / "checkpoints").exists()
    finetune(str(bases[2]), "builtin:default", out, quant, AdapterConfig(rank=4), tcfg(steps=2))
    merged, _ = load_quantized(out / "merged")
    expected = quantize_model(tiny_random_llama(2)[0], quant, targets)
    name = "model.layers.1.mlp.down_proj"
    assert torch.equal(merged.get_submodule(name).packed, expected[name].packed)  # base 2's codes, not base 1's

    gptq = QuantConfig(4, 32, "gptq")
    for data in ("builtin:default", "builtin:contacts"):
        with pytest.raises(_Killed):
            finetune("tiny-random", data, tmp_path / "g", gptq, AdapterConfig(rank=4), tcfg(),
                     on_stage=_killed_at_train)
        if data == "builtin:default":
            first = (tmp_path / "g" / BASE_CACHE).read_bytes()
    assert (tmp_path / "g" / BASE_CACHE).read_bytes() != first  # other calibration data: quantized again


@pytest.mark.parametrize("at", ["load", "data", "quantize", "train"])
def test_a_stop_asked_for_in_a_stage_ends_the_run_at_its_next_boundary(tmp_path, at):
    stages = []
    with pytest.raises(TrainingStopped, match=f"stopped before stage {at!r}"):
        finetune("tiny-random", "builtin:default", tmp_path, QuantConfig(4, 32), AdapterConfig(rank=4), tcfg(),
                 should_stop=lambda: at in stages, on_stage=stages.append)
    assert stages[-1] == at and not (tmp_path / "checkpoints").exists()
