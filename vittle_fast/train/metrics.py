"""Metrics that cost nothing between logging steps.

The train step adds its numbers into one device tensor (`StepAccumulator`); only at a logging step
is it all-reduced and read, once. Sinks: JSONL (always), TensorBoard (if installed), a tqdm bar on
rank 0, GPU telemetry through nvidia-ml-py (if a GPU and the library exist), a PNG plot at the end.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from vittle_fast.data import SKIP_KINDS

# Dense bf16 tensor-core peak per GPU, FLOP/s (vendor datasheets, SXM parts, no sparsity).
# MFU is reported only for these; on CPU (and unknown GPUs) it is null.
PEAK_FLOPS_BF16 = {"A100": 312e12, "H100": 989e12, "H200": 989e12}

# Accumulated per optimizer step; summed over ranks at log time. Per-rank means (kl, grad norm)
# are divided by the world size after the reduction.
# `skipped_<kind>`: bad records per kind (vittle_fast.data.SKIP_KINDS), contiguous, added as one vector.
SKIP_FIELDS = tuple(f"skipped_{kind}" for kind in SKIP_KINDS)
_FIELDS = ("loss", "ce", "kl_v", "kl_t", "grad_norm", "tokens", "flops", "data_wait_s", "skipped_records",
           "skipped_steps", "empty_steps", "steps", *SKIP_FIELDS)
_RANK_MEANS = ("kl_v", "kl_t", "grad_norm", "data_wait_s")


class StepAccumulator:
    """Sums of per-step metrics on the training device, reset at every log."""

    def __init__(self, device: torch.device):
        self.values = torch.zeros(len(_FIELDS), dtype=torch.float64, device=device)
        self._index = {name: i for i, name in enumerate(_FIELDS)}

    def add(self, **values: torch.Tensor | float) -> None:
        for name, value in values.items():
            self.values[self._index[name]] += value

    def add_skips(self, counts: torch.Tensor) -> None:
        """Add a batch's `n_skipped` (per kind, `SKIP_KINDS` order) in one device op."""
        start = self._index[SKIP_FIELDS[0]]
        self.values[start:start + len(SKIP_FIELDS)] += counts

    def reduce_and_reset(self, world_size: int) -> dict[str, float]:
        """Collective: one all-reduce and one host read for the whole logging window."""
        totals = self.values.clone()
        dist.all_reduce(totals)
        self.values.zero_()
        out = dict(zip(_FIELDS, totals.tolist()))
        steps = max(out["steps"], 1.0)
        for name in ("loss", "ce", "kl_v", "kl_t", "grad_norm", "data_wait_s"):
            out[name] /= steps
        for name in _RANK_MEANS:
            out[name] /= world_size
        return out


def gpu_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS_BF16.items() if key in name), None)


def _linear_weights(module: torch.nn.Module | None) -> int:
    """Multiply-adds per row of every nn.Linear weight in ``module`` (biases are not matmuls)."""
    if module is None:
        return 0
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, torch.nn.Linear))


def _passes(trains: bool, needs_input_grad: bool = True) -> int:
    """Matmul passes of a weight per step: forward, + input gradient, + weight gradient."""
    return 1 + int(needs_input_grad) + int(trains)


