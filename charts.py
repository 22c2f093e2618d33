"""The app's charts as Vega-Lite specs (built with Altair), drawn as SVG by ``gr.Plot``.

Gradio's native plots cannot label points, pair colours or keep a step axis on whole numbers, so
the charts are specified here in full and the app only hands them data:

- steps are whole numbers on the axis (``tickMinStep`` 1, integer format) and the domain is the
  run's steps exactly, so no tick falls between two steps and no point sits on the frame;
- each job has one hue: its train line dark and solid, its eval line light and dashed (category20's
  pairs), so a job's two lines read together and train/eval differ by more than colour;
- every line ends in its job's number, every scatter point carries its job's label;
- value axes are padded and "nice" (round ticks, at most four significant digits), so nothing is
  clipped at an edge and no label reads 196.622674.

No torch and no Gradio here; pandas frames in, ``alt.Chart`` out.
"""
from __future__ import annotations

import altair as alt
import pandas as pd

# category20's ten pairs: (dark, light) of one hue each
PAIRS = [("#1f77b4", "#aec7e8"), ("#ff7f0e", "#ffbb78"), ("#2ca02c", "#98df8a"), ("#d62728", "#ff9896"),
         ("#9467bd", "#c5b0d5"), ("#8c564b", "#c49c94"), ("#e377c2", "#f7b6d2"), ("#7f7f7f", "#c7c7c7"),
         ("#bcbd22", "#dbdb8d"), ("#17becf", "#9edae5")]
FRONTIER = {"frontier": "#16a34a", "dominated": "#9ca3af"}
HEIGHT = 300
NUMBER = ",.4~g"  # at most four significant digits, no trailing zeros
# SVG, so each mark is an element a browser test (and a screen reader) can find by its label
EMBED = {"embedOptions": {"renderer": "svg", "actions": False}}
# Gradio centres a chart's box and gives it no width of its own: the app adds this to its CSS
CSS = ".chart .vega-embed { width: 100%; }"


def _frame(chart: alt.Chart, title: str) -> alt.Chart:
    # "container": the width of its box (CSS below), followed as the window resizes
    return chart.properties(title=title, width="container", height=HEIGHT, usermeta=EMBED) \
        .configure_axis(labelFontSize=11, titleFontSize=12).configure_legend(labelLimit=260, orient="bottom",
                                                                               columns=4)


def _padded(lo: float, hi: float, share: float = 0.08) -> list[float]:
    """``[lo, hi]`` widened by ``share`` of the span on each side (a flat span by 5% of its value);
    never below 0 when no value is (a loss axis reading -0.01 would be a lie)."""
    span = hi - lo if hi > lo else max(abs(hi) * 0.05, 1e-3)
    low = lo - span * share
    return [max(low, 0.0) if lo >= 0 else low, hi + span * share]


def _domain(values: pd.Series, share: float = 0.08) -> list[float]:
    return _padded(float(values.min()), float(values.max()), share)


def _step_axis(title: str, total: int, whole: bool) -> alt.X:
    """The x axis: whole steps (``whole``), or a quantity like tokens seen, from 0 to ``total``."""
    axis = (alt.Axis(tickMinStep=1, format="d", tickCount=min(max(int(total), 1), 10), title=title) if whole
            else alt.Axis(format="~s", tickCount=8, title=title))
    # the domain is the run's steps; 14 px of room past each end keeps edge points and end tags inside
    return alt.X("x:Q", axis=axis, scale=alt.Scale(domain=[0, max(int(total), 1)], nice=False, padding=14))


def _loss_axis(losses: pd.Series) -> alt.Y:
    return alt.Y("loss:Q", title="loss", axis=alt.Axis(format=NUMBER, tickCount=8),
                 scale=alt.Scale(domain=_domain(losses), zero=False, nice=True))


