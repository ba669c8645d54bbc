"""The build's report: report.json, report.md and report.png, rendered from plain data.

Every row is measured in one run on one machine, so the ratios in the Markdown compare
like with like. The three files are staged together and appear together, or not at all.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compressed_perception.atomic import atomic_path
from compressed_perception.errors import ConfigError, ModelError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

FORMAT = "compressed_perception.report/1"  # lets load_report tell a report from other JSON
FILES = {"json": "report.json", "md": "report.md", "png": "report.png"}
REFERENCE_STAGE = "fp32"
COMPARISONS = ("<=", ">=")
AXES = ("x", "y")
CURVE_METRICS = ("map", "map50", "latency_p50", "latency_p99")
MISSING = "n/a"


@dataclass(frozen=True)
class Measurement:
    """One model file run by one backend."""

    stage: str  # "fp32", "pruned", "distilled", "ort-int8", "qdq-int8", "tensorrt", ...
    backend: str  # "onnxruntime", "torch", "tensorrt"
    params: int | None  # None when not known, e.g. an INT8 ONNX
    macs: int | None
    file_bytes: int
    latency_ms: dict[str, float] | None  # end-to-end detect at the bench size: p50, p99
    accuracy: dict[str, float] | None  # agreement with the FP32 reference: map, map50
    path: str  # artifact path relative to the output folder
    cpu: bool = True  # a CPU artifact, eligible for best.json
    # per class of the reference: its boxes, how many score just above its threshold, and
    # this row's map and map50 on that class alone
    classes: dict[str, dict[str, float]] | None = None


@dataclass(frozen=True)
class Target:
    """A goal of the build; `explanation` says why it fell short when it did."""

    name: str  # e.g. "latency vs ORT FP32"
    measured: float | None
    limit: float
    comparison: str  # "<=" or ">="
    explanation: str = ""
    # ("x" | "y", value in the plot's units: latency ms or mAP) to draw the limit there
    axis_line: tuple[str, float] | None = None

    def __post_init__(self) -> None:
        if self.comparison not in COMPARISONS:
            raise ConfigError(
                f"target {self.name!r}: comparison {self.comparison!r} not in {COMPARISONS}"
            )
        if self.axis_line is not None and self.axis_line[0] not in AXES:
            raise ConfigError(f"target {self.name!r}: axis {self.axis_line[0]!r} not in {AXES}")

    @property
    def met(self) -> bool | None:
        """None when not measured, so a missing figure never reads as a pass."""
        if self.measured is None:
            return None
        if self.comparison == "<=":
            return self.measured <= self.limit
        return self.measured >= self.limit


@dataclass(frozen=True)
class Report:
    recipe: dict[str, Any]  # the recipe as run
    machine: dict[str, Any]  # compressed_perception.benchmark.machine()
    bench: dict[str, Any]  # {"size": [640, 480], "frames": 40, "iterations": 60}
    measurements: tuple[Measurement, ...]
    targets: tuple[Target, ...]
    stages: dict[str, dict[str, Any]]  # stage -> {"seconds", "cached", "key", stage info}
    skipped: dict[str, str]  # stage -> reason
    curves: dict[str, list[dict[str, float]]] = field(default_factory=dict)  # trade-off sweeps
    # tables stages add (a sensitivity scan, a validation curve): name -> columns, rows, note
    tables: dict[str, dict[str, Any]] = field(default_factory=dict)
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)  # stage -> graph checks


def write_report(report: Report, folder: Path) -> dict[str, Path]:
    """Write report.json, report.md and report.png; a failure leaves the previous ones as they were.

    Each file is staged beside its destination and all are renamed only once all three
    are complete, so a crash while rendering never mixes a new JSON with an old plot.
    """
    folder = Path(folder)
    paths = {kind: folder / name for kind, name in FILES.items()}
    texts = {"json": json.dumps(_to_payload(report), indent=2) + "\n", "md": markdown(report)}
    with contextlib.ExitStack() as stack:
        staged = {kind: stack.enter_context(atomic_path(path)) for kind, path in paths.items()}
        for kind, text in texts.items():
            staged[kind].write_text(text)
        render_plot(report, staged["png"])
    return paths


def _to_payload(report: Report) -> dict[str, Any]:
    """The JSON form; each target carries its derived `met` for readers of the file alone."""
    payload = {"format": FORMAT, **asdict(report)}
    payload["targets"] = [{**asdict(t), "met": t.met} for t in report.targets]
    return payload


def load_report(path: Path) -> Report:
    """Read a report.json back; a truncated or foreign file raises ModelError naming it."""
    path = Path(path)
    try:
        payload = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"report {path}: cannot be read as JSON ({e})") from e
    try:
        return _from_payload(payload)
    except KeyError as e:
        raise ModelError(f"report {path}: missing field {e}") from e
    except (TypeError, ValueError, AttributeError, ConfigError) as e:
        raise ModelError(f"report {path}: {e}") from e


def _from_payload(payload: Any) -> Report:
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"not a report: format {found!r}, expected {FORMAT!r}")
    return Report(
        recipe=_mapping(payload, "recipe"),
        machine=_mapping(payload, "machine"),
        bench=_mapping(payload, "bench"),
        measurements=tuple(Measurement(**m) for m in payload["measurements"]),
        targets=tuple(_target(t) for t in payload["targets"]),
        stages=_mapping(payload, "stages"),
        skipped=_mapping(payload, "skipped"),
        curves=_mapping(payload, "curves"),
        tables=_mapping(payload, "tables") if "tables" in payload else {},
        checks=_mapping(payload, "checks") if "checks" in payload else {},
    )


def _mapping(payload: dict[str, Any], key: str) -> dict[str, Any]:
    value = payload[key]
    if not isinstance(value, dict):
        raise TypeError(f"field {key!r} is a {type(value).__name__}, not an object")
    return value


def _target(entry: dict[str, Any]) -> Target:
    fields = {k: v for k, v in entry.items() if k != "met"}  # derived, not stored
    if fields.get("axis_line") is not None:
        axis, value = fields["axis_line"]
        fields["axis_line"] = (axis, value)
    return Target(**fields)


# --- Markdown ---------------------------------------------------------------------------


def summary(report: Report) -> str:
    """What a terminal shows after a build: the machine, the measurements and the targets."""
    sections = [
        _header(report),
        _measurements_section(report.measurements),
        _targets_section(report.targets),
    ]
    return "\n\n".join(s for s in sections if s) + "\n"


def markdown(report: Report) -> str:
    """A readable report; ratios are taken between rows of this same report."""
    sections = [
        summary(report).rstrip("\n"),
        _stages_section(report.stages),
        *(_table_section(name, table) for name, table in report.tables.items()),
        _checks_section(report.checks),
        _skipped_section(report.skipped),
        *(_curve_section(name, points) for name, points in report.curves.items()),
        "## Recipe\n\n```json\n" + json.dumps(report.recipe, indent=2) + "\n```",
    ]
    return "\n\n".join(s for s in sections if s) + "\n"


def _header(report: Report) -> str:
    machine = ", ".join(f"{k}: {v}" for k, v in report.machine.items() if k != "date")
    bench = ", ".join(f"{k}: {_bench_value(v)}" for k, v in report.bench.items())
    return "\n".join(
        [
            "# Compression report",
            "",
            f"- date: {report.machine.get('date', MISSING)}",
            f"- machine: {machine or MISSING}",
            f"- bench: {bench or MISSING}",
            "- latency: end-to-end detect; accuracy: agreement with the FP32 reference "
            "(COCO mAP@[.5:.95], mAP@.5)",
        ]
    )


def _bench_value(value: Any) -> str:
    if isinstance(value, list | tuple):
        return "x".join(str(v) for v in value)
    return str(value)


def _measurements_section(measurements: Sequence[Measurement]) -> str:
    if not measurements:
        return "## Measurements\n\nNone."
    onnx = _reference(measurements, "onnxruntime")
    torch = _reference(measurements, "torch")
    columns: list[tuple[str, Callable[[Measurement], str]]] = [
        ("stage", lambda m: m.stage),
        ("backend", lambda m: m.backend),
        ("params M", lambda m: _scaled(m.params, 1e6)),
        ("MACs G", lambda m: _scaled(m.macs, 1e9)),
        ("file MB", lambda m: _scaled(m.file_bytes, 1e6)),
    ]
    if onnx:
        columns.append(("size vs fp32 ONNX", lambda m: _fmt(_ratio(m.file_bytes, onnx.file_bytes))))
    columns += [
        ("p50 ms", lambda m: _fmt(_latency(m, "p50"))),
        ("p99 ms", lambda m: _fmt(_latency(m, "p99"))),
    ]
    for ref, label in ((onnx, "ORT"), (torch, "torch")):
        if ref and _latency(ref, "p50"):
            columns.append((f"p50 vs {label} fp32", _latency_ratio(ref)))
    columns += [
        ("mAP", lambda m: _fmt(_accuracy(m, "map"), 3)),
        ("mAP@.5", lambda m: _fmt(_accuracy(m, "map50"), 3)),
    ]
    if any(_accuracy(m, "labelled_map") is not None for m in measurements):
        columns += [
            ("labelled mAP", lambda m: _fmt(_accuracy(m, "labelled_map"), 3)),
            ("labelled mAP@.5", lambda m: _fmt(_accuracy(m, "labelled_map50"), 3)),
        ]
    columns.append(("file", lambda m: f"`{m.path}`"))
    rows = [[cell(m) for _, cell in columns] for m in measurements]
    return "## Measurements\n\n" + _table([name for name, _ in columns], rows)


def _reference(measurements: Iterable[Measurement], backend: str) -> Measurement | None:
    return next(
        (m for m in measurements if m.stage == REFERENCE_STAGE and m.backend == backend), None
    )


def _latency_ratio(ref: Measurement) -> Callable[[Measurement], str]:
    return lambda m: _fmt(_ratio(_latency(m, "p50"), _latency(ref, "p50")))


def _latency(m: Measurement, key: str) -> float | None:
    return (m.latency_ms or {}).get(key)


def _accuracy(m: Measurement, key: str) -> float | None:
    return (m.accuracy or {}).get(key)


def _ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or not reference:
        return None
    return value / reference


def _scaled(value: int | None, unit: float) -> str:
    return MISSING if value is None else f"{value / unit:.2f}"


def _fmt(value: float | None, digits: int = 2) -> str:
    return MISSING if value is None else f"{value:.{digits}f}"


def _targets_section(targets: Sequence[Target]) -> str:
    if not targets:
        return ""
    status = {True: "met", False: "**NOT MET**", None: "not measured"}
    rows = [
        [
            t.name,
            MISSING if t.measured is None else f"{t.measured:.4g}",
            f"{t.comparison} {t.limit:.4g}",
            status[t.met],
            t.explanation,
        ]
        for t in targets
    ]
    return "## Targets\n\n" + _table(["target", "measured", "limit", "status", "why"], rows)


def _stages_section(stages: Mapping[str, Mapping[str, Any]]) -> str:
    if not stages:
        return ""
    rows = []
    for name, info in stages.items():
        seconds = info.get("seconds")
        extra = {k: v for k, v in info.items() if k not in ("seconds", "cached", "key")}
        rows.append(
            [
                name,
                MISSING if seconds is None else f"{seconds:.1f}",
                "yes" if info.get("cached") else "no",
                f"`{info['key']}`" if info.get("key") else MISSING,
                ", ".join(f"{k}={_value(v)}" for k, v in _details(extra).items()),
            ]
        )
    return "## Stages\n\n" + _table(["stage", "seconds", "cached", "key", "details"], rows)


def _details(info: Mapping[str, Any]) -> dict[str, Any]:
    """A stage's scalar facts, one level of nesting deep; its tables have sections of their own."""
    return {
        key: value
        for key, value in _flatten(info).items()
        if key.count(".") <= 1 and isinstance(value, str | int | float | bool)
    }