class TrainingFlops:
    """Matmul FLOPs (2 per multiply-add) one micro-batch of ``LlavaVittle`` really costs.

    - A weight matmul over n rows costs 2·n·weights per pass: forward, the input gradient when the
      gradient flows through it, the weight gradient when it trains (6·N for stage-2 blocks, 4·N for
      a frozen decoder in stage 1, whose gradient still flows to the projector).
    - Decoder blocks run on the non-padding tokens; causal attention costs 4·d_attn per (query, key)
      pair forward (scores + values) and 2x that backward; a token at position p of its (packed)
      sequence has p + 1 keys, so the pairs are Σ (position_id + 1) over non-padding tokens.
    - LM head: the target tokens with the fused loss, else every token.
    - Projector: the image tokens (its first layer needs no input gradient: the tower is frozen).
    - Vision tower (frozen, under no_grad): forward only — the patch embedding and the blocks up to
      the feature layer over 1 + P tokens per image, bidirectional attention 4·d·(1 + P)² per block.
    - Bottleneck: each token through its modality's MLP, trained (6x).
    Elementwise work (norms, activations, softmax, the fused op) is not counted.
    """

    def __init__(self, model: torch.nn.Module):
        lm, tower = model.language_model, model.vision_tower
        text, vision = lm.config, tower.config
        trains = any(p.requires_grad for p in lm.layers.parameters())
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.block = 2 * _passes(trains) * _linear_weights(lm.layers)
        self.attention = 3 * 4 * text.num_attention_heads * head_dim * len(lm.layers)
        self.head = 2 * _passes(lm.lm_head.weight.requires_grad) * _linear_weights(lm.lm_head)
        self.fused_head = model.fused_cross_entropy
        proj = model.projector
        self.projector = 2 * (_passes(True, needs_input_grad=False) * _linear_weights(proj.linear_1)
                              + _passes(True) * _linear_weights(proj.linear_2))
        self.patches = tower.num_patches
        seq = 1 + self.patches
        blocks_run = tower.encoder.layers[: model.vision_feature_layer % (len(tower.encoder.layers) + 1)]
        patch_embed = vision.num_channels * vision.patch_size**2 * vision.hidden_size
        self.image = 2 * (patch_embed * self.patches + _linear_weights(blocks_run) * seq
                          + len(blocks_run) * 2 * vision.hidden_size * seq**2)
        bottleneck = model.bottleneck
        self.bottleneck_v = 0 if bottleneck is None else 2 * _passes(True) * _linear_weights(bottleneck.mlp_v)
        self.bottleneck_t = 0 if bottleneck is None else 2 * _passes(True) * _linear_weights(bottleneck.mlp_t)

    def micro_batch(self, batch: dict[str, torch.Tensor], n_targets: torch.Tensor) -> torch.Tensor:
        """FLOPs of one micro-batch as a float64 device tensor (no host sync)."""
        valid = batch["attention_mask"].to(torch.float64)
        tokens = valid.sum()
        pairs = ((batch["position_ids"] + 1) * valid).sum()
        images = batch["pixel_values"].shape[0]
        visual = images * self.patches
        head_rows = n_targets.to(torch.float64) if self.fused_head else tokens
        return (self.block * tokens + self.attention * pairs + self.head * head_rows
                + (self.projector + self.bottleneck_v) * visual + self.image * images
                + self.bottleneck_t * (tokens - visual))


class StepProfiler:
    """``torch.profiler`` around optimizer steps a..b (1-based, inclusive) of ``logging.profile_steps``.

    Each rank writes ``OUTPUT_DIR/profile/rank{r}.steps{a}-{b}.pt.trace.json``: a Chrome trace that
    Perfetto (ui.perfetto.dev) opens, and that TensorBoard's profiler plugin lists with
    ``--logdir OUTPUT_DIR/profile``. Each step is one ``train_step#N`` range.
    """

    def __init__(self, steps: tuple[int, int] | None, output_dir: Path, rank: int, device: torch.device):
        self.steps, self.rank = steps, rank
        self.path = None if steps is None else output_dir / "profile" / f"rank{rank}.steps{steps[0]}-{steps[1]}.pt.trace.json"
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._activities = activities
        self._profiler = None
        self._mark = None

    def step_begins(self, step: int) -> None:
        if self.steps is not None and step == self.steps[0]:
            self._profiler = torch.profiler.profile(activities=self._activities)
            self._profiler.start()
        if self._profiler is not None:
            self._mark = torch.profiler.record_function(f"train_step#{step}")
            self._mark.__enter__()

    def step_ends(self, step: int) -> None:
        if self._profiler is None:
            return
        self._mark.__exit__(None, None, None)
        if step >= self.steps[1]:
            self.finish()

    def finish(self) -> None:
        """Write the trace (also when the run stops before step b)."""
        if self._profiler is None:
            return
        self._profiler.stop()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._profiler.export_chrome_trace(str(self.path))
        self._profiler = None


