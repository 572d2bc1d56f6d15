"""Peak memory and time of one training step: the chunked loss against full [batch, length, vocab] logits.

    flock /tmp/minicpm-heavy.lock .venv/bin/python bench/bench_loss.py [--batch 8] [--length 1024]

A small random-init Llama (hidden 256, 2 layers) with MiniCPM-1/2's vocabulary (122,753) and MiniCPM4's
(73,448), LoRA-style: only one projection trainable, lm_head frozen. Every position is trained (the worst
case for the chunked loss, which skips untrained positions). The reference is the model's own forward
with ``labels`` (full logits, then cross entropy), as the Trainer and OpenBMB's finetune.py compute it.
Each configuration runs in its own process (peak RSS from ``resource.getrusage``): one warm-up step, then
the fastest of ``--repeats`` timed steps. Needs about 16 GB for the full-logits case.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VOCABULARIES = {"MiniCPM-1/2": 122_753, "MiniCPM4": 73_448}
TARGET_MEMORY_RATIO = {122_753: 4.0, 73_448: 3.0}
IMPLS = ("full", "chunked")


def _model(vocab: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    for name, parameter in model.named_parameters():
        parameter.requires_grad = name == "model.layers.1.self_attn.q_proj.weight"
    return model


def _step(model, batch: dict, impl: str):
    from minicpm_train.loss import capture_head_input, causal_lm_loss

    if impl == "full":
        loss = model(**batch).loss
    else:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with capture_head_input(model) as captured:
            model(**inputs)
        loss = causal_lm_loss(captured.hidden, model.get_output_embeddings(), batch["labels"])
    loss.backward()
    return loss


def child(impl: str, vocab: int, batch_size: int, length: int, repeats: int, out: Path) -> None:
    """One configuration, in this process: writes loss, gradient, time and peak RSS to ``out``."""
    import torch

    model = _model(vocab)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch_size, length), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    trainable = next(p for p in model.parameters() if p.requires_grad)
    times = []
    for _ in range(1 + repeats):
        trainable.grad = None
        start = time.perf_counter()
        loss = _step(model, batch, impl)
        times.append(time.perf_counter() - start)
    peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    torch.save({"loss": loss.detach(), "grad": trainable.grad, "seconds": min(times[1:]), "peak": peak_bytes}, out)


def _measure(impl: str, vocab: int, options, folder: Path) -> dict:
    out = folder / f"{impl}_{vocab}.pt"
    subprocess.run([sys.executable, __file__, "--child", impl, "--vocab", str(vocab), "--batch", str(options.batch),
                    "--length", str(options.length), "--repeats", str(options.repeats), "--out", str(out)],
                   check=True, cwd=ROOT)
    import torch

    return torch.load(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per configuration (after a warm-up)")
    parser.add_argument("--child", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        child(options.child, options.vocab, options.batch, options.length, options.repeats, options.out)
        return

    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, vocab in VOCABULARIES.items():
            full, chunked = (_measure(impl, vocab, options, Path(folder)) for impl in IMPLS)
            loss_error = abs(chunked["loss"] - full["loss"]).item() / abs(full["loss"]).item()
            grad_error = ((chunked["grad"] - full["grad"]).abs().max() / full["grad"].abs().max()).item()
            memory_ratio = full["peak"] / chunked["peak"]
            time_ratio = chunked["seconds"] / full["seconds"]
            results[name] = {
                "vocab": vocab, "batch": options.batch, "length": options.length,
                "peak_rss_gb": {"full": round(full["peak"] / 1e9, 2), "chunked": round(chunked["peak"] / 1e9, 2)},
                "step_seconds": {"full": round(full["seconds"], 2), "chunked": round(chunked["seconds"], 2)},
                "memory_ratio": round(memory_ratio, 2), "time_ratio": round(time_ratio, 3),
                "loss_relative_error": loss_error, "grad_relative_error": grad_error,
                "targets_met": {"memory": memory_ratio >= TARGET_MEMORY_RATIO[vocab], "time": time_ratio <= 1.15,
                                "loss": loss_error <= 1e-6, "grad": grad_error <= 1e-5},
            }
            print(f"{name} (vocab {vocab:,}), batch {options.batch} x {options.length}: peak RSS "
                  f"{full['peak'] / 1e9:.2f} GB full vs {chunked['peak'] / 1e9:.2f} GB chunked "
                  f"({memory_ratio:.2f}x lower, target {TARGET_MEMORY_RATIO[vocab]:.0f}x); step "
                  f"{full['seconds']:.2f} s vs {chunked['seconds']:.2f} s ({time_ratio:.3f}x, target <= 1.15x); "
                  f"loss rel. error {loss_error:.1e}, grad rel. error {grad_error:.1e}", flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
