#!/usr/bin/env bash
# The main job: train a tiny LLaVA + Vittle (F) on the synthetic demo set (made on first use) with
# 2 CPU processes (FSDP2 over gloo). The first launch stops at step 100, as a time-limited job slot
# would; the second resumes from that checkpoint, finishes, exports and plots, and prints where the
# checkpoint, metrics, plot and exported model went. Assumes the package is installed (README setup).
# Extra arguments go to both launches:  bash scripts/demo.sh vittle.enabled=false --output_dir outputs/base
# Start over with: rm -rf outputs/demo
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
NPROC="${NPROC:-2}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
launch() {
    "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" \
        -m vittle_fast.train --config configs/demo.yaml "$@"
}
launch stop_at_step=100 "$@"
echo "[demo] relaunching: the run resumes from its latest checkpoint (a finished run says so and does nothing)"
launch "$@"
