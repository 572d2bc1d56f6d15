"""Benchmark: `minicpm-data stats` against the reference finetune.py preprocessing, in one run.

    python bench/bench_stats.py [--records 50000] [--model-max-length 512]

Both sides read the same 50,000 OCNLI-shaped records (built from ../shared/realdata/ocnli, about
3.4 million tokens) from one JSON file and tokenize them with the real MiniCPM4 tokenizer as
``load_tokenizer`` returns it.

- reference: OpenBMB finetune.py's ``SupervisedDataset.preprocessing`` per record: ``<s>`` first;
  per message, user via ``apply_chat_template([message], add_generation_prompt=True)``, system via
  ``apply_chat_template([message])`` (masked), assistant content tokenized alone (trained); one eos
  appended; truncated and padded with eos to ``model_max_length``. It computes no statistics. Its
  final ``torch.LongTensor`` conversion is left out, so the reference is timed at its fastest.
- ours: ``read_conversations`` + ``compute_stats`` (render_many: exact chat-template ids, labels,
  truncation; then every statistic of ``minicpm-data stats``).

Printed: seconds and tokens per second of each, the speed-up, and the share of our run's wall time
during which no tokenizers-library work (batch encoding, the ids it returns, the offset look-ups that
place the labels) was in flight. Rendering the next batch and building the previous batch's samples
overlap the encoding (the tokenizer releases the GIL), so what remains outside is mostly reading the file.
Skips with a message when ../shared is absent.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
OCNLI = SHARED / "realdata" / "ocnli" / "train.3k.json"
TOKENIZER = SHARED / "tokenizers" / "minicpm4"
PROMPT = "请判断下边两个句子的关系属于 [entailment, neutral, contradiction]中的哪一种？\n句子1: {}\n句子2：{}\n"


def ocnli_records(count: int) -> list[dict]:
    """OCNLI pairs as MiniCPM's own OCNLI conversion writes them, cycled up to ``count`` records."""
    rows = [json.loads(line) for line in OCNLI.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [{"messages": [{"role": "user", "content": PROMPT.format(row["sentence1"], row["sentence2"])},
                          {"role": "assistant", "content": row["label"]}]}
            for row in (rows[i % len(rows)] for i in range(count))]


def reference_preprocessing(example: dict, tokenizer, model_max_length: int, ignore_index: int = -100) -> dict:
    """finetune.py's SupervisedDataset.preprocessing (MiniCPM3/4 branch), without the tensor conversion."""
    input_ids = [tokenizer.bos_token_id]
    label_ids = [ignore_index]
    for message in example["messages"]:
        role, content = message["role"], message["content"]
        if role == "user":
            content_ids = tokenizer.apply_chat_template([message], add_generation_prompt=True, return_dict=False)
            input_ids += content_ids
            label_ids += [ignore_index] * len(content_ids)
        elif role == "system":
            content_ids = tokenizer.apply_chat_template([message], return_dict=False)
            input_ids += content_ids
            label_ids += [ignore_index] * len(content_ids)
        elif role == "assistant":
            content_ids = tokenizer.encode(content, add_special_tokens=False)
            input_ids += content_ids
            label_ids += content_ids
    input_ids.append(tokenizer.eos_token_id)
    label_ids.append(tokenizer.eos_token_id)
    input_ids = input_ids[:model_max_length]
    label_ids = label_ids[:model_max_length]
    attention_mask = [1] * len(input_ids)
    input_ids += [tokenizer.eos_token_id] * (model_max_length - len(input_ids))
    label_ids += [ignore_index] * (model_max_length - len(label_ids))
    attention_mask += [0] * (model_max_length - len(attention_mask))
    return {"input_ids": input_ids, "label_ids": label_ids, "attention_mask": attention_mask}


def run_reference(path: Path, tokenizer, model_max_length: int) -> tuple[float, int]:
    start = time.perf_counter()
    data = json.load(open(path, encoding="utf-8"))
    tokens = 0
    for example in data:
        tokens += sum(reference_preprocessing(example, tokenizer, model_max_length)["attention_mask"])
    return time.perf_counter() - start, tokens


def run_ours(path: Path, tokenizer, model_max_length: int) -> tuple[float, float, float, object]:
    """Seconds end to end, reading the file, inside the tokenizers batch encoding; and the stats."""
    from minicpm_data import render
    from minicpm_data.stats import compute_stats, read_all

    encoding_seconds = 0.0
    tokenize = render._tokenize

    def timed_tokenize(*args):
        nonlocal encoding_seconds
        begin = time.perf_counter()
        tokenized = tokenize(*args)
        encoding_seconds += time.perf_counter() - begin
        return tokenized

    render._tokenize = timed_tokenize
    try:
        start = time.perf_counter()
        conversations = read_all(path)
        read_seconds = time.perf_counter() - start
        stats = compute_stats(str(path), conversations, tokenizer, model_max_length=model_max_length)
        return time.perf_counter() - start, read_seconds, encoding_seconds, stats
    finally:
        render._tokenize = tokenize


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=50_000)
    parser.add_argument("--model-max-length", type=int, default=512)
    args = parser.parse_args()
    if not (OCNLI.is_file() and TOKENIZER.is_dir()):
        print(f"skipped: {SHARED} (real OCNLI data and MiniCPM4 tokenizer) is not present")
        return 0
    sys.path.insert(0, str(REPO))
    from minicpm_data.io import write_records
    from minicpm_data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(TOKENIZER))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "ocnli_chatml.json"
        write_records(path, ocnli_records(args.records))  # as `minicpm-data convert` writes: a record a line
        ours_seconds, read_seconds, encoding_seconds, stats = run_ours(path, tokenizer, args.model_max_length)
        reference_seconds, reference_tokens = run_reference(path, tokenizer, args.model_max_length)
    tokens = int(stats.lengths.sum())
    print(f"records: {stats.records:,}  tokens (rendered, ours): {tokens:,}  tokenizer: MiniCPM4 "
          f"({type(tokenizer).__name__})  model_max_length: {args.model_max_length}  cores: {os.cpu_count()}")
    print(f"reference finetune.py preprocessing: {reference_seconds:.2f} s, "
          f"{reference_tokens / reference_seconds:,.0f} tokens/s ({reference_tokens:,} tokens, no statistics)")
    print(f"minicpm-data stats (read + render + labels + statistics): {ours_seconds:.2f} s, "
          f"{tokens / ours_seconds:,.0f} tokens/s")
    print(f"speed-up: {reference_seconds / ours_seconds:.2f}x (target >= 1.5x)")
    outside = ours_seconds - encoding_seconds
    print(f"tokenizers library at work (batch encoding, ids, offsets): {encoding_seconds:.2f} s; nothing encoding: "
          f"{outside:.2f} s = {outside / ours_seconds:.0%} of the stats run (target <= 20%): reading the file "
          f"{read_seconds:.2f} s, rendering + statistics not hidden behind encoding {outside - read_seconds:.2f} s "
          f"= {(outside - read_seconds) / ours_seconds:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