class GpuTelemetry:
    """Utilisation, memory and power of this rank's GPU via nvidia-ml-py; silent no-op without it."""

    def __init__(self, device: torch.device):
        self._handle = None
        if device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
            self._nvml = pynvml
        except Exception:  # ImportError, NVMLError_LibraryNotFound, driver mismatch: no telemetry
            self._handle = None

    def close(self) -> None:
        if self._handle is not None:
            self._handle = None
            self._nvml.nvmlShutdown()

    def read(self) -> dict[str, float]:
        if self._handle is None:
            return {}
        nvml = self._nvml
        util = nvml.nvmlDeviceGetUtilizationRates(self._handle)
        mem = nvml.nvmlDeviceGetMemoryInfo(self._handle)
        return {
            "gpu_util_pct": float(util.gpu),
            "gpu_mem_used_gb": mem.used / 1e9,
            "gpu_power_w": nvml.nvmlDeviceGetPowerUsage(self._handle) / 1000.0,
        }


class MetricsLogger:
    """Writes one record per logging step; only rank 0 writes, every rank takes part in reducing."""

    def __init__(self, output_dir: Path, is_main: bool, total_steps: int, start_step: int,
                 progress_bar: bool, tensorboard: bool):
        self.is_main = is_main
        self.path = output_dir / "metrics.jsonl"
        self._bar = None
        self._tb = None
        if not is_main:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        truncate_metrics(self.path, start_step)
        self._file = open(self.path, "a")
        if progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step drops the events of steps a resumed run replays
                self._tb = SummaryWriter(str(output_dir / "tensorboard"), purge_step=start_step + 1)
            except ImportError:
                self._tb = None

    def log(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        step = record["step"]
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(f"train/{key}", value, step)
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix(loss=f"{record['loss']:.3f}", kl_v=f"{record['kl_v']:.3f}",
                                  kl_t=f"{record['kl_t']:.3f}", refresh=False)
            self._bar.refresh()

    def close(self) -> None:
        """Idempotent: the loop closes it, and the trainer's shutdown again on every exit path."""
        if not self.is_main:
            return
        self._file.close()
        if self._bar is not None:
            self._bar.close()
            monitor = type(self._bar).monitor  # tqdm's class-wide monitor thread outlives close()
            if monitor is not None:
                type(self._bar).monitor = None
                monitor.exit()  # joins it
        if self._tb is not None:
            self._tb.close()  # joins its event-writer thread


class Throughput:
    """Wall-clock window between logging steps (read only at log steps, after the reduction)."""

    def __init__(self):
        self._start = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        elapsed, self._start = now - self._start, now
        return max(elapsed, 1e-9)


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the records after ``step`` (a resumed run replays those steps and logs them again)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    if len(kept) != len(lines):
        path.write_text("".join(kept))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl, the last one per step (a resumed run re-logs its steps)."""
    by_step: dict[int, dict[str, Any]] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_step[record["step"]] = record
    return [by_step[step] for step in sorted(by_step)]


def plot_metrics(path: Path, out_png: Path) -> Path:
    """Loss / CE and the two KL terms against the step, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(path)
    steps = [r["step"] for r in records]
    fig, (ax_loss, ax_kl) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(steps, [r["loss"] for r in records], label="loss")
    ax_loss.plot(steps, [r["ce"] for r in records], label="CE")
    validated = [r for r in records if r.get("val_loss") is not None]
    if validated:  # eval.every: validation loss beside the training CE, accuracy on its own axis
        ax_loss.plot([r["step"] for r in validated], [r["val_loss"] for r in validated], "o-", label="val loss")
        ax_accuracy = ax_loss.twinx()
        ax_accuracy.plot([r["step"] for r in validated], [r["val_accuracy"] for r in validated], "s--",
                         color="tab:green", label="val accuracy")
        ax_accuracy.set_ylim(0, 1)
        ax_accuracy.set_ylabel("val accuracy")
        ax_accuracy.legend(loc="center right")
    ax_loss.set_xlabel("step")
    ax_loss.legend()
    ax_kl.plot(steps, [r["kl_v"] for r in records], label="KL visual")
    ax_kl.plot(steps, [r["kl_t"] for r in records], label="KL text")
    if all(r["kl_v"] > 0 and r["kl_t"] > 0 for r in records):  # KL spans decades; the baseline logs zeros
        ax_kl.set_yscale("log")
    ax_kl.set_xlabel("step")
    ax_kl.set_ylabel("KL (mean per token and dim)")
    ax_alpha = ax_kl.twinx()
    ax_alpha.plot(steps, [r["alpha"] for r in records], label="alpha", linestyle="--", color="gray")
    ax_alpha.set_ylabel("alpha")
    ax_kl.legend(loc="upper center")
    ax_alpha.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
