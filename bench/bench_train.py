"""Supervised tokens per second: `minicpm-train run` against the reference padding-to-max approach.

    .venv/bin/python bench/bench_train.py [--samples 1024] [--batch 16]

Same tiny model (a random-init MiniCPM5-style Llama from fixtures/build_tiny_models.py), the same
OCNLI-shaped data (fixtures/train/build_task.py), model_max_length 1024, one epoch each, in this run.
The reference pads every sample to model_max_length, as OpenBMB's finetune.py does, with a random
sampler; `minicpm-train run` pads each batch to its longest sample and groups samples by length.
Both see the same rendered ids and labels, so their step-0 loss on the same batch must agree.
Supervised tokens are label tokens (labels != -100): the tokens the model learns from.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "fixtures"))
sys.path.insert(0, str(ROOT / "fixtures" / "train"))

MAX_LENGTH = 1024


def _reference_collator(pad_token_id: int):
    """OpenBMB finetune.py's batching: every sample padded to model_max_length."""
    from minicpm_train.data import PaddingCollator

    pad_to_longest = PaddingCollator(pad_token_id)

    def collate(features):
        padded = [{"input_ids": list(f["input_ids"]) + [pad_token_id] * (MAX_LENGTH - len(f["input_ids"])),
                   "labels": list(f["labels"]) + [-100] * (MAX_LENGTH - len(f["labels"]))} for f in features]
        batch = pad_to_longest(padded)
        for row, feature in enumerate(features):  # the padding is masked out of attention, as there
            batch["attention_mask"][row, len(feature["input_ids"]):] = 0
        return batch

    return collate


def _step0_losses(model_dir: Path, dataset, pad_token_id: int, batch: int) -> tuple[float, float]:
    import torch
    from transformers import AutoModelForCausalLM

    from minicpm_train.data import PaddingCollator

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    features = [dataset[i] for i in range(batch)]
    with torch.no_grad():
        ours = model(**PaddingCollator(pad_token_id)(features)).loss.item()
        reference = model(**_reference_collator(pad_token_id)(features)).loss.item()
    return ours, reference


def _reference_run(model_dir: Path, dataset, pad_token_id: int, out: Path, batch: int, steps: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM, PrinterCallback, Trainer, TrainingArguments

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=batch, max_steps=steps,
                             learning_rate=1e-3, save_strategy="no", report_to="none", use_cpu=True,
                             disable_tqdm=True, logging_strategy="no", remove_unused_columns=False, seed=42)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=_reference_collator(pad_token_id))
    trainer.remove_callback(PrinterCallback)
    return trainer.train().metrics["train_runtime"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1024)  # enough steps that start-up costs do not dominate
    parser.add_argument("--batch", type=int, default=16)
    options = parser.parse_args()

    import transformers
    from transformers import TrainerCallback

    from build_task import build
    from build_tiny_models import build_tiny_model
    from minicpm_data.tokenizer import load_tokenizer
    from minicpm_train.args import parse_run_args
    from minicpm_train.data import load_supervised
    from minicpm_train.launch import plan_run
    from minicpm_train.recipe import train

    transformers.logging.set_verbosity_error()
    steps = options.samples // options.batch  # one epoch: both runs see every sample once
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = build_tiny_model("llama-chatml", tmp / "model")
        build(tmp, raw_csv=tmp / "nli.csv", train=options.samples, dev=0)
        tokenizer = load_tokenizer(str(model_dir))
        dataset, summary = load_supervised(tmp / "train.json", tokenizer, max_length=MAX_LENGTH, cache_dir=tmp / "cache")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

        ours_loss, reference_loss = _step0_losses(model_dir, dataset, pad, options.batch)
        reference_seconds = _reference_run(model_dir, dataset, pad, tmp / "reference", options.batch, steps)
        run, _ = plan_run(parse_run_args([
            "--model_name_or_path", str(model_dir), "--output_dir", str(tmp / "ours"),
            "--train_data_path", str(tmp / "train.json"), "--model_max_length", str(MAX_LENGTH),
            "--per_device_train_batch_size", str(options.batch), "--max_steps", str(steps),
            "--learning_rate", "1e-3", "--save_strategy", "no", "--logging_strategy", "no", "--seed", "42",
            "--data_cache_dir", str(tmp / "cache"), "--disable_tqdm", "true"]))
        ours_seconds = train(run, callbacks=(TrainerCallback(),)).metrics["train_runtime"]  # no printed logs

    supervised = summary.trained_tokens
    padded_share = 1 - summary.tokens / (summary.used * MAX_LENGTH)
    print(f"bench_train: tiny Llama (hidden 64, 2 layers, vocab {len(tokenizer)}), {summary.used} OCNLI-shaped samples "
          f"({summary.tokens} tokens, {supervised} supervised), model_max_length {MAX_LENGTH}, "
          f"batch {options.batch}, {steps} steps, CPU")
    print(f"step-0 loss, same batch: minicpm-train {ours_loss:.6f} | reference {reference_loss:.6f} "
          f"(difference {abs(ours_loss - reference_loss):.1e})")
    print(f"reference (every sample padded to {MAX_LENGTH}, {padded_share:.0%} padding): "
          f"{supervised / reference_seconds:,.0f} supervised tokens/s ({reference_seconds:.2f} s)")
    print(f"minicpm-train run (pad to batch longest, length-grouped): "
          f"{supervised / ours_seconds:,.0f} supervised tokens/s ({ours_seconds:.2f} s)")
    print(f"speed-up: {reference_seconds / ours_seconds:.1f}x (target: at least 8x)")


if __name__ == "__main__":
    main()