def _table_section(name: str, table: Mapping[str, Any]) -> str:
    body = _table(table["columns"], [[_value(c) for c in row] for row in table["rows"]])
    note = f"{table['note']}\n\n" if table.get("note") else ""
    return f"## {name}\n\n{note}{body}"


def _checks_section(checks: Mapping[str, Mapping[str, Any]]) -> str:
    if not checks:
        return ""
    lines = [
        f"- {stage}: " + ", ".join(f"{k}={_value(v)}" for k, v in _flatten(info).items())
        for stage, info in checks.items()
    ]
    return "## Checks\n\nGraph rules checked on the artifacts themselves.\n\n" + "\n".join(lines)


def _flatten(info: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in info.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _skipped_section(skipped: Mapping[str, str]) -> str:
    if not skipped:
        return ""
    return "## Skipped\n\n" + "\n".join(f"- {stage}: {reason}" for stage, reason in skipped.items())


def _curve_section(name: str, points: Sequence[Mapping[str, float]]) -> str:
    keys = list(dict.fromkeys(k for p in points for k in p))
    rows = [[_value(p[k]) if k in p else MISSING for k in keys] for p in points]
    return f"## Curve: {name}\n\n" + _table(keys, rows)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = [headers, ["---"] * len(headers), *rows]
    return "\n".join("| " + " | ".join(_cell(c) for c in line) + " |" for line in lines)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


# --- Plot -------------------------------------------------------------------------------


def render_plot(report: Report, dest: Path) -> None:
    """Latency against agreement, one labelled point per measurement that has both.

    matplotlib is imported only when drawing: it comes with the build's extra, and reading
    a report or writing its Markdown must not need it.
    """
    figure, ax = _figure(8, 6)
    drawn = _plot_measurements(ax, report.measurements)
    drawn += _plot_curves(ax, report.curves)
    _plot_targets(ax, report.targets)
    if not drawn:
        ax.text(
            0.5, 0.5, "no row has both latency and accuracy", ha="center", transform=ax.transAxes
        )
    ax.set_xlabel("latency p50, ms (end-to-end detect)")
    ax.set_ylabel("agreement with FP32 reference")
    ax.set_title(_plot_title(report), fontsize=10)
    ax.grid(visible=True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")
    figure.savefig(dest, format="png")


def _plot_measurements(ax: Axes, measurements: Sequence[Measurement]) -> int:
    colours = {b: f"C{i}" for i, b in enumerate(dict.fromkeys(m.backend for m in measurements))}
    labelled: set[str] = set()
    drawn = 0
    for m in measurements:
        latency, points = _latency(m, "p50"), _accuracy_points(m)
        if latency is None or not points:
            continue
        for metric, marker, value in points:
            label = f"{m.backend} {metric}"
            first = label not in labelled
            ax.scatter(
                latency,
                value,
                marker=marker,
                color=colours[m.backend],
                zorder=3,
                label=label if first else None,
            )
            labelled.add(label)
        ax.annotate(
            m.stage, (latency, points[0][2]), textcoords="offset points", xytext=(5, 5), fontsize=8
        )
        drawn += 1
    return drawn


def _accuracy_points(m: Measurement) -> list[tuple[str, str, float]]:
    styles = (("map", "mAP@[.5:.95]", "o"), ("map50", "mAP@.5", "^"))
    return [
        (label, marker, value)
        for key, label, marker in styles
        if (value := _accuracy(m, key)) is not None
    ]


def _plot_curves(ax: Axes, curves: Mapping[str, Sequence[Mapping[str, float]]]) -> int:
    drawn = 0
    for i, (name, points) in enumerate(curves.items()):
        colour = f"C{(i + 5) % 10}"
        for key, style, label in (("map", "-", "mAP"), ("map50", ":", "mAP@.5")):
            pts = [p for p in points if "latency_p50" in p and key in p]
            if not pts:
                continue
            xs, ys = [p["latency_p50"] for p in pts], [p[key] for p in pts]
            ax.plot(xs, ys, style, marker=".", color=colour, label=f"{name} ({label})")
            drawn += len(pts)
            for p in pts if key == "map" else ():
                ax.annotate(
                    _sweep_label(p),
                    (p["latency_p50"], p["map"]),
                    fontsize=7,
                    textcoords="offset points",
                    xytext=(3, -10),
                )
    return drawn


def _sweep_label(point: Mapping[str, float]) -> str:
    """The swept setting (the first key that is not a metric), e.g. "ratio=0.3"."""
    return next((f"{k}={_value(v)}" for k, v in point.items() if k not in CURVE_METRICS), "")


def _plot_targets(ax: Axes, targets: Sequence[Target]) -> None:
    for t in targets:
        if t.axis_line is None:
            continue
        axis, value = t.axis_line
        draw = ax.axvline if axis == "x" else ax.axhline
        draw(value, linestyle="--", color="grey", linewidth=1, label=f"target: {t.name}")


def _plot_title(report: Report) -> str:
    size = _bench_value(report.bench.get("size", MISSING))
    machine = report.machine
    where = f"{machine.get('processor', MISSING)}, {machine.get('cpus', MISSING)} CPUs"
    return f"Latency vs accuracy at {size} on {where}\n{machine.get('date', '')}".strip()


def _figure(width: float, height: float) -> tuple[Figure, Axes]:
    """An Agg figure of its own: pyplot's global state stays out of a library."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def plot_losses(losses: Mapping[str, Sequence[float]], dest: Path) -> None:
    """Distillation loss per step, total and per term, on a log scale: is it still falling?"""
    figure, ax = _figure(8, 4)
    for name, values in losses.items():
        ax.plot(range(1, len(values) + 1), values, label=name, linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("distillation loss")
    ax.grid(visible=True, alpha=0.3)
    ax.legend(fontsize=8)
    with atomic_path(dest) as tmp:
        figure.savefig(tmp, format="png")
