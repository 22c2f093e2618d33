"""Sweeps at the service level: the grid's expansion, what is refused and why, one sweep id, cancel all."""
import pytest

from jobs import service
from jobs.forms import FormError
from storage import db, repo
from helpers import count_validations

# The form's single values; a sweep axis left empty keeps them.
FORM = dict(kind="built-in", builtin="builtin:contacts", upload=None, path=None, base="tiny-random", bits=4,
            group_size=32, method="rtn", rank=4, alpha=8, lr=1e-3, steps=3, batch_size=2, seq_len=256, name="")


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("QALORA_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("QALORA_DB_URL", raising=False)
    return tmp_path


def _plan(grid, **changes):
    return service.plan_sweep(grid, **{**FORM, **changes})


def test_a_grid_expands_to_one_spec_per_combination_and_refuses_what_the_model_cannot_take(home):
    plan = _plan({"bits": [2, 4], "group_size": [16, 32, 48], "rank": "4, 8", "lr": ""}, exports=["gguf", "peft"])
    # tiny-random's layers are 64 and 128 wide: 48 divides neither, so its 4 combinations are refused
    assert plan.values == {"bits": [2, 4], "group_size": [16, 32, 48], "rank": [4, 8], "lr": [1e-3]}
    assert len(plan.specs) == 8 and plan.total == 12
    assert sorted(c["group_size"] for c, _ in plan.refused) == [48] * 4
    assert {why for _, why in plan.refused} == {"group_size=48 does not divide in_features=64 of q_proj; valid "
                                                "group sizes for this model include [16, 32, 64]."}
    got = {(s.quant.bits, s.quant.group_size, s.adapter.rank): s for s in plan.specs}
    assert set(got) == {(b, g, r) for b in (2, 4) for g in (16, 32) for r in (4, 8)}
    for (bits, group, rank), spec in got.items():
        assert spec.name == f"tiny-random-{bits}bit-g{group}-r{rank}"
        assert spec.adapter.alpha == 2.0 * rank  # the form's alpha/rank (8/4) is kept
        assert spec.train.lr == 1e-3 and spec.train.steps == 3 and spec.base == "tiny-random"
        # GGUF's blocks of 32 cannot hold groups of 16: left out of those jobs only; PEFT everywhere
        assert spec.extra_exports == (("gguf", "peft") if group == 32 else ("peft",))
    summary = plan.summary()
    assert summary.startswith("**8 jobs** will be queued (bits 2, 4 × group size 16, 32, 48 × rank 4, 8 × "
                              "learning rate 0.001).")
    assert ("Refused 4 (bits 2, group size 48, rank 4; bits 2, group size 48, rank 8; bits 4, group size 48, rank 4; "
            "bits 4, group size 48, rank 8): group_size=48 does not divide in_features=64") in summary
    assert "Not exported in 4 job(s)" in summary and "GGUF: GGUF export needs a group size that is a multiple of " \
                                                     "32, got 16." in summary


def test_varying_the_learning_rate_names_it_and_a_given_name_prefixes_every_job(home):
    plan = _plan({"lr": "1e-4, 3e-4"}, name="probe")
    assert [s.name for s in plan.specs] == ["probe-4bit-g32-r4-lr0.0001", "probe-4bit-g32-r4-lr0.0003"]
    assert [s.train.lr for s in plan.specs] == [1e-4, 3e-4]


@pytest.mark.parametrize("grid, message", [
    ({"rank": "4, 0"}, "sweep: rank 0 must be at least 1."),
    ({"lr": "3e-4, 1"}, "sweep: learning rate 1 is outside the range that trains an adapter (1e-06 to 0.01; "
                        "typical 1e-4 to 3e-4)."),
    ({"rank": "4, eight"}, "sweep rank: 'eight' is not a whole number; separate values with commas, e.g. 8, 16."),
    ({"bits": [4, 5]}, "sweep: bits 5 is not offered; choose from 2, 3, 4, 8."),
    ({"group_size": [48, 96]}, "none of the 2 combinations can run on this model: group_size=48 does not divide "
                               "in_features=64 of q_proj"),
    ({"rank": ",".join(str(r) for r in range(1, 34)), "bits": [2, 4]},
     "this sweep makes 66 jobs; one sweep queues at most 64. Take some values out."),
    ({"dropout": [0.1]}, "sweep axes ['dropout'] are unknown; sweep over bits, group_size, rank, lr."),
])
def test_a_bad_sweep_is_refused_whole_with_the_reason_and_queues_nothing(home, grid, message):
    with pytest.raises(FormError) as err:
        _plan(grid)
    assert list(err.value.fields) == ["sweep"] and err.value.fields["sweep"].startswith(message)
    assert service.list_jobs() == []


def test_what_every_combination_shares_is_reported_in_its_own_field(home):
    with pytest.raises(FormError) as err:
        _plan({"bits": [2, 4]}, kind="upload")
    assert err.value.fields == {"data": "no file is uploaded; drop a .jsonl, .json, .csv or .parquet file on the "
                                        "upload box."}
    with pytest.raises(FormError) as err:
        _plan({"bits": [2, 4]}, steps=0)
    assert err.value.fields == {"advanced": "steps must be at least 1 (got 0)."}
    with pytest.raises(FormError) as err:  # the dataset's rows are read once, at full check
        _plan({"bits": [2, 4]}, seq_len=8)
    assert err.value.fields["advanced"].startswith("sequence length 8 cuts away the whole reply")


def test_a_sweep_is_queued_under_one_id_and_canceled_whole(home):
    plan = _plan({"bits": [2, 3, 4]})
    sweep_id, ids = service.submit_sweep(plan, "my probe")
    assert sweep_id.startswith("my-probe-") and len(ids) == 3
    assert [w["sweep_id"] for w in service.list_sweeps()] == [sweep_id] and service.list_sweeps()[0]["jobs"] == 3
    assert service.sweep_jobs(sweep_id) == ids
    assert {j["id"]: j["sweep_id"] for j in service.list_jobs()} == dict.fromkeys(ids, sweep_id)
    other = service.submit(plan.specs[0])  # a job outside the sweep is left alone
    running, ended, queued = ids
    with db() as s:
        assert repo.claim(s, "host:1:w", running) == running
    service.cancel(ended)
    out = service.cancel_sweep(sweep_id)
    assert out == {"canceled": [queued], "stopping": [running], "ended": [ended]}
    state = {j["id"]: (j["status"], j["cancel_requested"]) for j in service.list_jobs()}
    assert state == {running: ("running", True), ended: ("canceled", False), queued: ("canceled", False),
                     other: ("queued", False)}
    with pytest.raises(Exception, match="Sweep 'nope' has no jobs"):
        service.cancel_sweep("nope")


def test_a_sweep_over_bits_gives_each_job_its_bit_widths_clip_search_and_learned_scales(home):
    from qalora.config import preset_for

    plan = _plan({"bits": [2, 4], "group_size": [32], "rank": "", "lr": ""}, clip=False, train_scales=False)
    for spec in plan.specs:
        p = preset_for(spec.quant.bits)
        assert (spec.quant.clip, spec.adapter.train_scales, spec.adapter.scales_lr) == (
            p["clip"], p["train_scales"], p["scales_lr"])
    # one bit width: the form's own ticks, as the user left them
    one = _plan({"bits": [2], "group_size": [32], "rank": "", "lr": ""}, clip=False, train_scales=False)
    assert [(s.quant.clip, s.adapter.train_scales) for s in one.specs] == [(False, False)]


def test_each_spec_of_a_sweep_is_validated_once_and_queued_as_it_is(home, monkeypatch):
    calls = count_validations(monkeypatch)
    plan = _plan({"bits": [2, 4], "rank": "4, 8"})  # the dataset's rows are checked too, once
    _, ids = service.submit_sweep(plan, "once")
    assert len(ids) == 4 and sorted(calls) == sorted(s.name for s in plan.specs)
