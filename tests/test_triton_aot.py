"""Ahead-of-time GPU compile of every Triton kernel of the op, with no GPU (docs/DESIGN.md §4).

Runs ``python -m vittle_fast.ops.triton.aot`` in a subprocess WITHOUT ``TRITON_INTERPRET`` (this
test session has it set, and the interpreter replaces the jit functions), then checks the printed
resource table: every variant compiled for sm_80 and sm_90 with zero spills and no local memory.
The default run compiles a representative subset; ``-m slow`` adds the full sweep.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[1]


def run_aot(*args: str) -> list[dict]:
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-m", "vittle_fast.ops.triton.aot", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1800)
    print(proc.stdout)  # the table, visible with `pytest -s`
    lines = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert lines, f"no table printed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[1:]]
    assert proc.returncode == 0, f"aot exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return rows


def check_table(rows: list[dict], *, full: bool) -> None:
    for row in rows:
        assert row["spill B"] == "0" and row["local B"] == "0", f"spills: {row}"
        # <= 128 registers: at least two 256-thread programs fit on an SM (65536 registers)
        assert 0 < int(row["regs"]) <= 128, f"register use beyond the occupancy budget: {row}"
    covered = {(row["kernel"], row["sm"], row["dtype"], row["prior"], row["sample"]) for row in rows}
    needed = {(kernel, sm, dtype, prior, "True")
              for kernel in ("fwd", "bwd") for sm in ("80", "90") for dtype in ("bf16", "fp32")
              for prior in ("fixed", "learnable")}
    assert needed <= covered, f"missing variants: {needed - covered}"
    if full:
        from vittle_fast.ops.triton.vib_sample_kl import gpu_tile_configs

        tiles = {(int(row["BLOCK"]), int(row["ROWS"]), int(row["warps"]),
                  None if row["maxnreg"] == "-" else int(row["maxnreg"])) for row in rows}
        assert tiles == set(gpu_tile_configs())
        assert len(rows) == (2 * 2 * 2 * 2 * 2 + 2 * 2 * 2 * 2) * len(tiles)  # + tensor scalars when sampling
    assert any(row["scalars"] == "memory" for row in rows), "tensor scalars (pointer loads) not compiled"


def test_kernels_compile_for_sm80_and_sm90_without_spills():
    check_table(run_aot(), full=False)


@pytest.mark.slow
def test_every_launchable_variant_compiles_without_spills():
    check_table(run_aot("--full"), full=True)


@pytest.mark.slow
def test_bottleneck_kernels_compile_for_sm80_and_sm90_without_spills():
    """The fused bottleneck's kernels (``--op vib_bottleneck``): the training launches, bf16 on sm_80 and
    sm_90 and fp16 on sm_90, no spills, no local memory (18 compiles, ~25 s)."""
    rows = run_aot("--op", "vib_bottleneck")
    for row in rows:
        assert row["spill B"] == "0" and row["local B"] == "0", f"spills: {row}"
    covered = {(row["kernel"], row["sm"]) for row in rows}
    assert covered == {(k, sm) for k in ("linear_gelu", "gelu_bwd", "tail_fwd", "tail_bwd")
                       for sm in ("80", "90")}


@pytest.mark.slow
def test_every_bottleneck_variant_compiles_without_spills():
    """``--op vib_bottleneck --full``: every flag combination of the four kernels, bf16 and fp16, sm_80
    and sm_90 (272 compiles, ~7.5 min). The subset above missed the sm_80 fixed-prior backward's
    spills (ptxas left to itself) and a register cap's 64 spilling forward variants."""
    rows = run_aot("--op", "vib_bottleneck", "--full")
    for row in rows:
        assert row["spill B"] == "0" and row["local B"] == "0", f"spills: {row}"
    # (sm, dtype) x (linear_gelu, gelu_bwd, tail_fwd, tail_bwd flag sets)
    assert len(rows) == 2 * 2 * (2 + 2 + 2**5 + 2**5)
