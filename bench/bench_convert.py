"""Benchmark: ``minicpm-data convert`` against a straightforward ``json.loads`` loop, same run, same file.

Generates two ShareGPT JSON Lines files into bench/out/ (git-ignored): long records (1-4 exchanges of
up to 600 words, ~2.5 KB each; default ~200 MB) and short ones (one exchange, ~320 bytes each, the size of
Alpaca, OCNLI and most instruction sets, where per-record overhead dominates; default ~100 MB). Each is
converted in separate processes, each measured for wall time, CPU time (MB per CPU-second is what other
work on a shared machine does not change) and peak RSS of the whole process tree:

- references: read lines, ``json.loads``, map roles, strip; then either ``json.dumps`` each line
  (JSONL) or collect and ``json.dump(records, indent=4)`` (the guide's JSON list);
- convert JSONL -> JSONL and JSONL -> JSON list in one process (the full pipeline: detection,
  repairs, turn checks, rejects file, atomic write), each against the reference writing the same
  format, for long and for short records;
- convert JSONL -> JSONL in one process and with one worker per CPU, on the full files and on
  quarter-size files, to show peak memory does not grow with the input.

Usage: ``.venv/bin/python bench/bench_convert.py [--size-mb 200] [--short-size-mb 100]``
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"

WORDS = ("the model learns from data and answers questions about science history code and language "
         "模型 学习 数据 回答 问题 科学 历史 代码 语言 训练 微调 \"quoted\" **bold** `code` - 1. \n \n\n").split(" ")

REFERENCE_JSONL = r"""
import json, sys
ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
with open(sys.argv[1], encoding="utf-8") as source, open(sys.argv[2], "w", encoding="utf-8") as target:
    for line in source:
        record = json.loads(line)
        messages = [{"role": ROLES[t["from"]], "content": t["value"].strip()} for t in record["conversations"]]
        target.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
"""

# The guide's way to a JSON list: collect everything, then json.dump(..., indent=4).
REFERENCE_LIST = r"""
import json, sys
ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
records = []
with open(sys.argv[1], encoding="utf-8") as source:
    for line in source:
        record = json.loads(line)
        records.append({"messages": [{"role": ROLES[t["from"]], "content": t["value"].strip()}
                                     for t in record["conversations"]]})
with open(sys.argv[2], "w", encoding="utf-8") as target:
    json.dump(records, target, ensure_ascii=False, indent=4)
