import json
import os

import pytest

from qalora.config import AdapterConfig, QuantConfig, TrainConfig
from qalora.pipeline import BASE_CACHE, TrainingStopped, finetune

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


def test_stop_then_resume_reuses_base_and_continues(tmp_path):
    stages = []
    with pytest.raises(TrainingStopped):
        finetune("tiny-random", "builtin:default", tmp_path, QuantConfig(4, 32), AdapterConfig(rank=4), tcfg(),
                 should_stop=lambda: True, on_stage=stages.append)
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
