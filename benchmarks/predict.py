"""Predicted per-step cost of Vittle's bottleneck in LLaVA-1.5 training, beside the paper's measurement.

No GPU here: every GPU time below is a **prediction** from bytes, FLOPs, launches and syncs, with the
constants named in GPUS / ASSUMPTIONS / MODELS (each with its source). The one measured input is the
host noise of the released code (``torch.randn`` on the CPU with one thread, at the paper's shape),
timed on this machine when the script runs.

Four implementations of the bottleneck (both modalities, forward + backward, one training step of
one GPU: 16 sequences x 900 tokens):

  (a) released       the released code (benchmarks/step_overhead.py:released_bottleneck / released_kl,
                     op for op): eager ops on positional slices, torch.cat of the whole sequence per
                     modality, noise drawn on the host and copied from pageable memory, boolean-mask
                     indexing and ``kl > 10000`` checks (host syncs)
  (b) device noise   (a) with the noise drawn on the device (torch.randn(device=...)): no host noise,
                     no copy; everything else as (a)
  (c) fused tail     VittleBottleneck.forward_both with ``fused_mlp=False`` (row permutation, eager
                     MLPs) and the fused sample + KL op (2 launches, its I/O contract), no host sync
  (d) fused          ``vib_bottleneck``'s Triton path (the default, ``fused_mlp=True``): GEMM1 + GELU,
       bottleneck    GEMM2 + sample/KL tail, the backward's tail, GELU pass and cuBLAS GEMMs, counted
                     launch by launch (benchmarks/bottleneck_providers.fused_kernels); (d) recomputes
                     stats in backward (``recompute=True``), (d') saves them (the default)

(a)-(c) are counted, not estimated by hand: the code runs on meta tensors under a TorchDispatchMode
that records every kernel an eager GPU run would launch (bytes read + written, GEMM FLOPs), forward
and autograd backward; (d)/(d') take the Triton path's launch list. Each kernel's time is its
roofline, max(FLOPs / (peak x GEMM efficiency), bytes / (HBM x memory efficiency), a per-kernel
floor); a host sync adds a fixed drain + relaunch gap; the host noise adds its measured time; the
pageable copy, bytes / (PCIe x pageable fraction).

    python -m benchmarks.predict [--out benchmarks/results/predict] [--reps 3]
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.bottleneck_providers import fused_kernels
from benchmarks.gpu_model import _NO_KERNEL_OPS, _SHAPE_ONLY_OPS, _is_view, _tensor_bytes, fused_cost
from benchmarks.results_io import command_line, write_results
from benchmarks.step_overhead import Host, released_bottleneck, released_kl


@dataclass(frozen=True)
class Gpu:
    hbm: float      # bytes/s
    bf16: float     # dense FLOP/s
    pcie: float     # bytes/s, host -> device, one direction
    nvlink: float   # bytes/s, one direction per GPU
    source: str


GPUS = {
    "A100-80GB": Gpu(2.039e12, 312e12, 32e9, 300e9,
                     "NVIDIA A100 datasheet (SXM4 80GB): HBM2e 2,039 GB/s; BF16 dense 312 TFLOPS; "
                     "PCIe Gen4 x16 64 GB/s both ways; NVLink 600 GB/s both ways"),
    "H100-SXM": Gpu(3.35e12, 989e12, 64e9, 450e9,
                    "NVIDIA H100 datasheet (SXM5): HBM3 3.35 TB/s; BF16 dense 989 TFLOPS (1,979 with "
                    "sparsity); PCIe Gen5 x16 128 GB/s both ways; NVLink 900 GB/s both ways"),
}

# Assumptions (not measured anywhere here), each with why; change them here, in one place.
ASSUMPTIONS = {
    "gemm_efficiency": (0.6, "achieved fraction of BF16 dense peak for the bottleneck GEMMs (M = 14,400, "
                             "K, N = 4-10k: cuBLAS typically reaches 60-75%; the low end)"),
    "memory_efficiency": (0.85, "achieved fraction of HBM bandwidth for streaming elementwise kernels "
                                "(docs/triton.md's roofline uses ~90% on H100)"),
    "kernel_floor_us": (4.0, "minimum GPU time per launched kernel when the queue is fed (launch gap + "
                             "ramp; typical eager PyTorch kernels on tiny tensors take 3-5 us)"),
    "sync_us": (20.0, "per host sync: the queue drains, the host reads the value and launches again "
                      "(not counting host work the sync exposes, listed separately)"),
    "pageable_fraction": (0.5, "pageable host->device copies are staged through a pinned bounce "
                               "buffer by the driver: about half the link's peak"),
    "collective_efficiency": (0.7, "achieved fraction of NVLink bandwidth for all-gather / reduce-scatter"),
}


def assumption(name: str) -> float:
    return ASSUMPTIONS[name][0]


@dataclass(frozen=True)
class Model:
    d: int
    n_layers: int
    layer: int           # the bottleneck follows this decoder layer
    params: float        # language-model parameters (with embeddings and LM head)
    vocab: int


MODELS = {
    # Vicuna-7B / 13B v1.5 configs (hidden 4096 / 5120, 32 / 40 layers, vocab 32,000); the bottleneck
    # after the top 25%: layer 24 / 30 (docs/DESIGN.md §1).
    "LLaVA-1.5-7B": Model(4096, 32, 24, 6.74e9, 32000),
    "LLaVA-1.5-13B": Model(5120, 40, 30, 13.0e9, 32000),
}

# The paper's per-GPU batch: per_device_train_batch_size 16 (LLaVA-1.5 fine-tuning script, 8 GPUs,
# global 128). Padded length ~900: 576 image tokens + the LLaVA-665k conversations' text (~300 tokens
# on average), padded to the longest of the batch - an estimate, not a measurement.
SEQUENCES, SEQ_LEN, IMAGE_TOKENS = 16, 900, 576
# The released split: sequence length - text length = image tokens - 1 positions are "visual".
VISUAL_POSITIONS = IMAGE_TOKENS - 1
# Text KL tokens (prompt tokens of the text part): about half of the text part - an estimate; it only
# sizes the tiny boolean-mask indexing.
TEXT_KL_FRACTION = 0.5
GPUS_PER_NODE = 8
# Paper, Table 5 (8x A100): LLaVA-1.5-7B baseline 7.363 s/iter, Vittle 9.482 s/iter.
PAPER = {"baseline_s": 7.363, "vittle_s": 9.482, "source": "Vittle paper (arXiv 2505.13946), Table 5, 8x A100"}


# ------------------------------------------------------------------------------------------------
# Counting kernels on meta tensors
# ------------------------------------------------------------------------------------------------
_GEMMS = {"mm", "addmm", "bmm", "baddbmm"}
_INDEX_OPS = {"index", "index_put", "index_put_", "_index_put_impl_"}


@dataclass
class Kernel:
    name: str
    bytes: int
    flops: int = 0


@dataclass
class Trace:
    kernels: list[Kernel] = field(default_factory=list)
    syncs: int = 0
    host_noise_elements: int = 0
    h2d_bytes: int = 0


def _gemm_flops(name: str, args) -> int:
    a, b = (args[1], args[2]) if name in ("addmm", "baddbmm") else (args[0], args[1])
    batch = a.shape[0] if a.ndim == 3 else 1
    return 2 * batch * a.shape[-2] * a.shape[-1] * b.shape[-1]


class KernelRecorder(TorchDispatchMode):
    """Records the kernels an eager GPU run would launch (as benchmarks.gpu_model counts them), with
    GEMM FLOPs; boolean-mask indices become ``mask_true`` long indices (on a GPU: a nonzero kernel
    and a host sync, since the output size lives on the device)."""

    def __init__(self, trace: Trace, mask_true: int):
        super().__init__()
        self.trace, self.mask_true = trace, mask_true

    def _long_indices(self, indices):
        out = []
        for index in indices:
            if isinstance(index, torch.Tensor) and index.dtype == torch.bool:
                self.trace.kernels.append(Kernel("nonzero", index.nbytes + self.mask_true * 8 * index.ndim))
                self.trace.syncs += 1
                out.extend(torch.empty(self.mask_true, dtype=torch.long, device=index.device)
                           for _ in range(index.ndim))
            else:
                out.append(index)
        return out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in _INDEX_OPS:
            args = (args[0], self._long_indices(args[1]), *args[2:])
        out = func(*args, **kwargs)
        if _is_view(func) or name in _NO_KERNEL_OPS:
            return out
        read = 0 if name in _SHAPE_ONLY_OPS else _tensor_bytes((args, kwargs))
        flops = _gemm_flops(name, args) if name in _GEMMS else 0
        self.trace.kernels.append(Kernel(name, read + _tensor_bytes(out), flops))
        return out


class MetaHost(Host):
    """The released code's host side, recorded: noise on the host (``device_noise=False``: its
    elements and the host->device bytes) or on the device (one randn kernel); ``kl > limit`` is a
    comparison kernel and a host sync."""

    def __init__(self, trace: Trace, device_noise: bool):
        self.trace, self.device_noise = trace, device_noise

    def noise(self, shape, dtype, device):
        if self.device_noise:
            return torch.randn(shape, dtype=dtype, device=device)
        out = torch.empty(shape, dtype=dtype, device=device)
        self.trace.host_noise_elements += out.numel()
        self.trace.h2d_bytes += out.nbytes
        return out

    def exceeds(self, value, limit):
        value > limit  # the comparison kernel; the host then reads it
        self.trace.syncs += 1
        return False


def _mlp(d: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, 2 * d)).to(device="meta", dtype=torch.bfloat16)


def released_trace(model: Model, device_noise: bool) -> Trace:
    """(a) / (b): the released bottleneck + KLs, forward and backward, on meta tensors."""
    trace = Trace()
    text_positions = SEQ_LEN - VISUAL_POSITIONS
    mask_true = int(SEQUENCES * text_positions * TEXT_KL_FRACTION)
    host = MetaHost(trace, device_noise)
    h = torch.empty(SEQUENCES, SEQ_LEN, model.d, device="meta", dtype=torch.bfloat16, requires_grad=True)
    mask = torch.empty(SEQUENCES, text_positions, device="meta", dtype=torch.int32)
    mlp_v, mlp_t = _mlp(model.d), _mlp(model.d)
    with KernelRecorder(trace, mask_true):
        out, mu_v, lv_v = released_bottleneck(h, mlp_v, slice(0, VISUAL_POSITIONS), 0.5, host)
        out, mu_t, lv_t = released_bottleneck(out, mlp_t, slice(VISUAL_POSITIONS, SEQ_LEN), 0.5, host)
        kl = 0.1 * released_kl(mu_v, lv_v, None, host) + 0.1 * released_kl(mu_t, lv_t, mask, host)
        torch.autograd.backward((out, kl), (torch.empty_like(out), torch.ones((), device="meta")))
    return trace


class _FusedTailStub(torch.autograd.Function):
    """Stands in for vib_sample_kl on meta tensors: shapes only; its kernels are added from the op's
    I/O contract (benchmarks.gpu_model.fused_cost)."""

    @staticmethod
    def forward(ctx, h, stats):
        return torch.empty_like(h), h.new_empty(h.shape[:-1], dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad_z, grad_kl):
        return torch.empty_like(grad_z), grad_z.new_empty((*grad_z.shape[:-1], 2 * grad_z.shape[-1]))


def fused_tail_trace(model: Model) -> Trace:
    """(c): VittleBottleneck.forward_both with ``fused_mlp=False`` (eager MLPs), the fused tail op
    counted as its 2 kernels."""
    from vittle_fast.nn import VittleConfig
    from vittle_fast.nn.bottleneck import VittleBottleneck

    trace = Trace()
    rows, visual = SEQUENCES * SEQ_LEN, SEQUENCES * IMAGE_TOKENS
    with torch.device("meta"):
        config = VittleConfig(layer_v=model.layer, layer_t=model.layer, fused_mlp=False)
        bottleneck = VittleBottleneck(model.d, config)
    bottleneck = bottleneck.to(torch.bfloat16)
    h = torch.empty(rows, model.d, device="meta", dtype=torch.bfloat16, requires_grad=True)
    order = torch.empty(rows, dtype=torch.long, device="meta")
    masks = {"visual": torch.empty(visual, dtype=torch.bool, device="meta"),
             "text": torch.empty(rows - visual, dtype=torch.bool, device="meta")}
    stub = lambda h, stats, *args, **kwargs: _FusedTailStub.apply(h, stats)  # noqa: E731
    with mock.patch("vittle_fast.nn.bottleneck.vib_sample_kl", stub), KernelRecorder(trace, 0):
        out, kls = bottleneck.forward_both(h, order, visual, masks, alpha=0.5, noise_seed=1)
        loss = 0.1 * kls["visual"] + 0.1 * kls["text"]
        torch.autograd.backward((out, loss), (torch.empty_like(out), torch.ones((), device="meta")))
    for part in (visual, rows - visual):
        fwd = fused_cost(part, model.d, torch.bfloat16, "fwd").bytes
        trace.kernels += [Kernel("vib_sample_kl fwd", fwd),
                          Kernel("vib_sample_kl bwd", fused_cost(part, model.d, torch.bfloat16, "fwd+bwd").bytes - fwd)]
    return trace


def fused_bottleneck_trace(model: Model, recompute: bool) -> Trace:
    """(d)/(d'): ``vib_bottleneck``'s Triton path, per modality, its launches as
    benchmarks/bottleneck_providers.fused_kernels lists them (bf16; ``stats`` recomputed in backward
    or saved)."""
    trace = Trace()
    for m in (SEQUENCES * IMAGE_TOKENS, SEQUENCES * (SEQ_LEN - IMAGE_TOKENS)):
        trace.kernels += [Kernel(name, nbytes, flops)
                          for name, flops, nbytes in fused_kernels(m, model.d, torch.bfloat16, recompute)]
    return trace


# ------------------------------------------------------------------------------------------------
# Host noise (measured) and the time model
# ------------------------------------------------------------------------------------------------
def measure_host_noise(model: Model, dtype: torch.dtype, reps: int) -> dict:
    """The released code's two host draws (visual and text slices) with one thread,
    ``torch.randn(1, 16, positions, d, dtype=dtype)``: median seconds of ``reps`` runs (first dropped),
    as wall time and as this thread's CPU time. The model uses the CPU time: what the draw costs on a
    core of its own (a training launcher's rank), whatever else shares this machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        shapes = [(1, SEQUENCES, VISUAL_POSITIONS, model.d), (1, SEQUENCES, SEQ_LEN - VISUAL_POSITIONS, model.d)]
        wall, cpu = [], []
        for rep in range(reps + 1):
            start, start_cpu = time.perf_counter(), time.thread_time()
            for shape in shapes:
                torch.randn(shape, dtype=dtype)
            if rep:
                wall.append(time.perf_counter() - start)
                cpu.append(time.thread_time() - start_cpu)
        return {"wall_s": statistics.median(wall), "cpu_s": statistics.median(cpu),
                "elements": sum(a * b * c * e for a, b, c, e in shapes)}
    finally:
        torch.set_num_threads(previous)


def baseline_flops(model: Model) -> float:
    """GEMM FLOPs of one baseline training step per GPU: decoder + LM head with gradient checkpointing
    (forward, recomputed forward, backward = 4 forward-equivalents of 2 FLOPs per parameter per
    token), causal attention (4 * L * s * d per token per forward, halved for causality), the frozen
    CLIP ViT-L/14-336 tower forward (304 M parameters x 577 tokens per image)."""
    tokens = SEQUENCES * SEQ_LEN
    decoder = tokens * 4 * (2 * (model.params - model.vocab * model.d) + 2 * model.n_layers * SEQ_LEN * model.d)
    vision = SEQUENCES * 577 * 2 * 0.304e9
    return decoder + vision


def bottleneck_params(model: Model) -> int:
    return 2 * (model.d * model.d + model.d + 2 * model.d * model.d + 2 * model.d)


def bottleneck_flops(model: Model) -> float:
    """The bottleneck's necessary GEMM FLOPs per step: every token through one Linear(d, d) and one
    Linear(d, 2d), forward + dgrad + wgrad (3 x 2 x 3 d^2 per token)."""
    return 18 * model.d * model.d * SEQUENCES * SEQ_LEN


def predict(trace: Trace, gpu: Gpu, host_noise_s: float, flop_floor: float) -> dict:
    peak = gpu.bf16 * assumption("gemm_efficiency")
    bandwidth = gpu.hbm * assumption("memory_efficiency")
    floor = assumption("kernel_floor_us") * 1e-6
    gemm = sum(max(k.flops / peak, k.bytes / bandwidth, floor) for k in trace.kernels if k.flops)
    other = sum(max(k.bytes / bandwidth, floor) for k in trace.kernels if not k.flops)
    h2d = trace.h2d_bytes / (gpu.pcie * assumption("pageable_fraction"))
    parts = {
        "GEMMs": gemm,
        "other kernels": other,
        "host noise (measured)": host_noise_s if trace.host_noise_elements else 0.0,
        "pageable H2D copy": h2d,
        "host syncs": trace.syncs * assumption("sync_us") * 1e-6,
    }
    return {
        "parts_ms": {k: v * 1e3 for k, v in parts.items()},
        "total_ms": sum(parts.values()) * 1e3,
        "gemm_flops": sum(k.flops for k in trace.kernels),
        "gemm_flop_floor_ms": flop_floor / peak * 1e3,
        "launches": len(trace.kernels),
        "non_gemm_bytes": sum(k.bytes for k in trace.kernels if not k.flops),
        "cat_bytes": sum(k.bytes for k in trace.kernels if k.name == "cat"),
        "syncs": trace.syncs,
    }


VARIANTS = {
    "(a) released": lambda model: released_trace(model, device_noise=False),
    "(b) released, device noise": lambda model: released_trace(model, device_noise=True),
    "(c) fused tail (fused_mlp=False)": fused_tail_trace,
    "(d) fused bottleneck (stats recomputed)": lambda model: fused_bottleneck_trace(model, recompute=True),
    "(d') fused bottleneck (stats saved, default)": lambda model: fused_bottleneck_trace(model, recompute=False),
}


def run(reps: int) -> dict:
    rows = []
    noise = {}
    for model_name, model in MODELS.items():
        for dtype in (torch.bfloat16, torch.float32):
            noise[(model_name, str(dtype))] = measure_host_noise(model, dtype, reps)
        traces = {name: build(model) for name, build in VARIANTS.items()}
        scale = baseline_flops(model) / baseline_flops(MODELS["LLaVA-1.5-7B"])
        for gpu_name, gpu in GPUS.items():
            gpu_scale = GPUS["A100-80GB"].bf16 / gpu.bf16
            baseline_s = PAPER["baseline_s"] * scale * gpu_scale
            collectives = (3 * bottleneck_params(model) * 2 * (GPUS_PER_NODE - 1) / GPUS_PER_NODE
                           / (gpu.nvlink * assumption("collective_efficiency")))
            for name, trace in traces.items():
                result = predict(trace, gpu, noise[(model_name, "torch.bfloat16")]["cpu_s"], bottleneck_flops(model))
                rows.append({
                    "model": model_name, "gpu": gpu_name, "variant": name, **result,
                    "baseline_step_s": baseline_s,
                    "overhead_pct_of_baseline": result["total_ms"] / 1e3 / baseline_s * 100,
                    "zero3_bottleneck_collectives_ms": collectives * 1e3,
                })
    return {
        "rows": rows,
        "host_noise": {f"{m} {d.removeprefix('torch.')}": s for (m, d), s in noise.items()},
        "constants": {"gpus": {k: vars(v) for k, v in GPUS.items()},
                      "assumptions": {k: {"value": v, "why": why} for k, (v, why) in ASSUMPTIONS.items()},
                      "models": {k: vars(v) for k, v in MODELS.items()},
                      "batch": {"sequences": SEQUENCES, "padded_length": SEQ_LEN, "image_tokens": IMAGE_TOKENS,
                                "released_visual_positions": VISUAL_POSITIONS,
                                "text_kl_fraction": TEXT_KL_FRACTION},
                      "paper": PAPER},
        "torch": torch.__version__,
        "host_threads_for_noise": 1,
    }


def to_markdown(result: dict, command: str) -> str:
    noise = "; ".join(f"{k}: {v['cpu_s'] * 1e3:.0f} ms CPU ({v['wall_s'] * 1e3:.0f} ms wall)"
                      for k, v in result["host_noise"].items())
    lines = [
        f"Predicted with `{command}` (torch {result['torch']}); GPU times are predictions, the host noise "
        f"is measured on this machine (one thread, both slices, {SEQUENCES} x {SEQ_LEN} tokens; the model uses the "
        f"CPU time): {noise}.",
        "",
        "| model | GPU | variant | total ms | GEMMs | other kernels | host noise | H2D copy | syncs (n) | "
        "launches | non-GEMM GB (torch.cat) | GEMM FLOP floor ms | % of baseline step | ZeRO-3 traffic ms |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        p = r["parts_ms"]
        lines.append(
            f"| {r['model']} | {r['gpu']} | {r['variant']} | {r['total_ms']:.1f} | {p['GEMMs']:.1f} | "
            f"{p['other kernels']:.1f} | {p['host noise (measured)']:.0f} | {p['pageable H2D copy']:.1f} | "
            f"{p['host syncs']:.2f} ({r['syncs']}) | {r['launches']} | {r['non_gemm_bytes'] / 1e9:.2f} "
            f"({r['cat_bytes'] / 1e9:.2f}) | {r['gemm_flop_floor_ms']:.1f} | {r['overhead_pct_of_baseline']:.2f}% | "
            f"{r['zero3_bottleneck_collectives_ms']:.1f} |")
    paper = result["constants"]["paper"]
    lines += ["", f"Paper (measured, {paper['source']}): {paper['baseline_s']} -> {paper['vittle_s']} s/iter, "
              f"+{(paper['vittle_s'] - paper['baseline_s']) * 1e3:.0f} ms per step for LLaVA-1.5-7B."]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    groups = list(dict.fromkeys((r["model"], r["gpu"]) for r in rows))
    fig, axes = plt.subplots(2, len(groups), figsize=(4.2 * len(groups), 8), squeeze=False)
    parts = list(rows[0]["parts_ms"])
    colors = ["#4c72b0", "#55a868", "#c44e52", "#dd8452", "#8172b2"]
    for column, (model, gpu) in enumerate(groups):
        mine = [r for r in rows if (r["model"], r["gpu"]) == (model, gpu)]
        # top: every variant beside the paper's measured overhead; bottom: zoom without (a)
        for ax, shown in ((axes[0][column], mine), (axes[1][column], mine[1:])):
            labels = [r["variant"].split(" ")[0] for r in shown]
            bottom = [0.0] * len(shown)
            for part, color in zip(parts, colors):
                values = [r["parts_ms"][part] for r in shown]
                ax.bar(labels, values, bottom=bottom, color=color, label=part)
                bottom = [b + v for b, v in zip(bottom, values)]
            ax.set_title(f"{model}, {gpu}" + ("" if shown is mine else " (zoom: b-d')"), fontsize=9)
        if (model, gpu) == ("LLaVA-1.5-7B", "A100-80GB"):
            paper = result["constants"]["paper"]
            extra = (paper["vittle_s"] - paper["baseline_s"]) * 1e3
            axes[0][column].axhline(extra, color="black", linestyle="--", linewidth=1)
            axes[0][column].text(len(mine) - 0.5, extra, f"paper: +{extra:.0f} ms (measured)", ha="right",
                                 va="bottom", fontsize=8)
    for row in axes:
        row[0].set_ylabel("predicted ms per step (one GPU)")
    axes[0][-1].legend(fontsize=7, loc="upper right")
    fig.suptitle("Vittle bottleneck per training step: where each predicted millisecond goes\n"
                 "(a) released, (b) device noise, (c) fused tail, (d)/(d') fused bottleneck "
                 "(stats recomputed / saved: vittle_fast's default)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3, help="host-noise timing repetitions (median)")
    parser.add_argument("--out", type=Path, default=None, help="write <out>.json, <out>.md and <out>.png")
    args = parser.parse_args(argv)
    result = run(args.reps)
    table = to_markdown(result, command_line("benchmarks.predict", argv))
    print(table)
    if args.out:
        write_results(args.out, result, table)
        plot(result, args.out.with_suffix(".png"))
    return result


if __name__ == "__main__":
    main()
