#!/usr/bin/env bash
# Build the full CUDA extension (C++ + CUDA kernels) against a CUDA build of torch and load it on
# this GPU-less machine: proves the CUDA side compiles, links and registers its ops.
#
#   bash .ci/build_cuda_extension.sh            # venv in $VITTLE_CU_VENV (default /tmp/vittle_cu_venv)
#
# The venv is created on first use (torch==2.14.1, the CUDA 13.0 build, ~5.5 GB from the local
# wheel cache; a few minutes) and reused afterwards. The build goes to $VITTLE_CU_BUILD (default
# /tmp/vittle_cu_build), never into the source tree. Needs nvcc 13 (CUDA_HOME or nvcc on PATH).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VITTLE_CU_VENV:-/tmp/vittle_cu_venv}
BUILD=${VITTLE_CU_BUILD:-/tmp/vittle_cu_build}
TORCH_CUDA_SPEC=${VITTLE_CU_TORCH:-torch==2.14.1}

if [[ -z "${CUDA_HOME:-}" ]]; then
  for candidate in /usr/local/cuda "$(dirname "$(dirname "$(command -v nvcc)")")"; do
    if [[ -x "$candidate/bin/nvcc" ]]; then CUDA_HOME=$candidate; break; fi
  done
fi
export CUDA_HOME=${CUDA_HOME:?nvcc not found: set CUDA_HOME}

if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.version.cuda is None)" 2>/dev/null; then
  echo "== creating $VENV with $TORCH_CUDA_SPEC =="
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet "$TORCH_CUDA_SPEC" setuptools wheel ninja numpy
fi
"$VENV/bin/python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

echo "== building vittle_fast._C with CUDA kernels (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0}) =="
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0}
export MAX_JOBS=${MAX_JOBS:-2}
VITTLE_FAST_BUILD_CUDA=1 "$VENV/bin/python" setup.py build_ext --build-lib "$BUILD/lib" --build-temp "$BUILD/tmp"

echo "== loading it with torch.ops.load_library =="
"$VENV/bin/python" - "$BUILD/lib" <<'PY'
import glob, sys
import torch

library = glob.glob(f"{sys.argv[1]}/vittle_fast/_C*.so")[0]
torch.ops.load_library(library)
for op in ("fused_sample_kl_fwd", "fused_sample_kl_bwd", "vib_bottleneck_fwd", "vib_bottleneck_bwd"):
    name = f"vittle_fast::{op}"
    wanted = ("CPU", "CUDA", "Meta") if op.startswith("fused") else ("CPU", "CUDA")  # bottleneck: fake in Python
    keys = {key: torch._C._dispatch_has_kernel_for_dispatch_key(name, key) for key in wanted}
    assert all(keys.values()), f"{name} is missing kernels: {keys}"
    print(name, "registered for", ", ".join(keys))
print("OK: CUDA extension built, linked and loaded:", library)
PY
