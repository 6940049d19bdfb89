"""Fine-tune a tiny random LlavaForConditionalGeneration with Vittle for 20 steps on the demo set, on CPU,
with ``transformers.Trainer`` + ``VittleTrainerCallback`` (alpha schedule, noise steps, KL in the loss and
the logs).

    .venv/bin/python examples/hf_trainer_llava.py [--out outputs/hf_trainer_example] [--steps 20]
"""
import argparse
import math

import transformers

from tiny_llava import demo_data, hf_batch, tiny_llava_with_vittle
from vittle_fast.integrations.transformers import VittleTrainerCallback
from vittle_fast.nn import VittleConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/hf_trainer_example")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()

    dataset, collator = demo_data(f"{args.out}/data")
    model = tiny_llava_with_vittle(dataset, VittleConfig(layer_v=2, layer_t=2, prior="learnable"))
    training_args = transformers.TrainingArguments(
        output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=8, learning_rate=3e-3,
        warmup_steps=2, logging_steps=2, save_strategy="no", report_to=[], use_cpu=True, seed=0,
        remove_unused_columns=False, disable_tqdm=True, dataloader_num_workers=0,
    )
    trainer = transformers.Trainer(model=model, args=training_args, train_dataset=dataset,
                                   data_collator=lambda items: hf_batch(collator(items)),
                                   callbacks=[VittleTrainerCallback()])
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    head, tail = sum(losses[:2]) / 2, sum(losses[-2:]) / 2
    print(f"loss (CE + KL): first logs {head:.3f} -> last logs {tail:.3f}")
    assert math.isfinite(tail) and tail < head, "the loss did not fall"


if __name__ == "__main__":
    main()