"""

CONVERT = r"""
import sys
from minicpm_data.convert import ConvertOptions, convert_files
summary = convert_files([sys.argv[1]], sys.argv[2], options=ConvertOptions(workers=int(sys.argv[3])))
assert summary.read == summary.written + summary.rejected, summary.to_dict()
"""


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choices(WORDS, k=words))


def _long_turns(rng: random.Random) -> list[dict]:
    turns = [{"from": "system", "value": "You are a helpful assistant."}] if rng.random() < 0.3 else []
    for _ in range(rng.randint(1, 4)):
        turns.append({"from": "human", "value": _text(rng, rng.randint(10, 120))})
        turns.append({"from": "gpt", "value": _text(rng, rng.randint(40, 500))})
    return turns


def _short_turns(rng: random.Random) -> list[dict]:
    """One exchange of ~320 bytes as a JSON line, like an Alpaca or OCNLI record."""
    return [{"from": "human", "value": _text(rng, rng.randint(8, 24))},
            {"from": "gpt", "value": _text(rng, rng.randint(10, 30))}]


def generate(path: Path, size_mb: int, seed: int = 0, *, short: bool = False) -> Path:
    """A ShareGPT JSONL file of about ``size_mb`` MB (reused when already there at that size)."""
    target = size_mb * 1_000_000
    if path.exists() and abs(path.stat().st_size - target) < 2_000_000:
        return path
    rng = random.Random(seed)
    turns = _short_turns if short else _long_turns
    path.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with open(path, "w", encoding="utf-8") as handle:
        while written < target:
            line = json.dumps({"id": f"bench-{written}", "conversations": turns(rng)}, ensure_ascii=False) + "\n"
            handle.write(line)
            written += len(line.encode("utf-8"))
    return path


def _tree_rss_kb(pid: int) -> int:
    """Resident memory of a process and all its descendants (worker processes included)."""
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            total += int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))
            for task in os.listdir(f"/proc/{current}/task"):
                stack += map(int, Path(f"/proc/{current}/task/{task}/children").read_text().split())
        except (OSError, StopIteration, ValueError):  # the process ended while we looked
            continue
    return total


def measure(name: str, code: str, source: Path, target: Path, *args: str) -> dict:
    """Run ``code`` in a fresh interpreter: wall seconds, and the peak of its process tree's RSS
    (the child's own peak from wait4, or the sum over its workers sampled every 10 ms, whichever is larger)."""
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-c", code, str(source), str(target), *args])
    peak_kb, done = 0, threading.Event()

    def sample() -> None:
        nonlocal peak_kb
        while not done.wait(0.01):
            peak_kb = max(peak_kb, _tree_rss_kb(process.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    if status != 0:
        raise SystemExit(f"{name} failed with status {status}")
    size_mb = source.stat().st_size / 1e6
    cpu_seconds = usage.ru_utime + usage.ru_stime  # includes the workers, which the child waits for
    return {"run": name, "input_mb": size_mb, "seconds": seconds, "mb_per_s": size_mb / seconds,
            "mb_per_cpu_s": size_mb / cpu_seconds, "peak_rss_mb": max(peak_kb, usage.ru_maxrss) / 1024}


def _runs(kind: str, full: Path, quarter: Path, workers: str) -> list[dict]:
    """The reference loops and convert on one kind of records (``long`` or ``short``)."""
    return [
        measure(f"{kind}: reference json.loads loop -> JSONL", REFERENCE_JSONL, full, OUT / "reference.jsonl"),
        measure(f"{kind}: convert -> JSONL, 1 process", CONVERT, full, OUT / "converted.jsonl", "1"),
        measure(f"{kind}: convert -> JSONL, {workers} workers", CONVERT, full, OUT / "converted.jsonl", workers),
        measure(f"{kind}: reference json.loads loop -> JSON list", REFERENCE_LIST, full, OUT / "reference.json"),
        measure(f"{kind}: convert -> JSON list, 1 process", CONVERT, full, OUT / "converted.json", "1"),
        measure(f"{kind}: convert -> JSONL, 1 process, 1/4 input", CONVERT, quarter, OUT / "converted_q.jsonl", "1"),
        measure(f"{kind}: convert -> JSONL, {workers} workers, 1/4 input", CONVERT, quarter,
                OUT / "converted_q.jsonl", workers),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=200, help="Size of the long-record file.")
    parser.add_argument("--short-size-mb", type=int, default=100, help="Size of the short-record file.")
    args = parser.parse_args()
    files = {kind: (generate(OUT / f"sharegpt_{kind}_{size}mb.jsonl", size, short=kind == "short"),
                    generate(OUT / f"sharegpt_{kind}_{size // 4}mb.jsonl", size // 4, seed=1, short=kind == "short"))
             for kind, size in (("long", args.size_mb), ("short", args.short_size_mb))}
    workers = str(os.cpu_count() or 1)
    load_before = f"{os.getloadavg()[0]:.2f}"
    results = [r for kind, (full, quarter) in files.items() for r in _runs(kind, full, quarter, workers)]
    references = {(r["run"].split(":")[0], "JSON list" in r["run"]): r for r in results if "reference" in r["run"]}
    print(f"{'run':<52} {'input MB':>9} {'s':>7} {'MB/s':>7} {'x ref':>6} {'MB/CPU-s':>9} {'x ref':>6} "
          f"{'peak RSS MB':>12}")
    for r in results:
        reference = references[r["run"].split(":")[0], "JSON list" in r["run"]]
        print(f"{r['run']:<52} {r['input_mb']:>9.1f} {r['seconds']:>7.2f} {r['mb_per_s']:>7.1f} "
              f"{r['mb_per_s'] / reference['mb_per_s']:>6.2f} {r['mb_per_cpu_s']:>9.1f} "
              f"{r['mb_per_cpu_s'] / reference['mb_per_cpu_s']:>6.2f} {r['peak_rss_mb']:>12.1f}")
    for kind, (full, _) in files.items():
        lines = sum(1 for _ in open(full, "rb"))
        print(f"{kind} records: {full.stat().st_size / lines:,.0f} bytes each on average")
    print(f"{os.cpu_count()} CPUs; load average before: {load_before}, after: {os.getloadavg()[0]:.2f} "
          "(other work on the machine lowers MB/s, not MB/CPU-s)")

if __name__ == "__main__":
    main()
