"""Build script: package metadata lives in pyproject.toml; this file adds the compiled extension.

``vittle_fast._C`` holds the fused op's C++ (CPU) kernel and, when torch is a CUDA build and nvcc
is found, its CUDA kernel too. Install with ``pip install --no-build-isolation -e .`` so the
extension builds against the torch already in the environment.

Environment knobs:
  VITTLE_FAST_BUILD_EXT=0     skip the extension (pure-Python install; backend="cpp" unavailable)
  VITTLE_FAST_BUILD_CUDA=0|1  force the CUDA sources off / on (default: auto-detect)
  TORCH_CUDA_ARCH_LIST        CUDA architectures (default "8.0;9.0": A100 and H100)
"""
import os
import shutil
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
CSRC = "csrc"
# The op sources are listed once, in csrc/sources.txt (CMakeLists.txt reads it too).
_OP_SOURCES = [f"{CSRC}/{line.strip()}" for line in (ROOT / CSRC / "sources.txt").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
CPU_SOURCES = [s for s in _OP_SOURCES if not s.endswith(".cu")] + [f"{CSRC}/python_module.cpp"]
CUDA_SOURCES = [s for s in _OP_SOURCES if s.endswith(".cu")]
# -fno-math-errno / -fno-trapping-math let g++ vectorize the element loops (no change to results);
# -ffp-contract=off keeps every CPU's code path rounding alike (no FMA contraction).
CXX_FLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off"]
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]


def _want_cuda(cpp_extension) -> bool:
    forced = os.environ.get("VITTLE_FAST_BUILD_CUDA")
    if forced is not None:
        return forced == "1"
    import torch

    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _add_nvidia_wheel_headers() -> None:
    """torch's CUDA headers include cuSPARSE/cuBLAS/cuSOLVER headers that a minimal CUDA toolkit may
    lack; the nvidia-* wheels a CUDA build of torch depends on ship them. They go on
    CPLUS_INCLUDE_PATH, which is searched after the toolkit's own -I directories, so a full toolkit
    still wins."""
    try:
        import nvidia
    except ImportError:
        return
    found = sorted(str(path) for base in nvidia.__path__ for path in Path(base).glob("*/include"))
    current = [p for p in os.environ.get("CPLUS_INCLUDE_PATH", "").split(os.pathsep) if p]
    os.environ["CPLUS_INCLUDE_PATH"] = os.pathsep.join(current + [p for p in found if p not in current])


def _set_cuda_home() -> None:
    """torch takes CUDA_HOME as the parent of the `nvcc` on PATH; where that is a wrapper outside the
    toolkit (this project's machines have /usr/local/bin/nvcc), it then links against /usr/local/lib,
    which has no libcudart. Pick a directory that really holds a toolkit: /usr/local/cuda, else the
    resolved nvcc's grandparent. An explicit CUDA_HOME / CUDA_PATH always wins."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = [Path("/usr/local/cuda")] + ([Path(nvcc).resolve().parent.parent] if nvcc else [])
    for home in candidates:
        if (home / "bin" / "nvcc").is_file() and (home / "include" / "cuda_runtime.h").is_file():
            os.environ["CUDA_HOME"] = str(home)
            return


def _extensions():
    if os.environ.get("VITTLE_FAST_BUILD_EXT", "1") == "0":
        return [], {}
    _set_cuda_home()  # before cpp_extension reads it at import
    from torch.utils import cpp_extension

    common = dict(include_dirs=[str(ROOT / CSRC)], extra_link_args=["-fopenmp"])
    if _want_cuda(cpp_extension):
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        _add_nvidia_wheel_headers()
        ext = cpp_extension.CUDAExtension(
            "vittle_fast._C",
            CPU_SOURCES + CUDA_SOURCES,
            define_macros=[("VITTLE_FAST_WITH_CUDA", None)],
            extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
            **common,
        )
    else:
        ext = cpp_extension.CppExtension("vittle_fast._C", CPU_SOURCES, extra_compile_args={"cxx": CXX_FLAGS}, **common)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
