"""The app's charts: whole steps, one hue per job, labelled points, round padded axes, SVG."""
import pandas as pd

import charts


def _curves(jobs=("#1 a", "#2 b"), steps=5):
    rows = [(job, split, step, 2.0 - 0.1 * step - 0.05 * i - (0.02 if split == "eval" else 0))
            for i, job in enumerate(jobs) for split in ("train", "eval") for step in range(1, steps + 1)]
    return pd.DataFrame(rows, columns=["job", "split", "x", "loss"])


def _layers(chart):
    spec = chart.to_dict()
    return spec, spec["layer"]


def test_steps_are_whole_numbers_over_the_run_and_the_loss_axis_is_round_and_padded():
    """Before: the native plot ticked a 5-step run every 0.1 step and labelled 196.622674."""
    spec, (lines, tags) = _layers(charts.curves(_curves(steps=5), total=8))
    x = lines["encoding"]["x"]
    assert x["axis"]["tickMinStep"] == 1 and x["axis"]["format"] == "d"
    assert x["scale"]["domain"] == [0, 8] and x["scale"]["nice"] is False and x["scale"]["padding"] > 0
    y = lines["encoding"]["y"]
    assert y["axis"]["format"] == charts.NUMBER and y["scale"]["nice"] is True
    lo, hi = y["scale"]["domain"]
    losses = _curves(steps=5)["loss"]
    assert lo < losses.min() and hi > losses.max()  # no point on the frame
    assert spec["usermeta"]["embedOptions"]["renderer"] == "svg"
    tokens = charts.curves(_curves(), "training tokens seen", total=12_000, whole=False).to_dict()["layer"][0]
    assert tokens["encoding"]["x"]["axis"]["format"] == "~s"  # 12k, not 12000.0


def test_each_job_keeps_one_hue_dark_for_train_light_and_dashed_for_eval():
    _, (lines, tags) = _layers(charts.curves(_curves(("#1 a", "#2 b", "#3 c"))))
    scale = lines["encoding"]["color"]["scale"]
    assert scale["domain"] == ["#1 a train", "#1 a eval", "#2 b train", "#2 b eval", "#3 c train", "#3 c eval"]
    assert scale["range"] == [c for pair in charts.PAIRS[:3] for c in pair]
    assert lines["encoding"]["strokeDash"]["scale"] == {"domain": ["train", "eval"], "range": [[1, 0], [5, 3]]}
    # every train line ends in its job's number, at its last step
    spec = charts.curves(_curves(("#1 a", "#3 c"), steps=4)).to_dict()
    ends = spec["datasets"][spec["layer"][1]["data"]["name"]]
    assert [(e["tag"], e["x"], e["split"]) for e in ends] == [("#1", 4, "train"), ("#3", 4, "train")]


def test_scatter_points_are_labelled_inside_a_padded_frame():
    """Before: points without labels, a frontier point clipped in the corner."""
    points = pd.DataFrame([{"job": "#1 p-2bit", "merged_mb": 60.0, "quality": 1.9, "frontier": "frontier",
                            "bits": 2, "group_size": 32, "rank": 4},
                           {"job": "#2 p-4bit", "merged_mb": 96.0, "quality": 1.4, "frontier": "frontier",
                            "bits": 4, "group_size": 32, "rank": 4},
                           {"job": "#3 p-8bit", "merged_mb": 180.0, "quality": 1.45, "frontier": "dominated",
                            "bits": 8, "group_size": 32, "rank": 4}])
    spec = charts.scatter(points, "eval loss (merged)").to_dict()
    dots, left, right = spec["layer"]
    (xlo, xhi), (ylo, yhi) = dots["encoding"]["x"]["scale"]["domain"], dots["encoding"]["y"]["scale"]["domain"]
    assert xlo < 60 and xhi > 180 and ylo < 1.4 and yhi > 1.9
    labelled = {row["job"]: layer["mark"]["align"] for layer in (left, right)
                for row in spec["datasets"][layer["data"]["name"]]}
    assert labelled == {"#1 p-2bit": "left", "#2 p-4bit": "left", "#3 p-8bit": "right"}  # reads inward
    assert left["encoding"]["text"]["field"] == "job"
    assert dots["encoding"]["color"]["scale"]["range"] == ["#16a34a", "#9ca3af"]


def test_a_loss_axis_never_reads_below_zero_when_no_loss_is():
    assert charts._padded(0.0036, 0.0665) == [0.0, 0.0665 + (0.0665 - 0.0036) * 0.08]
    assert charts._padded(-1.0, 1.0) == [-1.16, 1.16]  # a quantity that can be negative keeps its room