def curves(frame: pd.DataFrame, x_title: str = "step", total: int | None = None, whole: bool = True,
           title: str = "Train and eval loss") -> alt.Chart:
    """Loss curves of one or more jobs.

    ``frame``: one row per point, columns ``job`` (its label, e.g. ``"#3 pair-4bit"``), ``split``
    (``"train"`` or ``"eval"``), ``x`` (step or tokens) and ``loss``. ``total``: the x domain's end
    (default: the last x). Series are named ``"<job> <split>"``; each job keeps one hue.
    """
    frame = frame.assign(series=frame["job"] + " " + frame["split"])
    jobs = list(dict.fromkeys(frame["job"]))
    domain, colours = [], []
    for i, job in enumerate(jobs):
        dark, light = PAIRS[i % len(PAIRS)]
        domain += [f"{job} train", f"{job} eval"]
        colours += [dark, light]
    colour = alt.Color("series:N", title=None, scale=alt.Scale(domain=domain, range=colours),
                       legend=alt.Legend(symbolType="stroke"))
    x = _step_axis(x_title, total if total is not None else int(frame["x"].max()), whole)
    y = _loss_axis(frame["loss"])
    tooltip = [alt.Tooltip("job:N"), alt.Tooltip("split:N"), alt.Tooltip("x:Q", title=x_title, format=","),
               alt.Tooltip("loss:Q", format=".4f")]
    lines = alt.Chart(frame).mark_line(point=alt.OverlayMarkDef(size=18), strokeWidth=2).encode(
        x=x, y=y, color=colour, tooltip=tooltip, detail="series:N",
        strokeDash=alt.StrokeDash("split:N", title=None, scale=alt.Scale(domain=["train", "eval"],
                                                                         range=[[1, 0], [5, 3]]), legend=None))
    ends = frame[frame["split"] == "train"].sort_values("x").groupby("job", sort=False).tail(1)
    ends = ends.assign(tag=ends["job"].str.split(" ").str[0])
    tags = alt.Chart(ends).mark_text(align="left", dx=5, fontSize=11, fontWeight="bold").encode(
        x=x, y=y, text="tag:N", color=colour)
    return _frame(alt.layer(lines, tags), title)


def scatter(points: pd.DataFrame, quality_title: str, size_title: str = "merged model MB (native)") -> alt.Chart:
    """Size against quality, one labelled point per job, frontier in green.

    ``points``: columns ``job`` (label), ``merged_mb``, ``quality``, ``frontier`` ("frontier" or
    "dominated"), ``bits``, ``group_size``, ``rank``.
    """
    x = alt.X("merged_mb:Q", title=size_title, axis=alt.Axis(format=NUMBER, tickCount=8),
              scale=alt.Scale(domain=_domain(points["merged_mb"], 0.15),
                              zero=False, nice=True))
    y = alt.Y("quality:Q", title=quality_title, axis=alt.Axis(format=NUMBER, tickCount=8),
              scale=alt.Scale(domain=_domain(points["quality"], 0.15),
                              zero=False, nice=True))
    colour = alt.Color("frontier:N", title=None, scale=alt.Scale(domain=list(FRONTIER), range=list(FRONTIER.values())))
    tooltip = ["job:N", "bits:Q", "group_size:Q", "rank:Q", alt.Tooltip("merged_mb:Q", title="MB", format=",.1f"),
               alt.Tooltip("quality:Q", title=quality_title, format=".4~g")]
    dots = alt.Chart(points).mark_point(filled=True, size=110).encode(
        x=x, y=y, color=colour, tooltip=tooltip, shape=alt.Shape("frontier:N", title=None,
                                                                 scale=alt.Scale(domain=list(FRONTIER),
                                                                                 range=["diamond", "circle"])))
    # labels read away from the nearer side edge, so none runs off the chart
    middle = (float(points["merged_mb"].min()) + float(points["merged_mb"].max())) / 2
    left = alt.Chart(points[points["merged_mb"] <= middle]).mark_text(align="left", dx=9, dy=-9, fontSize=11)
    right = alt.Chart(points[points["merged_mb"] > middle]).mark_text(align="right", dx=-9, dy=-9, fontSize=11)
    labels = [part.encode(x=x, y=y, text="job:N", color=colour) for part in (left, right)]
    return _frame(alt.layer(dots, *labels), "Size vs quality")
