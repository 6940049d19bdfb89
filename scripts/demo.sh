#!/usr/bin/env bash
# The main job: train a tiny LLaVA + Vittle (F) on the synthetic demo set with 2 CPU processes
# (gloo), then say where the checkpoint, metrics, plot and exported model went.
# Assumes the package is installed (see the README's setup step). Extra arguments are passed to
# the trainer, e.g.:  bash scripts/demo.sh --max_steps 50   or   bash scripts/demo.sh vittle.enabled=false
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
NPROC="${NPROC:-2}"
OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" \
    -m vittle_fast.train --config configs/demo.yaml "$@"
