"""One DPO step against TRL's DPOTrainer, and data start-up at 100,000 pairs against TRL's preprocessing.

    flock /tmp/minicpm-heavy.lock .venv/bin/python bench/bench_dpo.py [--pairs 8] [--length 512] [--data-pairs 100000]

Step: a small random-init Llama (hidden 256, 2 layers) with MiniCPM-1/2's vocabulary (122,753), LoRA (r 64 on
q_proj and v_proj, as the guide; dropout off, as both trainers run DPO), float32 on CPU. A batch of ``--pairs``
pairs, every side ``--length`` tokens: a prompt of half the length, answers of the other half. Each side's
reference is the same model with the adapter disabled. Ours: ``minicpm_train.preference`` (log-probabilities
chunk by chunk through lm_head, both sides in one forward); TRL: ``DPOTrainer.compute_loss`` (its fused LM head)
on the same ids. Each implementation runs in its own process: one warm-up step, then the fastest of
``--repeats`` (forward, loss, backward); the peak RSS of the steps alone (VmHWM, reset before them through
/proc/self/clear_refs) and the losses, which must agree.

Data start-up: ``--data-pairs`` preference pairs (the task's prompts and labels; ``../shared``'s
alpaca_en_demo answers when present) in one JSONL file, from the file to training-ready ids: ours is
``load_data(kind="pairs")``, what ``minicpm-train run --stage dpo`` calls, into an empty cache (validation,
render_pairs, the memory-mapped cache); TRL's is ``datasets.load_dataset("json")`` then
``DPOTrainer._prepare_dataset`` (prompt extraction, chat template, tokenization), one process each, the same
tokenizer (MiniCPM-2B's real one from ``../shared`` when present, else the fixture's). Each clock starts after
the imports and the tokenizer's loading; wall and CPU seconds (all threads and child processes) and the rows
each side produced are reported.
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
sys.path.insert(0, str(ROOT / "fixtures"))
VOCAB = 122_753
SHARED = ROOT.parent / "shared"
MINICPM2B_TOKENIZER = SHARED / "tokenizers" / "minicpm2b"
TARGETS = {"memory": 1.0, "time": 1.1, "startup": 2.0}


LORA = dict(r=64, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
            init_lora_weights=False)  # B != 0: the policy differs from its reference


def _base_model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def _peft_model():
    """The base with its LoRA adapter, every weight drawn from fixed seeds."""
    import torch
    from peft import LoraConfig, get_peft_model

    model = _base_model()
    torch.manual_seed(1)
    return get_peft_model(model, LoraConfig(**LORA))


def _ids(pairs: int, length: int) -> list[dict]:
    import torch

    generator = torch.Generator().manual_seed(1)
    half = length // 2
    rows = []
    for _ in range(pairs):
        prompt, chosen, rejected = (torch.randint(3, VOCAB, (n,), generator=generator).tolist()
                                    for n in (half, length - half, length - half))
        rows.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
    return rows


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _peak_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def step_child(impl: str, pairs: int, length: int, repeats: int, out: Path) -> None:
    import torch

    rows = _ids(pairs, length)
    if impl == "ours":
        model = _peft_model()
        from minicpm_train.preference import PreferenceCollator, PreferenceSettings, dpo_loss, log_probs

        batch = PreferenceCollator(0)([{"chosen_input_ids": r["prompt_ids"] + r["chosen_ids"],
                                        "chosen_labels": [-100] * len(r["prompt_ids"]) + r["chosen_ids"],
                                        "rejected_input_ids": r["prompt_ids"] + r["rejected_ids"],
                                        "rejected_labels": [-100] * len(r["prompt_ids"]) + r["rejected_ids"]}
                                       for r in rows])
        settings = PreferenceSettings("dpo")

        def step():
            with torch.no_grad(), model.disable_adapter():
                reference = log_probs(model, batch).logps
            policy = log_probs(model, batch)
            loss, _ = dpo_loss(policy, reference, settings)
            policy.with_head_gradients(loss).backward()
            return loss
    else:
        from datasets import Dataset
        from trl import DPOConfig, DPOTrainer

        from minicpm_data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(str(ROOT / "fixtures" / "tokenizers" / "chatml"))  # TRL wants one; the ids are ours
        from peft import LoraConfig

        config = DPOConfig(output_dir=str(out.parent / "trl"), bf16=False, use_cpu=True, gradient_checkpointing=False,
                           max_length=None, report_to="none", per_device_train_batch_size=pairs)
        placeholder = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])
        # TRL wraps the model with the adapter itself (after adding its fused LM head); the adapter's weights
        # are then set to ours, so both start from the same policy.
        trainer = DPOTrainer(model=_base_model(), args=config, train_dataset=placeholder, processing_class=tokenizer,
                             peft_config=LoraConfig(**LORA))
        model = trainer.model
        adapter = {k: v for k, v in _peft_model().state_dict().items() if "lora_" in k}
        missing = set(adapter) - set(model.state_dict())
        assert not missing, sorted(missing)[:3]
        model.load_state_dict(adapter, strict=False)
        del adapter
        batch = trainer.data_collator(rows)

        def step():
            loss = trainer.compute_loss(model, batch)
            loss.backward()
            return loss
    times, peaks = [], []
    for _ in range(1 + repeats):
        model.zero_grad(set_to_none=True)
        _reset_peak()
        start = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - start)
        peaks.append(_peak_bytes())
    out.write_text(json.dumps({"loss": loss.item(), "seconds": min(times[1:]), "peak": max(peaks[1:])}))


def _pairs_file(path: Path, count: int) -> str:
    """``count`` pairs in the target format at ``path``, and the same pairs in TRL's conversational format
    (``prompt`` / ``chosen`` / ``rejected`` message lists) beside it; returns where the answers came from."""
    import itertools

    task = json.loads((ROOT / "fixtures" / "train" / "train.json").read_text())
    alpaca = SHARED / "realdata" / "llamafactory" / "alpaca_en_demo.json"
    answers = ([r["output"] for r in json.loads(alpaca.read_text()) if r["output"].strip()] if alpaca.is_file()
               else ["entailment", "neutral", "contradiction"])
    source = "alpaca_en_demo answers" if alpaca.is_file() else "the task's labels"
    with path.open("w", encoding="utf-8") as ours, _trl_file(path).open("w", encoding="utf-8") as theirs:
        for index, record, chosen, rejected in zip(range(count), itertools.cycle(task), itertools.cycle(answers),
                                                   itertools.cycle(answers[1:] + answers[:1])):
            context = record["messages"][:-1]
            context[-1] = {**context[-1], "content": f"{context[-1]['content']} (#{index})"}
            chosen, rejected = {"role": "assistant", "content": chosen}, {"role": "assistant", "content": rejected}
            ours.write(json.dumps({"messages": context, "chosen": chosen, "rejected": rejected},
                                  ensure_ascii=False) + "\n")
            theirs.write(json.dumps({"prompt": context, "chosen": [chosen], "rejected": [rejected]},
                                    ensure_ascii=False) + "\n")
    return source


def _trl_file(path: Path) -> Path:
    return path.with_name(f"{path.stem}.trl.jsonl")


def data_child(impl: str, data: Path, out: Path) -> None:
    """Time one side's data start-up, from after its imports and the tokenizer's loading to training-ready rows:
    wall and CPU seconds (every thread of the process, the tokenizer's included, and any child process)."""
    from minicpm_data.tokenizer import load_tokenizer

    folder = MINICPM2B_TOKENIZER if MINICPM2B_TOKENIZER.is_dir() else ROOT / "fixtures" / "tokenizers" / "chatml"
    tokenizer = load_tokenizer(str(folder))
    if impl == "ours":
        from minicpm_train.data import load_data

        def run() -> int:  # what `minicpm-train run --stage dpo` calls to load a pairs file into the cache
            files, _ = load_data(str(data), tokenizer, template=None, max_length=1024, truncation="right",
                                 render_options={}, cache_dir=out.parent / "cache", kind="pairs")
            return sum(len(dataset) for dataset, _ in files)
    else:
        import datasets
        from trl import DPOConfig, DPOTrainer

        datasets.disable_progress_bars()
        config = DPOConfig(output_dir=str(out.parent / "trl"), bf16=False, use_cpu=True, max_length=1024,
                           report_to="none")
        prepare = DPOTrainer._prepare_dataset.__get__(_TrlStub(tokenizer))

        def run() -> int:
            raw = datasets.load_dataset("json", data_files=str(_trl_file(data)), split="train",
                                        cache_dir=str(out.parent / "hf"))
            return len(prepare(raw, tokenizer, config, "train"))
    wall, cpu = time.perf_counter(), _cpu_seconds()
    rows = run()
    out.write_text(json.dumps({"seconds": time.perf_counter() - wall, "cpu_seconds": _cpu_seconds() - cpu,
                               "rows": rows}))


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class _TrlStub:
    """What ``DPOTrainer._prepare_dataset`` reads from its trainer (no model needed to preprocess)."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.processing_class = tokenizer


def _child(*args: str) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "result.json"
        subprocess.run([sys.executable, __file__, *args, "--out", str(out)], check=True, cwd=ROOT)
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per implementation (after a warm-up)")
    parser.add_argument("--data-pairs", type=int, default=100_000)
    parser.add_argument("--child", choices=("ours", "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child and options.data:
        data_child(options.child, options.data, options.out)
        return
    if options.child:
        step_child(options.child, options.pairs, options.length, options.repeats, options.out)
        return

    shape = ["--pairs", str(options.pairs), "--length", str(options.length), "--repeats", str(options.repeats)]
    step = {impl: _child("--child", impl, *shape) for impl in ("trl", "ours")}
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "pairs.jsonl"
        source = _pairs_file(data, options.data_pairs)
        startup = {impl: _child("--child", impl, "--data", str(data)) for impl in ("trl", "ours")}
    memory_ratio = step["ours"]["peak"] / step["trl"]["peak"]
    time_ratio = step["ours"]["seconds"] / step["trl"]["seconds"]
    startup_ratio = startup["trl"]["seconds"] / startup["ours"]["seconds"]
    startup_cpu_ratio = startup["trl"]["cpu_seconds"] / startup["ours"]["cpu_seconds"]
    loss_error = abs(step["ours"]["loss"] - step["trl"]["loss"]) / abs(step["trl"]["loss"])
    results = {
        "step": {"pairs": options.pairs, "length": options.length, "vocab": VOCAB,
                 "peak_rss_gb": {k: round(v["peak"] / 1e9, 2) for k, v in step.items()},
                 "step_seconds": {k: round(v["seconds"], 2) for k, v in step.items()},
                 "memory_ratio": round(memory_ratio, 3), "time_ratio": round(time_ratio, 3),
                 "loss_relative_error": loss_error},
        "startup": {"pairs": options.data_pairs, "answers": source,
                    "tokenizer": "MiniCPM-2B" if MINICPM2B_TOKENIZER.is_dir() else "fixture ChatML",
                    "seconds": {k: round(v["seconds"], 1) for k, v in startup.items()},
                    "cpu_seconds": {k: round(v["cpu_seconds"], 1) for k, v in startup.items()},
                    "rows": {k: v["rows"] for k, v in startup.items()}, "speedup": round(startup_ratio, 2),
                    "cpu_speedup": round(startup_cpu_ratio, 2)},
        "targets_met": {"memory": memory_ratio <= TARGETS["memory"], "time": time_ratio <= TARGETS["time"],
                        "startup": startup_ratio >= TARGETS["startup"], "loss": loss_error <= 1e-5},
    }
    print(f"DPO step, LoRA, {options.pairs} pairs x {options.length} tokens, vocab {VOCAB:,}: peak RSS "
          f"{step['trl']['peak'] / 1e9:.2f} GB TRL vs {step['ours']['peak'] / 1e9:.2f} GB ours ({memory_ratio:.2f}x, "
          f"target <= 1); step {step['trl']['seconds']:.2f} s vs {step['ours']['seconds']:.2f} s ({time_ratio:.2f}x, "
          f"target <= 1.1); loss rel. error {loss_error:.1e}", flush=True)
    print(f"data start-up, {options.data_pairs:,} pairs: TRL {startup['trl']['seconds']:.1f} s "
          f"({startup['trl']['cpu_seconds']:.1f} CPU s, {startup['trl']['rows']:,} rows), ours "
          f"{startup['ours']['seconds']:.1f} s ({startup['ours']['cpu_seconds']:.1f} CPU s, "
          f"{startup['ours']['rows']:,} rows): {startup_ratio:.2f}x faster (target >= 2), "
          f"{startup_cpu_ratio:.2f}x less CPU", flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
