"""JobSpec: round trip through JSON and refusal of bad specs at submission, with readable messages."""
import json

import pytest

from jobs.spec import JobSpec, model_dims
from qalora.config import AdapterConfig, QuantConfig, TrainConfig
from qalora.errors import ConfigError, DataError, ModelError


def _llama_dir(tmp_path, model_type="llama", hidden=96, inter=256, heads=4):
    d = tmp_path / f"{model_type}-{hidden}"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": model_type, "hidden_size": hidden,
                                               "intermediate_size": inter, "num_attention_heads": heads}))
    return d


def test_round_trip_through_json_keeps_every_setting():
    spec = JobSpec(base="tiny-random", data="builtin:default", quant=QuantConfig(3, 16, "gptq"),
                   adapter=AdapterConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj")),
                   train=TrainConfig(steps=7, seq_len=32, lr=1e-3), exports=("native",), name="mine")
    again = JobSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec and again.adapter.targets == ("q_proj", "v_proj")
    assert JobSpec(base="tiny-random").name == "tiny-random-4bit-g32-r16"


def test_unknown_fields_and_bad_settings_are_refused():
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['epochs'\]"):
        JobSpec.from_dict({"epochs": 3})
    with pytest.raises(ConfigError, match=r"QuantConfig: unknown setting\(s\) \['bitz'\]"):
        JobSpec.from_dict({"quant": {"bitz": 4}})
    with pytest.raises(ConfigError, match="bits=5 is not supported"):
        JobSpec.from_dict({"quant": {"bits": 5}})
    with pytest.raises(ConfigError, match=r"export format\(s\) \['onnx'\] are not available"):
        JobSpec(exports=("native", "onnx"))


@pytest.mark.parametrize("base,group,layer", [("default", 128, "q_proj"), ("tiny-random", 128, "q_proj"),
                                              ("tiny-random", 48, "q_proj")])
def test_group_size_must_divide_every_target(base, group, layer):
    with pytest.raises(ConfigError, match=f"group_size={group} does not divide .* of {layer}"):
        JobSpec(base=base, quant=QuantConfig(group_size=group)).validate()


def test_group_size_is_checked_per_layer_against_a_local_config(tmp_path):
    d = _llama_dir(tmp_path, hidden=96, inter=256)
    assert model_dims(str(d)) == (96, 96, 256)
    JobSpec(base=str(d), quant=QuantConfig(group_size=32)).validate()
    with pytest.raises(ConfigError, match="in_features=96 of q_proj"):
        JobSpec(base=str(d), quant=QuantConfig(group_size=64)).validate()
    only_down = AdapterConfig(targets=("down_proj",))
    JobSpec(base=str(d), quant=QuantConfig(group_size=64), adapter=only_down).validate()  # 256 % 64 == 0


def test_missing_or_foreign_base_models_are_refused(tmp_path):
    with pytest.raises(ModelError, match="'nowhere/at/all' was not found"):
        JobSpec(base="nowhere/at/all").validate()
    with pytest.raises(ModelError, match="GGUF file .*missing.gguf does not exist"):
        JobSpec(base=str(tmp_path / "missing.gguf")).validate()
    with pytest.raises(ModelError, match="'gpt2' model; QA-LoRA Studio supports LLaMA-family"):
        JobSpec(base=str(_llama_dir(tmp_path, model_type="gpt2"))).validate()
    with pytest.raises(ModelError, match="has no config.json"):
        JobSpec(base=str(tmp_path)).validate()
    assert model_dims("HuggingFaceTB/SmolLM2-135M") is None  # a Hub id: resolved by the worker


def test_data_sources_are_checked_and_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="'missing.jsonl' not found"):
        JobSpec(base="tiny-random", data="missing.jsonl").validate()
    with pytest.raises(DataError, match="builtin:nope is not a built-in dataset; choose one of"):
        JobSpec(base="tiny-random", data="builtin:nope").validate()
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"notes.txt: unsupported file type \.txt"):
        JobSpec(base="tiny-random", data="notes.txt").validate()
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty.jsonl is empty"):
        JobSpec(base="tiny-random", data="empty.jsonl").validate()
    (tmp_path / "ok.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    spec = JobSpec(base="tiny-random", data="ok.jsonl").validate()
    assert spec.data == str(tmp_path / "ok.jsonl")


def test_extra_exports_are_checked_at_submission():
    spec = JobSpec(base="tiny-random", exports=("gguf",))
    assert spec.exports == ("native", "adapter", "gguf") and spec.extra_exports == ("gguf",)
    assert JobSpec.from_dict(spec.to_dict()).exports == spec.exports
    with pytest.raises(ConfigError, match="GGUF export needs a group size that is a multiple of 32, got 16"):
        JobSpec(base="tiny-random", quant=QuantConfig(group_size=16), exports=("gguf",)).validate()
    JobSpec(base="tiny-random", quant=QuantConfig(bits=8, group_size=16), exports=("gguf", "gptq")).validate()


def test_a_run_name_longer_than_the_jobs_table_holds_is_refused_before_it_is_queued():
    from jobs.spec import MAX_NAME
    from qalora.errors import ConfigError

    JobSpec(name="x" * MAX_NAME)
    with pytest.raises(ConfigError, match=f"the run name has {MAX_NAME + 1} characters; keep it to {MAX_NAME}"):
        JobSpec(name="x" * (MAX_NAME + 1))
