"""Sweeps: several values for bits, group size, rank and learning rate, queued as one set of jobs.

``plan_sweep`` expands the grid into validated ``JobSpec``s before anything is queued. A
combination the model cannot take (a group size that does not divide a layer's width) is refused
with the reason and the others go ahead; a value that is wrong whatever the model (a rank of 0, a
learning rate out of range) refuses the whole sweep, like a wrong field in the form. An export
format that cannot hold a combination (GGUF at group size 16) is left out of that job only, and
said so. ``service.submit_sweep`` queues the plan with one sweep id on every job.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

from qalora.errors import QALoRAError

from .forms import (BITS_CHOICES, LR_RANGE, FormError, build_spec, check_records, data_source, export_choices,
                    is_hub_dataset)
from .spec import JobSpec, short_name

# The axes a sweep varies, with the form's labels; each takes a list (or "a, b, c").
AXES = {"bits": "bits", "group_size": "group size", "rank": "rank", "lr": "learning rate"}
MAX_JOBS = 64  # one sweep queues at most this many jobs


@dataclass
class SweepPlan:
    specs: list[JobSpec] = field(default_factory=list)
    combos: list[dict] = field(default_factory=list)          # the grid point of each spec
    refused: list[tuple[dict, str]] = field(default_factory=list)  # (grid point, why)
    notes: list[str] = field(default_factory=list)             # exports left out of some jobs, and why
    values: dict[str, list] = field(default_factory=dict)      # each axis's values, in order

    @property
    def total(self) -> int:
        return len(self.specs) + len(self.refused)

    def label(self, combo: dict) -> str:
        """The values that vary in this sweep: "bits 2, group size 64"."""
        varying = [a for a, vals in self.values.items() if len(vals) > 1] or list(self.values)[:1]
        return ", ".join(f"{AXES[a]} {_show(a, combo[a])}" for a in varying)

    def summary(self) -> str:
        """Markdown for the form: how many jobs, over which values, and what was refused and why."""
        axes = " × ".join(f"{AXES[a]} {', '.join(_show(a, v) for v in vals)}" for a, vals in self.values.items())
        lines = [f"**{len(self.specs)} job{'s' if len(self.specs) != 1 else ''}** will be queued ({axes})."]
        by_reason: dict[str, list[str]] = {}
        for combo, why in self.refused:
            by_reason.setdefault(why, []).append(self.label(combo))
        for why, labels in by_reason.items():
            lines.append(f"Refused {len(labels)} ({'; '.join(labels)}): {why}")
        lines += self.notes
        return "\n\n".join(lines)


def _show(axis: str, value) -> str:
    return f"{value:g}" if axis == "lr" else str(value)


def parse_values(axis: str, raw) -> list:
    """An axis's values from a list or a comma-separated string, ascending, duplicates dropped.

    Raises ``FormError`` (field ``sweep``) naming the axis and the bad value."""
    items = [v for v in (raw.replace(";", ",").split(",") if isinstance(raw, str) else list(raw or ()))
             if str(v).strip()]
    values, problems = [], []
    for item in items:
        try:
            number = float(str(item).strip())
            if axis != "lr":
                if not math.isfinite(number) or number != int(number):
                    raise ValueError
                number = int(number)
        except ValueError:
            problems.append(f"sweep {AXES[axis]}: {str(item).strip()!r} is not a "
                            f"{'number' if axis == 'lr' else 'whole number'}; separate values with commas, e.g. 8, 16.")
            continue
        try:
            _check_value(axis, number)
        except FormError as exc:
            problems.append(exc.fields["sweep"])
            continue
        if number not in values:
            values.append(number)
    if problems:  # every bad value of the axis at once
        raise FormError({"sweep": " ".join(problems)})
    return sorted(values)


def _check_value(axis: str, value) -> None:
    """Values wrong for any model refuse the whole sweep (a model-specific refusal is per combination)."""
    problem = None
    if axis == "bits" and value not in BITS_CHOICES:
        problem = f"bits {value} is not offered; choose from {', '.join(map(str, BITS_CHOICES))}."
    elif axis in ("group_size", "rank") and value < 1:
        problem = f"{AXES[axis]} {value} must be at least 1."
    elif axis == "lr" and not LR_RANGE[0] <= value <= LR_RANGE[1]:
        problem = (f"learning rate {value:g} is outside the range that trains an adapter ({LR_RANGE[0]:g} to "
                   f"{LR_RANGE[1]:g}; typical 1e-4 to 3e-4).")
    if problem:
        raise FormError({"sweep": f"sweep: {problem}"})


def plan_sweep(grid: dict, *, kind: str, builtin: str | None, upload: str | None, path: str | None,
               check_rows: bool = True, **fields) -> SweepPlan:
    """Expand ``grid`` (axis -> values; an axis left out or empty keeps the form's single value)
    over the form's ``fields`` (those of ``forms.build_spec``) into validated job specs, each
    validated once (by ``build_spec``); ``service.submit_sweep`` trusts them.

    Raises ``FormError`` for what no combination can fix (the dataset, the base, the steps, a bad
    value, more than ``MAX_JOBS`` jobs, or no combination left); the dataset's rows are parsed
    once (``check_rows``), for the first combination that can run.
    """
    plan = SweepPlan(values=_axis_values(grid, fields, lambda: _other_problems(kind, builtin, upload, path, fields)))
    count = math.prod(len(v) for v in plan.values.values())
    if count > MAX_JOBS:
        raise FormError({"sweep": f"this sweep makes {count} jobs; one sweep queues at most {MAX_JOBS}. "
                                  "Take some values out."})
    shared: dict[str, str] = {}  # what every combination shares and gets wrong, by form field
    try:
        data = data_source(kind, builtin, upload, path)
    except QALoRAError as exc:  # the other fields are still checked, against a dataset that exists
        shared["data"], data, check_rows = str(exc), "builtin:default", False
    left_out = _plan_combinations(plan, data, fields, shared)
    if shared:
        raise FormError(shared)
    for why, labels in left_out.items():
        plan.notes.append(f"Not exported in {len(labels)} job(s) ({'; '.join(labels)}): {why}.")
    if not plan.specs:
        reasons = "; ".join(dict.fromkeys(why for _, why in plan.refused))
        raise FormError({"sweep": f"none of the {count} combinations can run on this model: {reasons}"})
    first = plan.specs[0]
    if check_rows and not is_hub_dataset(first.data):  # the dataset's records, checked once, for the first job
        check_records(first.data, first.columns, first.base, first.train.seq_len)
    return plan


def _axis_values(grid: dict, fields: dict, other_problems) -> dict[str, list]:
    """Each axis's values, ascending (the form's single value where the grid has none); raises
    ``FormError`` with every bad sweep value and what the rest of the form (``other_problems()``) gets wrong."""
    unknown = sorted(set(grid) - set(AXES))
    if unknown:
        raise FormError({"sweep": f"sweep axes {unknown} are unknown; sweep over {', '.join(AXES)}."})
    values, problems = {}, []
    for axis in AXES:
        try:
            values[axis] = parse_values(axis, grid.get(axis) or "") or parse_values(axis, [fields[axis]])
        except FormError as exc:
            problems.append(exc.fields["sweep"])
    if problems:  # every bad sweep value, and what the rest of the form gets wrong, at once
        raise FormError({"sweep": " ".join(problems), **other_problems()})
    return values


def _plan_combinations(plan: SweepPlan, data: str, fields: dict, shared: dict[str, str]) -> dict[str, list[str]]:
    """Build one spec per grid point into ``plan`` (a group size the model cannot take is refused
    for that point); returns {why an export was left out: the points it was left out of}."""
    wanted = list(fields.pop("exports", ()) or ())
    name = (fields.pop("name", "") or "").strip()
    rank0, alpha0 = fields.get("rank"), fields.get("alpha")
    if len(plan.values["bits"]) > 1:  # each bit width with its own preset's clip search and scales
        fields = {k: v for k, v in fields.items() if k not in ("clip", "train_scales", "scales_lr")}
    left_out: dict[str, list[str]] = {}
    for point in itertools.product(*plan.values.values()):
        combo = dict(zip(plan.values, point))
        ok, refused_formats = export_choices(combo["bits"], combo["group_size"])
        values = {**fields, **combo, "alpha": _alpha(alpha0, rank0, combo["rank"]),
                  "exports": [f for f in wanted if f in ok],
                  "name": _name(name, fields.get("base"), combo, multiple_lr=len(plan.values["lr"]) > 1)}
        try:
            spec = build_spec(data=data, check_rows=False, **values)
        except FormError as exc:
            if set(exc.fields) - {"group_size"}:  # the base, the dataset or a setting every job shares
                raise FormError({**exc.fields, **shared}) from None
            plan.refused.append((combo, exc.fields["group_size"]))
            continue
        except QALoRAError as exc:
            plan.refused.append((combo, str(exc)))
            continue
        for fmt in wanted:
            if fmt not in ok:
                left_out.setdefault(f"{fmt.upper()}: {refused_formats[fmt]}", []).append(plan.label(combo))
        plan.specs.append(spec)
        plan.combos.append(combo)
    return left_out


def _other_problems(kind, builtin, upload, path, fields: dict) -> dict[str, str]:
    """The form's other fields checked with their single values (the sweep's own are wrong)."""
    from .forms import form_spec

    try:
        form_spec(kind=kind, builtin=builtin, upload=upload, path=path, check_rows=False, **fields)
    except FormError as exc:
        return {k: v for k, v in exc.fields.items() if k != "sweep"}
    except QALoRAError:
        return {}
    return {}


def _alpha(alpha, rank, new_rank):
    """LoRA alpha for a swept rank: the form's alpha/rank ratio is kept (alpha/rank scales the update)."""
    try:
        return float(alpha) * int(new_rank) / int(rank)
    except (TypeError, ValueError, ZeroDivisionError):
        return alpha  # the form reports the bad alpha or rank itself


def _name(name: str, base: str, combo: dict, multiple_lr: bool) -> str:
    """``<name or base>-<bits>bit-g<group>-r<rank>``, with ``-lr<lr>`` when the learning rate varies."""
    suffix = f"-lr{combo['lr']:g}" if multiple_lr else ""
    prefix = name or short_name(str(base or "").strip() or "default")
    return f"{prefix}-{combo['bits']}bit-g{combo['group_size']}-r{combo['rank']}{suffix}"
