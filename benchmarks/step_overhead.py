"""Per-step cost of Vittle over plain LLaVA training, on CPU, three modes in one run.

    baseline   LLaVA, no bottleneck
    released   Vittle as the released code (vittle_llama.py) computes it, op for op: after decoder
               layer l, per modality, the MLP on a positional slice of the hidden state, the
               log-variance clamped in place through ``.data.clamp_`` (straight-through), noise drawn
               by ``torch.randn`` on the host and copied to the device, ``.mean(0)`` over one sample,
               interpolation, ``torch.cat`` of the whole sequence; after the forward, the KLs with
               boolean-mask indexing of the text tokens and the ``kl > 10000`` check (host syncs)
    fused      Vittle with vittle_fast's bottleneck (exact modality rows, one fused op per
               modality: in-op Philox noise, interpolation and KL, no host sync)

Every mode trains the same tiny model (same init, same batch, the same MLP rows: the released split
puts the system prompt and all image tokens but the last in its "visual" MLP, ours only the image rows,
and both MLPs together see every token) with AdamW. Steps are run in rounds, one step of every mode per round, the order rotating
each round, so machine noise hits all modes alike. The overhead of a mode is the median over rounds of
its step time divided by the baseline's step time *of the same round* (paired ratios cancel slow drifts
of a shared machine); the spread is the interquartile range of those ratios. The bottleneck's share of
the FLOPs (torch.utils.flop_counter) is printed as the floor any implementation pays.

    python -m benchmarks.step_overhead [--steps 60] [--hidden 256] [--json out.json]

On a CPU the "released" costs that matter most on a GPU (the host->device copy of the noise, the
host syncs that stop the host from running ahead of the device) are nearly free, so the CPU ratios
understate the GPU gap; ``python -m benchmarks.predict`` models them (docs/performance.md).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.results_io import write_json
from vittle_fast.models import LlavaVittle
from vittle_fast.nn import VittleConfig
from vittle_fast.ops.backends import resolve_backend

IMAGE_TOKEN_ID = 3


class Host:
    """What the released code does on the host. ``noise``: ``torch.randn`` on the CPU (one thread
    under the usual launchers), then ``.cuda()`` (a host->device copy from pageable memory; here
    ``.to(device, copy=True)``, so a CPU "device" pays the memcpy too). ``exceeds``: ``if kl > 10000``
    reads a device value on the host (a sync)."""

    def noise(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.randn(shape, dtype=dtype).to(device, copy=True)

    def exceeds(self, value: torch.Tensor, limit: float) -> bool:
        return bool(value > limit)


def released_bottleneck(h: torch.Tensor, mlp: nn.Module, rows: slice, alpha: float, host: Host):
    """One modality of the released bottleneck (vittle_llama.py, training branch), op for op:
    MLP on the positional slice, chunk, ``.data.clamp_`` (in place, outside autograd: the gradient
    passes straight through), std, noise (n_samples = 1 drawn on the host, copied, ``.mean(0)``),
    interpolation, and ``torch.cat`` of the whole sequence. Returns (new h, mu, logvar)."""
    part = h[:, rows]
    mu, logvar = torch.chunk(mlp(part), 2, dim=2)
    logvar.data.clamp_(min=-2.3025, max=2.3025)
    std = (logvar / 2).exp()
    eps = host.noise((1, *mu.shape), h.dtype, h.device).mean(0)
    mixed = (1.0 - alpha) * part + alpha * (mu + std * eps)
    if rows.start in (0, None):
        return torch.cat((mixed, h[:, rows.stop:]), dim=1), mu, logvar
    return torch.cat((h[:, :rows.start], mixed), dim=1), mu, logvar


def released_kl(mu: torch.Tensor, logvar: torch.Tensor, mask: torch.Tensor | None, host: Host) -> torch.Tensor:
    """The released ``vib_kld_loss`` (fixed prior): boolean-mask indexing of the selected tokens (a
    nonzero, i.e. a host sync, on a GPU), the halved-log-variance KL mean, the explosion check."""
    if mask is not None:
        mu, logvar = mu[mask.bool()], logvar[mask.bool()]
    kl = -0.5 * (1 + logvar / 2 - mu.pow(2) - logvar.exp()).mean()
    if host.exceeds(kl, 10000):
        return torch.clamp(kl, max=10000.0)
    return kl


class ReleasedVittleLayer(nn.Module):
    """Decoder layer l followed by the released code's bottleneck: visual then text, each on its
    positional slice (the first ``num_visual_positions`` positions are "visual"; in the released code
    that is sequence length - text length = image tokens - 1, so the system prompt counts as visual
    and the last image token as text). The KLs are computed after the forward (``kl_loss``), as the
    released code does after the LM head."""

    def __init__(self, layer: nn.Module, hidden_size: int, num_visual_positions: int, beta: float = 0.1):
        super().__init__()
        self.layer = layer
        self.mlp_v, self.mlp_t = (
            nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, 2 * hidden_size))
            for _ in range(2)
        )
        self.num_visual_positions = num_visual_positions
        self.beta = beta
        self.alpha = 0.0
        self.host = Host()
        self.stats = None

    def forward(self, x, *args, **kwargs):
        h = self.layer(x, *args, **kwargs)
        split = self.num_visual_positions
        h, mu_v, logvar_v = released_bottleneck(h, self.mlp_v, slice(0, split), self.alpha, self.host)
        h, mu_t, logvar_t = released_bottleneck(h, self.mlp_t, slice(split, h.shape[1]), self.alpha, self.host)
        self.stats = (mu_v, logvar_v, mu_t, logvar_t)
        return h

    def kl_loss(self, labels: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """beta * (KL_v + KL_t); the text KL over the prompt tokens of the text slice
        (``(labels == IGNORE_INDEX) & attention_mask``), as the released trainer selects them."""
        mu_v, logvar_v, mu_t, logvar_t = self.stats
        response_masking = ((labels == -100) & attention_mask.bool()).int()[:, self.num_visual_positions:]
        kl_v = released_kl(mu_v, logvar_v, None, self.host)
        kl_t = released_kl(mu_t, logvar_t, response_masking, self.host)
        return self.beta * kl_v + self.beta * kl_t


def build(mode: str, args) -> LlavaVittle:
    torch.manual_seed(0)
    text = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                                    intermediate_size=args.hidden * 8 // 3, num_hidden_layers=args.layers,
                                    num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64,
                                    tie_word_embeddings=False)
    vision = transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=args.image_size, patch_size=8)
    layer = args.layers * 3 // 4 - 1
    vittle = VittleConfig(layer_v=layer, layer_t=layer, backend=args.backend) if mode == "fused" else None
    model = LlavaVittle(text, vision, IMAGE_TOKEN_ID, vittle=vittle)
    model.validate_inputs = False
    if mode == "released":
        model.language_model.layers[layer] = ReleasedVittleLayer(model.language_model.layers[layer], args.hidden,
                                                                 model.num_image_tokens - 1)
    return model


def make_batch(args, num_image_tokens: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    b, prefix, text = args.batch, args.prefix, args.text
    input_ids = torch.cat([
        torch.randint(4, args.vocab, (b, prefix), generator=g),
        torch.full((b, num_image_tokens), IMAGE_TOKEN_ID),
        torch.randint(4, args.vocab, (b, text), generator=g),
    ], dim=1)
    labels = input_ids.clone()
    labels[:, : prefix + num_image_tokens + text // 2] = -100  # the answer is the second half of the text
    return {"input_ids": input_ids, "labels": labels, "attention_mask": torch.ones_like(input_ids, dtype=torch.bool),
            "pixel_values": torch.randn(b, 3, args.image_size, args.image_size, generator=g)}


def loss_of(mode: str, model: LlavaVittle, batch, alpha: float) -> torch.Tensor:
    released = next((m for m in model.language_model.layers if isinstance(m, ReleasedVittleLayer)), None)
    if released is not None:
        released.alpha = alpha
    out = model(**batch, vittle_alpha=alpha, noise_seed=1234)
    loss = out.ce_sum / out.n_targets
    if mode == "fused":
        loss = loss + out.vittle_loss
    elif mode == "released":
        loss = loss + released.kl_loss(batch["labels"], batch["attention_mask"])
    return loss


def step_flops(mode: str, model, batch) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        loss_of(mode, model, batch, 0.5).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile)."""
    low, mid, high = statistics.quantiles(values, n=4)
    return low, mid, high


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="timed rounds (one step per mode each)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prefix", type=int, default=16, help="system-prompt tokens before the image")
    parser.add_argument("--text", type=int, default=96, help="text tokens after the image")
    parser.add_argument("--image_size", type=int, default=64, help="image side; patch 8 -> (side/8)^2 tokens")
    parser.add_argument("--backend", default="auto", help="vib_sample_kl backend of the fused mode")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 = steadiest timing)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    modes = ("baseline", "released", "fused")
    models = {mode: build(mode, args) for mode in modes}
    batch = make_batch(args, models["baseline"].num_image_tokens)
    optimizers = {mode: torch.optim.AdamW(m.parameters(), lr=1e-4, foreach=True) for mode, m in models.items()}
    flops = {mode: step_flops(mode, models[mode], batch) for mode in modes}

    times = {mode: [] for mode in modes}
    for step in range(args.warmup + args.steps):
        alpha = 0.5 * step / (args.warmup + args.steps)
        shift = step % len(modes)
        for mode in modes[shift:] + modes[:shift]:  # rotated: no mode always runs first or last
            start = time.perf_counter()
            loss_of(mode, models[mode], batch, alpha).backward()
            optimizers[mode].step()
            optimizers[mode].zero_grad(set_to_none=True)
            if step >= args.warmup:
                times[mode].append(time.perf_counter() - start)

    overhead = {mode: quartiles([t / b - 1 for t, b in zip(times[mode], times["baseline"])])
                for mode in modes[1:]}
    result = {
        "config": vars(args),
        "tokens_per_step": int(batch["input_ids"].numel()),
        "step_s_quartiles": {mode: quartiles(t) for mode, t in times.items()},
        "overhead_vs_baseline_quartiles": overhead,
        "fused_vs_released_quartiles": quartiles([f / r - 1 for f, r in zip(times["fused"], times["released"])]),
        "flop_overhead_vs_baseline": {mode: flops[mode] / flops["baseline"] - 1 for mode in modes[1:]},
        "torch_threads": torch.get_num_threads(),
        "fused_backend": resolve_backend(args.backend, "cpu"),
    }
    print(f"tokens/step {result['tokens_per_step']}, {args.steps} rounds (one step per mode each), "
          f"{torch.get_num_threads()} threads, fused backend {result['fused_backend']!r}; "
          "median [interquartile range]")
    for mode in modes:
        low, mid, high = result["step_s_quartiles"][mode]
        line = f"  {mode:9s} step {mid * 1e3:6.1f} ms [{low * 1e3:6.1f}, {high * 1e3:6.1f}]"
        if mode != "baseline":
            low, mid, high = overhead[mode]
            line += (f"   overhead vs baseline {mid:+6.1%} [{low:+6.1%}, {high:+6.1%}]"
                     f"   (FLOP floor {result['flop_overhead_vs_baseline'][mode]:+.1%})")
        print(line)
    low, mid, high = result["fused_vs_released_quartiles"]
    print(f"  fused step / released step - 1 (paired per round): {mid:+.1%} [{low:+.1%}, {high:+.1%}]")
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
