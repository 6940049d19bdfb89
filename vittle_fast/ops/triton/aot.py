"""Ahead-of-time compile of the ops' Triton kernels for sm_80 / sm_90, with no GPU.

    python -m vittle_fast.ops.triton.aot            # vib_sample_kl: representative subset (~15-30 s)
    python -m vittle_fast.ops.triton.aot --full     # every variant the GPU launcher can pick
    python -m vittle_fast.ops.triton.aot --op vib_bottleneck [--full]   # the bottleneck's GEMM kernels

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

from . import vib_bottleneck as bottleneck
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


# AOT kernel name -> (Triton function, its GPU_CONFIGS entry)
BOTTLENECK_KERNELS = {
    "linear_gelu": (bottleneck._linear_gelu_kernel, "linear_gelu"),
    "gelu_bwd": (bottleneck._gelu_backward_kernel, "gelu_backward"),
    "tail_fwd": (bottleneck._linear_tail_kernel, "linear_tail"),
    "tail_bwd": (bottleneck._linear_tail_kernel, "linear_tail"),
}


@dataclass(frozen=True)
class GemmVariant:
    """One specialisation of a bottleneck kernel."""

    kernel: str  # a key of BOTTLENECK_KERNELS
    cc: int
    dtype: str
    flags: tuple[tuple[str, bool], ...]  # the kernel's boolean constexprs
    config: bottleneck.GemmConfig

    @property
    def max_registers(self) -> int | None:
        return self.config.max_registers

    @property
    def num_warps(self) -> int:
        return self.config.num_warps

    @property
    def num_stages(self) -> int:
        return self.config.num_stages

    @property
    def fn(self):
        return BOTTLENECK_KERNELS[self.kernel][0]

    def source(self) -> ASTSource:
        t = f"*{self.dtype}"
        flags = {**dict(self.flags), "BLOCK_M": self.config.block_m, "BLOCK_N": self.config.block_n}
        if self.kernel != "gelu_bwd":  # the GEMMs: fp32 dots only under the interpreter, a K tile
            flags |= {"DOT_FP32": False, "BLOCK_K": self.config.block_k}
        if self.kernel == "gelu_bwd":
            pointers = {"preact_ptr": t, "grad_ptr": t, "gelu_ptr": t, "partials_ptr": "*fp32"}
            scalars = {"M": "i32", "D": "i32"}
        elif self.kernel == "linear_gelu":
            pointers = {"h_ptr": t, "order_ptr": "*i64", "preact_ptr": t, "gelu_ptr": t,
                        "w1_a": t, "b1_a": t, "w1_b": t, "b1_b": t}
            scalars = {"D": "i32", "tiles_0": "i32", "size_0": "i32", "size_1": "i32", "first_1": "i32"}
        else:
            backward = self.kernel == "tail_bwd"
            fwd_only = "constexpr" if backward else None
            bwd_only = None if backward else "constexpr"
            pointers = {"gelu_ptr": t, "h_ptr": t, "order_ptr": "*i64", "stats_ptr": t,
                        "out_ptr": fwd_only or t, "kl_partials_ptr": fwd_only or "*fp32",
                        "grad_out_ptr": bwd_only or t, "grad_kl_ptr": bwd_only or "*fp32",
                        "grad_stats_ptr": bwd_only or t, "grad_rows_ptr": bwd_only or t,
                        "grad_partials_ptr": bwd_only or "*fp32",
                        "w2_a": t, "b2_a": t, "w2_b": t, "b2_b": t,
                        "mu_a": "*fp32", "lv_a": "*fp32", "mu_b": "*fp32", "lv_b": "*fp32"}
            pointers.update(alpha_ptr="constexpr", seed_ptr="constexpr", offsets_ptr="constexpr")  # Python scalars
            scalars = {"learn_a": "i32", "learn_b": "i32", "D": "i32", "tiles_0": "i32", "size_0": "i32",
                       "size_1": "i32", "first_1": "i32", "n_tiles": "i32", "alpha": "fp32", "seed": "i64",
                       "offset_0": "i64", "offset_1": "i64", "group_0": "i32", "group_1": "i32",
                       "clamp_lo": "fp32", "clamp_hi": "fp32", "kl_logvar_coef": "fp32"}
        types = {**pointers, **scalars, **{name: "constexpr" for name in flags}}
        signature = {name: types[name] for name in self.fn.arg_names}  # the kernel's argument order
        constexprs = {**{name: None for name, ty in pointers.items() if ty == "constexpr"}, **flags}
        aligned = [name for name, ty in pointers.items() if ty != "constexpr"] + ["D"]  # D % 16 == 0: Llama widths
        attrs = {(self.fn.arg_names.index(name),): ALIGNED for name in aligned}
        return ASTSource(fn=self.fn, signature=signature, constexprs=constexprs, attrs=attrs)


def gemm_variants(full: bool) -> list[GemmVariant]:
    """Subset (the launches training makes): bf16 on sm_80 and sm_90 with the row gather, sampling and a
    learnable prior: GEMM1, GELU's backward pass, the forward tail saving stats or not (recompute), the
    backward tail reading saved stats or recomputing them; plus fp16 on sm_90. Full: every flag
    combination, bf16 and fp16."""
    names = {"linear_gelu": ("HAS_ORDER",), "gelu_bwd": ("STORE_GELU",),
             "tail_fwd": ("HAS_ORDER", "STATS_OUT", "SAMPLE", "ANY_PRIOR", "ALIGNED4"),
             "tail_bwd": ("HAS_ORDER", "STATS_IN", "SAMPLE", "ANY_PRIOR", "ALIGNED4")}
    fixed = {"tail_fwd": {"BACKWARD": False, "STATS_IN": False}, "tail_bwd": {"BACKWARD": True, "STATS_OUT": False}}

    def variant(kernel, cc, dtype, values):
        config = bottleneck.GPU_CONFIGS[BOTTLENECK_KERNELS[kernel][1]]
        return GemmVariant(kernel, cc, dtype, tuple({**fixed.get(kernel, {}), **values}.items()), config)

    if full:
        return [variant(kernel, cc, dtype, dict(zip(flag_names, values)))
                for kernel, flag_names in names.items() for cc in (80, 90) for dtype in ("bf16", "fp16")
                for values in itertools.product((True, False), repeat=len(flag_names))]
    training = {kernel: dict.fromkeys(flag_names, True) for kernel, flag_names in names.items()}
    shapes = [("linear_gelu", training["linear_gelu"]), ("gelu_bwd", training["gelu_bwd"]),
              ("tail_fwd", training["tail_fwd"]),
              ("tail_fwd", training["tail_fwd"] | {"STATS_OUT": False}), ("tail_bwd", training["tail_bwd"]),
              ("tail_bwd", training["tail_bwd"] | {"STATS_IN": False})]
    chosen = [variant(kernel, cc, "bf16", values) for cc in (80, 90) for kernel, values in shapes]
    return chosen + [variant(kernel, 90, "fp16", values) for kernel, values in shapes]


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
        options = {"num_warps": variant.num_warps, "maxnreg": variant.max_registers,
                   "num_stages": getattr(variant, "num_stages", 3)}
        compiled = triton.compile(variant.source(), target=GPUTarget("cuda", variant.cc, 32), options=options)
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


GEMM_COLUMNS = ("kernel", "sm", "dtype", "flags", "BLOCK_M", "BLOCK_N", "BLOCK_K", "warps", "stages",
                "regs", "spill B", "stack B", "local B", "shared B", "widest ld B", "widest st B")


def gemm_table_row(variant: GemmVariant, usage: dict) -> list:
    on = ",".join(name for name, value in variant.flags if value) or "-"
    c = variant.config
    return [variant.kernel, variant.cc, variant.dtype, on, c.block_m, c.block_n, c.block_k, c.num_warps,
            c.num_stages, usage["regs"], usage["spill_bytes"], usage["stack"], usage["local"], usage["shared"],
            usage["ld_bytes"], usage["st_bytes"]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="every variant, not the representative subset")
    parser.add_argument("--op", choices=("vib_sample_kl", "vib_bottleneck"), default="vib_sample_kl",
                        help="which op's kernels (default vib_sample_kl)")
    args = parser.parse_args(argv)
    if op.interpreting():
        parser.error("unset TRITON_INTERPRET: the interpreter replaces the jit functions")
    columns, row_of = (COLUMNS, table_row) if args.op == "vib_sample_kl" else (GEMM_COLUMNS, gemm_table_row)
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    chosen = variants(args.full) if args.op == "vib_sample_kl" else gemm_variants(args.full)
    spilled, start = 0, time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for variant in chosen:
            usage = resource_usage(variant, Path(tmp))
            print("| " + " | ".join(str(cell) for cell in row_of(variant, usage)) + " |", flush=True)
            spilled += usage["spill_bytes"] > 0 or usage["local"] > 0
    print(f"\n{len(chosen)} variants, {spilled} spilling, {time.perf_counter() - start:.0f} s")
    return 1 if spilled else 0


if __name__ == "__main__":
    sys.exit(main())
