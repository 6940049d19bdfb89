"""``python -m vittle_fast.eval``: the evaluation command line (see the package docstring)."""
from __future__ import annotations

import argparse
import json

import torch

from .perturb import KINDS
from .runner import evaluate


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(prog="python -m vittle_fast.eval",
                                     description="Answer a LLaVA question file with an exported model; write "
                                                 "OUT_DIR/answers.jsonl and OUT_DIR/metrics.json (resumable).")
    parser.add_argument("--model", required=True, help="exported model directory (config.json, safetensors, tokenizer)")
    parser.add_argument("--questions", required=True, help="question JSONL (question_id/image/text) or LLaVA conversation JSON")
    parser.add_argument("--images", default=None, help="image folder the questions' paths are relative to")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--perturb", default=None, metavar="KIND:SEVERITY",
                        help=f"apply a shift on the fly; KIND one of {', '.join(sorted(KINDS))}; SEVERITY 1-5")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--limit", type=int, default=None, help="only the first N questions")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (temperature > 0)")
    parser.add_argument("--perturb_seed", type=int, default=0, help="perturbations are a function of (seed, question id)")
    parser.add_argument("--dump-hidden", "--dump_hidden", dest="dump_hidden", action="store_true",
                        help="also write OUT_DIR/hidden.pt: per question the prompt-mean bottleneck-layer h and posterior mean z")
    parser.add_argument("--hidden_layer", type=int, default=None,
                        help="decoder block whose output is h (default: the bottleneck's layer, else 3/4 depth)")
    parser.add_argument("--alpha", type=float, default=None, help="override the exported final training alpha")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model directory)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    metrics = evaluate(args.model, args.questions, args.images, args.out, perturb=args.perturb,
                       batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, limit=args.limit,
                       temperature=args.temperature, seed=args.seed, perturb_seed=args.perturb_seed,
                       dump_hidden=args.dump_hidden, hidden_layer=args.hidden_layer, alpha=args.alpha,
                       device=args.device, dtype=getattr(torch, args.dtype), tokenizer_dir=args.tokenizer,
                       progress=not args.no_progress)
    if metrics is not None:
        print(json.dumps(metrics, indent=1))
    return metrics


if __name__ == "__main__":
    main()
