"""The human-readable summary of one replay's metrics."""

from __future__ import annotations

from typing import Any


def summarize(metrics: dict[str, Any]) -> str:
    lines = [
        f"{metrics['input']} -> {metrics['output']} ({metrics['storage']}), "
        f"model {metrics['model']} on {metrics['backend']}",
        f"  frames {metrics['frames']}, decode failures {len(metrics['decode_failures'])}, "
        f"{metrics['throughput_fps']} frames/s over {metrics['wall_s']} s",
    ]
    for topic, info in metrics["topics"].items():
        lines.append(
            f"  {topic} -> {info['detections_topic']}: {info['frames']} frames, "
            f"{info['decode_failures']} failed"
        )
    stages = ", ".join(
        f"{s} {v['p50']:.1f}/{v['p99']:.1f}" for s, v in metrics["latency_ms"].items()
    )
    lines.append(f"  latency ms p50/p99: {stages}")
    if metrics.get("unfitted"):
        count = sum(info["unfitted_frames"] for info in metrics["topics"].values())
        lines.append(f"  {count} frames less faithful: {metrics['unfitted']}")
    found = ", ".join(f"{n} {c}" for c, n in metrics["detections_per_class"].items()) or "nothing"
    lines.append(f"  detections: {found}")
    for key, title in (("agreement", "agreement with reference"), ("ground_truth", "ground truth")):
        if key in metrics:
            result = metrics[key]
            lines.append(
                f"  {title}: mAP@[.5:.95] {_fmt(result['map'])}, mAP@.5 {_fmt(result['map50'])} "
                f"({result['ground_truth_boxes']} boxes in {result['frames']} frames)"
            )
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
