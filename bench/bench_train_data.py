"""Training data at scale: start-up time and peak memory of `minicpm-train run` as the data grows.

    flock /tmp/minicpm-heavy.lock .venv/bin/python bench/bench_train_data.py [--samples 100000]
        [--llamafactory /tmp/lf-venv] [--pack-only 2000000]

Every run is `minicpm-train run --use_lora --max_steps 1` (a tiny random-init Llama carrying the real
MiniCPM4 tokenizer, model_max_length 1024, batch 8), started as its own process and timed from start to
exit; its peak RSS comes from wait4. The data are OCNLI pairs as MiniCPM's OCNLI conversion writes them
(about 70 tokens each, bench_stats.py's records) in one JSON list. Each size runs cold (empty cache)
and warm (cache present), padded and packed. From those, in this run:

- peak RSS growth per training token: (peak at --samples - peak at 1,000) / (tokens at --samples - tokens
  at 1,000), padded and packed, cold and warm (target: at most 8 bytes);
- packed cold start-up against padded cold start-up at --samples (target: at most 1.5x);
- warm start at --samples minus warm start at 1,000 samples (target: within 2 s);
- cold rendering throughput against `minicpm-data stats` (its read_all + compute_stats) on the same file,
  in this process (target: at least 80%);
- with --llamafactory VENV (a virtual environment holding llamafactory 0.9.5): the same work through
  `llamafactory-cli train` (its `datasets.map` preprocessing, 2 workers, cpm4 template, cutoff_len 1024,
  overwrite_cache), padded and with neat_packing (which keeps samples apart, as ours does);
- with --pack-only N: first-fit decreasing packing of N samples whose lengths repeat the file's.

Skips with a message when ../shared (the OCNLI data and the MiniCPM4 tokenizer) is absent.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "fixtures"))

from bench_stats import OCNLI, TOKENIZER, ocnli_records  # noqa: E402

MAX_LENGTH = 1024
SMALL = 1000
CLI = str(Path(sys.executable).with_name("minicpm-train"))


# Runs the command and reports its exit code, wall seconds and peak RSS. A go-between, because Linux keeps
# the high-water RSS of the memory a process had before exec: a command started straight from this
# (large) process would report this process's peak as its own.
_MEASURE = """
import json, os, subprocess, sys, time
start = time.monotonic()
child = subprocess.Popen(sys.argv[1:])
_, status, usage = os.wait4(child.pid, 0)
print(json.dumps([os.waitstatus_to_exitcode(status), time.monotonic() - start, usage.ru_maxrss * 1024]))
"""


def timed(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one command, which must succeed (else its output is shown)."""
    result = subprocess.run([sys.executable, "-c", _MEASURE, *argv], capture_output=True, text=True, env=env)
    code, seconds, peak = json.loads(result.stdout.strip().splitlines()[-1])
    if code != 0:
        raise SystemExit(f"failed: {' '.join(argv)}\n{(result.stdout + result.stderr)[-3000:]}")
    return seconds, peak


def ours(model: Path, data: Path, out: Path, cache: Path, packing: bool) -> tuple[float, float, int, int]:
    """One `minicpm-train run`: wall seconds, start-up seconds (wall less the training step), peak RSS, and
    the training tokens it reported."""
    argv = [CLI, "run", "--model_name_or_path", str(model), "--train_data_path", str(data), "--output_dir", str(out),
            "--data_cache_dir", str(cache), "--model_max_length", str(MAX_LENGTH), "--use_lora",
            "--max_steps", "1", "--per_device_train_batch_size", "8", "--save_strategy", "no",
            "--report_to", "none", "--packing", str(packing).lower()]
    seconds, peak = timed(argv)
    step = json.loads((out / "metrics.json").read_text())["final"]["train_runtime"]
    return seconds, seconds - step, peak, json.loads((out / "data_summary.json").read_text())["train"]["tokens"]


def llamafactory(venv: Path, model: Path, data: Path, out: Path, packing: bool) -> tuple[float, float, int]:
    """The same run through LLaMA-Factory (its own preprocessing into memory-mapped Arrow, 2 workers)."""
    (data.parent / "dataset_info.json").write_text(json.dumps({"bench": {
        "file_name": data.name, "formatting": "sharegpt", "columns": {"messages": "messages"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
                 "system_tag": "system"}}}))
    config = {"model_name_or_path": str(model), "stage": "sft", "do_train": True, "finetuning_type": "lora",
              "lora_target": "q_proj,v_proj", "dataset": "bench", "dataset_dir": str(data.parent), "template": "cpm4",
              "cutoff_len": MAX_LENGTH, "overwrite_cache": True, "preprocessing_num_workers": 2,
              "output_dir": str(out), "per_device_train_batch_size": 8, "max_steps": 1, "save_strategy": "no",
              "report_to": "none", "packing": packing, "neat_packing": packing}
    path = out.with_suffix(".yaml")
    path.write_text("".join(f"{key}: {json.dumps(value)}\n" for key, value in config.items()))
    env = {**os.environ, "DISABLE_VERSION_CHECK": "1", "HF_DATASETS_CACHE": str(out / "hf-cache")}
    seconds, peak = timed([str(venv / "bin" / "llamafactory-cli"), "train", str(path)], env)
    return seconds, seconds - json.loads((out / "train_results.json").read_text())["train_runtime"], peak


def rendering_against_stats(data: Path, cache: Path) -> tuple[float, float]:
    """Seconds of `minicpm-data stats`' reading and rendering, and of a cold load into the cache."""
    from minicpm_data.stats import compute_stats, read_all
    from minicpm_data.tokenizer import load_tokenizer
    from minicpm_train.data import load_supervised

    tokenizer = load_tokenizer(str(TOKENIZER))
    start = time.perf_counter()
    compute_stats(str(data), read_all(data), tokenizer, model_max_length=MAX_LENGTH)
    stats = time.perf_counter() - start
    start = time.perf_counter()
    load_supervised(data, tokenizer, max_length=MAX_LENGTH, cache_dir=cache)
    return stats, time.perf_counter() - start


