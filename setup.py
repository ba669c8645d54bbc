"""ament_python package that also installs with plain pip where no ROS exists."""

from glob import glob

from setuptools import find_packages, setup

PACKAGE = "compressed_perception"
SHARE = f"share/{PACKAGE}"
MODEL = "models/nanodet_g"
SHIPPED = "models/nanodet_g_compressed"
# The offline build step. torch==2.13.0: the CPU build this project is tested with
# (unpinned, pip picks a CUDA build). ModelOpt without its [onnx] extra, which would pull
# onnxruntime-gpu: its ONNX dependencies are listed here instead, at the versions it wants.
BUILD = [
    "torch==2.13.0",
    "onnx~=1.21.0",
    "onnxscript>=0.5",
    "onnxslim>=0.1.76",
    "torch-pruning~=1.6",
    "matplotlib~=3.11",
    "tqdm>=4.66",
    "nvidia-modelopt~=0.47.0",
    "cppimport",
    "lief",
    "ml_dtypes",
    "onnx-graphsurgeon>=0.6.1",
    "onnxconverter-common~=1.16.0",
    "onnxruntime~=1.24.2",
    "polygraphy>=0.53.4",
    # NNCF post-training INT8 for the OpenVINO artifact (3.4 is what the build is tested with)
    "nncf~=3.4",
]


def _shipped() -> list[tuple[str, list[str]]]:
    """The shipped compressed model: its index and every file of its folders."""
    files = [("share/" + PACKAGE + "/models", glob("models/default.json"))]
    for folder in sorted(glob(f"{SHIPPED}/**/", recursive=True)):
        found = [
            f for f in glob(f"{folder}*") if not f.endswith("/") and "." in f.rsplit("/", 1)[-1]
        ]
        if found:
            files.append((f"{SHARE}/{folder.rstrip('/')}", found))
    return files


setup(
    name=PACKAGE,
    version="0.1.0",
    packages=find_packages(exclude=["test", "test.*"]),
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (SHARE, ["package.xml"]),
        (f"{SHARE}/launch", glob("launch/*.launch.py")),
        (f"{SHARE}/config", glob("config/*.yaml")),
        (
            f"{SHARE}/{MODEL}",
            [f"{MODEL}/manifest.json", f"{MODEL}/nanodet_g.onnx", f"{MODEL}/nanodet_g.pt"],
        ),
        *_shipped(),
        (f"{SHARE}/data/vtest", glob("data/vtest/*")),
        (f"{SHARE}/data/vtest_heldout", glob("data/vtest_heldout/*")),
        (f"{SHARE}/data/sample_bag", glob("data/sample_bag/*")),
    ],
    python_requires=">=3.10",
    install_requires=[
        "setuptools",
        "numpy>=1.24",
        "opencv-python-headless>=4.8",
        "onnxruntime>=1.17",
        # INT8 and FP32 on x86 and ARM CPUs (VNNI, AMX); `auto` prefers it to ONNX Runtime
        "openvino>=2025.0; platform_machine in 'x86_64 AMD64 aarch64 arm64'",
        "pycocotools>=2.0",
        "pyyaml>=5.4",
        # the DDS transport uses cyclonedds-python's raw write/take (tested with 11.0)
        "cyclonedds~=11.0",
        "rosbags>=0.10",
    ],
    extras_require={
        "torch": BUILD,
        "test": [
            *BUILD,
            "pytest>=8",
            "hypothesis>=6.100",
            "ruff==0.17.6",
            # the CARLA client, where its wheels exist: only connection errors are tested here
            "carla==0.9.16; platform_machine == 'x86_64' and python_version < '3.13'",
        ],
        "carla": ["carla==0.9.16"],
    },
    zip_safe=True,
    maintainer="compressed_perception maintainers",
    maintainer_email="perception@compressed-perception.dev",
    description="Compressed camera object detection for ROS 2",
    license="Apache-2.0",
    tests_require=["pytest"],
    entry_points={
        "console_scripts": [
            "compressed-perception = compressed_perception.cli:main",
            "perception_node = compressed_perception.ros.node:main",
            "perception_build = compressed_perception.cli:build_main",
        ],
    },
)
