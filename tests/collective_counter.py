"""Run the trainer under torchrun and count FSDP2's collectives per optimizer step (not a test
module: test_train_collectives.py launches it). Usage: collective_counter.py OUT.json TRAINER_ARGS...

FSDP2 issues its gradient reduce-scatters through ``dist.reduce_scatter_single`` and its parameter
all-gathers through ``dist.all_gather_single``, looked up on the module at call time, so wrapping
those two functions counts them. Counts are taken around ``train_step`` only (checkpointing and the
metrics reductions are not part of a step).
"""
import json
import sys

import torch.distributed as dist

import vittle_fast.train.trainer as trainer

COUNTS = {"reduce_scatter": 0, "all_gather": 0}
PER_STEP: list[dict[str, int]] = []


def counting(name, function):
    def wrapper(*args, **kwargs):
        COUNTS[name] += 1
        return function(*args, **kwargs)
    return wrapper


dist.reduce_scatter_single = counting("reduce_scatter", dist.reduce_scatter_single)
dist.all_gather_single = counting("all_gather", dist.all_gather_single)
train_step = trainer.train_step


def counted_train_step(*args, **kwargs):
    before = dict(COUNTS)
    train_step(*args, **kwargs)
    PER_STEP.append({name: COUNTS[name] - before[name] for name in COUNTS})
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(PER_STEP, f)


trainer.train_step = counted_train_step
trainer.main(sys.argv[2:])
