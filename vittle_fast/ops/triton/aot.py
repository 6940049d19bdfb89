"""Ahead-of-time compile of the op's Triton kernels for sm_80 / sm_90, with no GPU.

    python -m vittle_fast.ops.triton.aot            # representative subset (~15-30 s)
    python -m vittle_fast.ops.triton.aot --full     # every variant the GPU launcher can pick

Each variant is compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``
exactly as the JIT would specialise a real call (16-byte aligned pointers, D % 16 == 0 as for
Llama widths, no prior pointers for the fixed prior); the cubin's registers, stack, local memory
and shared memory come from the ``cuobjdump`` bundled in the triton wheel, spills from the
``ptxas -v`` report of Triton's own ptxas call (its bundled ptxas, its flags), the widest global
load/store (vectorisation) from the PTX. Prints a Markdown table; exits 1 if any variant spills.
Must run WITHOUT ``TRITON_INTERPRET=1`` (the interpreter replaces the jit functions).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import vib_sample_kl as op

NVIDIA_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
ALIGNED = [["tt.divisibility", 16]]  # what the JIT attaches to 16-byte aligned pointers and D % 16 == 0


@dataclass(frozen=True)
class Variant:
    kernel: str  # "fwd" | "bwd"
    cc: int
    dtype: str  # Triton type of h / stats: "bf16" | "fp16" | "fp32"
    learnable_prior: bool
    sample: bool
    block: int
    rows: int
    num_warps: int
    max_registers: int | None
    scalars_in_memory: bool = False  # alpha / seed / offset given as tensors (pointer loads)

    @property
    def fn(self):
        return op._vib_sample_kl_fwd_kernel if self.kernel == "fwd" else op._vib_sample_kl_bwd_kernel

    def source(self) -> ASTSource:
        """The ASTSource the JIT would build for this specialisation."""
        tensor = f"*{self.dtype}"
        prior = "*fp32" if self.learnable_prior else "constexpr"
        if self.kernel == "fwd":
            pointers = {"h_ptr": tensor, "stats_ptr": tensor, "prior_mu_ptr": prior, "prior_logvar_ptr": prior,
                        "z_hat_ptr": tensor, "kl_ptr": "*fp32"}
        else:
            pointers = {"grad_z_hat_ptr": tensor, "grad_kl_ptr": "*fp32", "stats_ptr": tensor,
                        "prior_mu_ptr": prior, "prior_logvar_ptr": prior, "grad_h_ptr": tensor,
                        "grad_stats_ptr": tensor, "prior_partials_ptr": prior}
        scalar_ptrs = {"alpha_ptr": "*fp32", "seed_ptr": "*i64", "offset_ptr": "*i64"}
        if not self.scalars_in_memory:
            scalar_ptrs = dict.fromkeys(scalar_ptrs, "constexpr")
        scalars = {"n_rows": "i32", "D": "i32", "tiles_per_program": "i32", "alpha": "fp32",
                   "seed": "i64", "offset": "i64", **scalar_ptrs, "clamp_lo": "fp32", "clamp_hi": "fp32",
                   "kl_logvar_coef": "fp32"}
        flags = {"LEARNABLE_PRIOR": self.learnable_prior, "SAMPLE": self.sample, "ROWS": self.rows,
                 "BLOCK": self.block}
        signature = {**pointers, **scalars, **{name: "constexpr" for name in flags}}
        pointers |= scalar_ptrs  # None pointers are constexprs, given ones 16-byte aligned
        constexprs = {**{name: None for name, ty in pointers.items() if ty == "constexpr"}, **flags}
        aligned = [name for name, ty in pointers.items() if ty != "constexpr"] + ["D"]
        attrs = {(self.fn.arg_names.index(name),): ALIGNED for name in aligned}
        return ASTSource(fn=self.fn, signature=signature, constexprs=constexprs, attrs=attrs)


def variants(full: bool) -> list[Variant]:
    """Full: every (kernel, cc, dtype, prior, sample, tile) the GPU launcher can pick for bf16/fp32,
    and the sampling ones again with alpha / seed / offset given as tensors.

    Subset: every kernel x cc x dtype x prior at the large-D tile (the training shape, sample on),
    plus two multi-row tiles (smallest and middle block), the posterior-mean path and tensor scalars.
    """
    tiles = op.gpu_tile_configs()
    if full:  # + tensor scalars (read from memory) for every sampling variant
        heads = itertools.product(("fwd", "bwd"), (80, 90), ("bf16", "fp32"), (False, True), (True, False))
        grid = [(*head, *tile, False) for head in heads for tile in tiles]
        grid += [(*head[:5], *head[5:9], True) for head in grid if head[4]]
        return [Variant(*args) for args in grid]
    largest, multi_row = tiles[-1], (tiles[0], tiles[len(tiles) // 2])
    chosen = [Variant(k, cc, dt, prior, True, *largest)
              for k, cc, dt, prior in itertools.product(("fwd", "bwd"), (80, 90), ("bf16", "fp32"), (False, True))]
    chosen += [Variant(k, 90, "bf16", True, True, *tile) for tile in multi_row for k in ("fwd", "bwd")]
    chosen += [Variant(k, 90, "bf16", False, False, *largest) for k in ("fwd", "bwd")]
    chosen += [Variant(k, 90, "bf16", True, True, *largest, scalars_in_memory=True) for k in ("fwd", "bwd")]
    return chosen


def _widest_access_bytes(ptx: str, kind: str) -> int:
    """Bytes moved by the widest ``ld.global`` / ``st.global`` instruction of the PTX."""
    accesses = re.findall(rf"\b{kind}\.global(?:\.nc)?(?:\.v(\d))?\.[bfsu](\d+)\b", ptx)
    return max((int(vec or 1) * int(bits) // 8 for vec, bits in accesses), default=0)


def resource_usage(variant: Variant, workdir: Path) -> dict:
    """Compile one variant; read its resources from the cubin and from the ptxas log of that compile."""
    ptxas_log = io.StringIO()
    with knobs.compilation.scope(), knobs.nvidia.scope(), contextlib.redirect_stdout(ptxas_log):
        knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its report
        knobs.nvidia.dump_ptxas_log = True  # Triton prints the `ptxas -v` output of its own call
        compiled = triton.compile(variant.source(), target=GPUTarget("cuda", variant.cc, 32),
                                  options={"num_warps": variant.num_warps, "maxnreg": variant.max_registers})
    cubin = workdir / f"{variant.kernel}_sm{variant.cc}.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    usage = subprocess.run([str(NVIDIA_BIN / "cuobjdump"), "--dump-resource-usage", str(cubin)],
                           check=True, capture_output=True, text=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    spills = re.findall(r"(\d+) bytes spill (?:stores|loads)", ptxas_log.getvalue())
    if not spills:
        raise RuntimeError(f"no ptxas report captured for {variant}")
    ptx = compiled.asm["ptx"]
    return {"regs": int(fields["REG"]), "spill_bytes": sum(map(int, spills)), "stack": int(fields["STACK"]),
            "local": int(fields["LOCAL"]), "shared": int(fields["SHARED"]),
            "ld_bytes": _widest_access_bytes(ptx, "ld"), "st_bytes": _widest_access_bytes(ptx, "st")}


COLUMNS = ("kernel", "sm", "dtype", "prior", "sample", "scalars", "BLOCK", "ROWS", "warps", "maxnreg",
           "regs", "spill B", "stack B", "local B", "shared B", "widest ld B", "widest st B")


def table_row(variant: Variant, usage: dict) -> list:
    return [variant.kernel, variant.cc, variant.dtype, "learnable" if variant.learnable_prior else "fixed",
            variant.sample, "memory" if variant.scalars_in_memory else "args", variant.block, variant.rows,
            variant.num_warps, variant.max_registers or "-",
            usage["regs"], usage["spill_bytes"], usage["stack"], usage["local"], usage["shared"],
            usage["ld_bytes"], usage["st_bytes"]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="every variant, not the representative subset")
    args = parser.parse_args(argv)
    if op.interpreting():
        parser.error("unset TRITON_INTERPRET: the interpreter replaces the jit functions")
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    spilled, start, chosen = 0, time.perf_counter(), variants(args.full)
    with tempfile.TemporaryDirectory() as tmp:
        for variant in chosen:
            usage = resource_usage(variant, Path(tmp))
            print("| " + " | ".join(str(cell) for cell in table_row(variant, usage)) + " |", flush=True)
            spilled += usage["spill_bytes"] > 0 or usage["local"] > 0
    print(f"\n{len(chosen)} variants, {spilled} spilling, {time.perf_counter() - start:.0f} s")
    return 1 if spilled else 0


if __name__ == "__main__":
    sys.exit(main())