def pack_only(data: Path, cache: Path, count: int) -> tuple[float, int]:
    """Seconds to pack ``count`` samples whose lengths repeat the cached file's, and the rows made."""
    import numpy as np

    from minicpm_data.tokenizer import load_tokenizer
    from minicpm_train.data import first_fit_decreasing, load_supervised

    dataset, _ = load_supervised(data, load_tokenizer(str(TOKENIZER)), max_length=MAX_LENGTH, cache_dir=cache)
    lengths = np.resize(dataset.lengths, count)
    start = time.perf_counter()
    _, rows = first_fit_decreasing(lengths, MAX_LENGTH)
    return time.perf_counter() - start, len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--llamafactory", type=Path, default=None, help="a venv with llamafactory 0.9.5 installed")
    parser.add_argument("--pack-only", type=int, default=0, help="also time packing this many samples")
    options = parser.parse_args()
    if not OCNLI.is_file() or not TOKENIZER.is_dir():
        print(f"bench_train_data: skipped, {OCNLI} or {TOKENIZER} is missing")
        return

    from build_tiny_models import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokenizer_only = tmp / "tokenizer"  # the MiniCPM4 folder's tokenizer files, not its model config
        tokenizer_only.mkdir()
        for item in TOKENIZER.iterdir():
            if "config.json" not in item.name or "tokenizer" in item.name:
                shutil.copy2(item, tokenizer_only / item.name)
        model = build_tiny_model("llama-chatml", tmp / "model", tokenizer_dir=tokenizer_only)
        files = {}
        for count in (SMALL, options.samples):
            files[count] = tmp / f"data{count}" / "train.json"
            files[count].parent.mkdir()
            files[count].write_text(json.dumps(ocnli_records(count), ensure_ascii=False, indent=1))

        results = {}  # (count, packing, warm) -> (wall, start-up, peak, tokens)
        for count in (SMALL, options.samples):
            for packing in (False, True):
                cache = tmp / f"cache-{count}-{packing}"
                for warm in (False, True):
                    out = tmp / f"ours-{count}-{packing}-{warm}"
                    results[count, packing, warm] = ours(model, files[count], out, cache, packing)

        big = options.samples
        print(f"bench_train_data: minicpm-train run --use_lora --max_steps 1, tiny Llama with the MiniCPM4 tokenizer, "
              f"OCNLI samples ({results[big, False, False][3] / big:.0f} tokens each), model_max_length {MAX_LENGTH}; "
              "start-up: wall less the training step")
        print(f"{'samples':>9} {'mode':>8} {'cold wall':>9} {'start-up':>8} {'warm wall':>9} {'start-up':>8} "
              f"{'cold peak MB':>12} {'warm peak MB':>12}")
        for count in (SMALL, big):
            for packing in (False, True):
                cold, warm = results[count, packing, False], results[count, packing, True]
                print(f"{count:>9,} {'packing' if packing else 'padding':>8} {cold[0]:>9.1f} {cold[1]:>8.1f} "
                      f"{warm[0]:>9.1f} {warm[1]:>8.1f} {cold[2] / 2**20:>12,.0f} {warm[2] / 2**20:>12,.0f}")
        for packing in (False, True):
            for warm in (False, True):
                small, large = results[SMALL, packing, warm], results[big, packing, warm]
                per_token = (large[2] - small[2]) / (large[3] - small[3])
                print(f"peak RSS growth per training token, {'packing' if packing else 'padding'}, "
                      f"{'warm' if warm else 'cold'}: {per_token:.2f} bytes (target: at most 8)")
        print(f"packed cold start-up / padded cold start-up at {big:,}: "
              f"{results[big, True, False][1] / results[big, False, False][1]:.2f}x (target: at most 1.5x)")
        print(f"warm start-up at {big:,} minus warm start-up at {SMALL:,}: "
              f"{results[big, False, True][1] - results[SMALL, False, True][1]:+.1f} s padded, "
              f"{results[big, True, True][1] - results[SMALL, True, True][1]:+.1f} s packed (target: within 2 s)")

        stats, load = rendering_against_stats(files[big], tmp / "cache-throughput")
        print(f"cold rendering throughput against minicpm-data stats on the same file: {stats / load:.0%} "
              f"({big / load:,.0f} against {big / stats:,.0f} samples/s; target: at least 80%)")

        if options.llamafactory:
            for packing in (False, True):
                wall, startup, peak = llamafactory(options.llamafactory, model, files[big], tmp / f"lf-{packing}", packing)
                mine = results[big, packing, False]
                print(f"LLaMA-Factory 0.9.5 {'neat_packing' if packing else 'padding'} at {big:,}: wall {wall:.1f} s, "
                      f"start-up {startup:.1f} s, peak {peak / 2**20:,.0f} MB | ours cold: wall {mine[0]:.1f} s, "
                      f"start-up {mine[1]:.1f} s, peak {mine[2] / 2**20:,.0f} MB (ours starts {startup / mine[1]:.2f}x "
                      f"as fast; its peak is {peak / mine[2]:.2f}x ours)")
        if options.pack_only:
            seconds, rows = pack_only(files[big], tmp / f"cache-{big}-False", options.pack_only)
            print(f"first-fit decreasing packing of {options.pack_only:,} samples into {rows:,} rows: {seconds:.2f} s")


if __name__ == "__main__":
    main()
