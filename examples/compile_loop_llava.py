"""The same tiny LLaVA + Vittle fine-tune as a plain PyTorch loop around ``torch.compile(model)``: the
bookkeeping the Trainer callback does, written out (alpha schedule, ``vittle_step``, ``vittle_loss``).

    .venv/bin/python examples/compile_loop_llava.py [--out outputs/compile_loop_example] [--steps 20]
"""
import argparse
import math
import time

import torch
import transformers

from tiny_llava import demo_data, hf_batch, tiny_llava_with_vittle
from vittle_fast.integrations.transformers import vittle_loss, vittle_step
from vittle_fast.nn import VittleConfig
from vittle_fast.train.schedules import vittle_alpha


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/compile_loop_example")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (inductor, aot_eager, ...)")
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()

    dataset, collator = demo_data(f"{args.out}/data")
    model = tiny_llava_with_vittle(dataset, VittleConfig(layer_v=2, layer_t=2)).train()
    compiled = torch.compile(model, backend=args.backend)  # hooks stay eager: no recompiles as alpha moves
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, shuffle=True, collate_fn=collator,
                                         generator=torch.Generator().manual_seed(0))
    batches = iter(loader)
    losses = []
    start = time.perf_counter()
    for step in range(args.steps):
        alpha = vittle_alpha(step, args.steps)  # paper's cosine ramp 0 -> 0.5
        vittle_step(model, step, alpha)  # this step's noise stream and alpha
        out = compiled(**hf_batch(next(batches)), use_cache=False)
        loss = out.loss + vittle_loss(model)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        kl = model.vittle_state.hook.kl
        print(f"step {step + 1:2d}  loss {losses[-1]:.3f}  ce {out.loss.item():.3f}  kl_v {kl['visual'].item():.4f}  "
              f"kl_t {kl['text'].item():.4f}  alpha {alpha:.3f}  ({time.perf_counter() - start:.0f} s)", flush=True)
    head, tail = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    print(f"loss (CE + KL): first steps {head:.3f} -> last steps {tail:.3f}")
    assert math.isfinite(tail) and tail < head, "the loss did not fall"


if __name__ == "__main__":
    main()
