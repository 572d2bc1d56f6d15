"""Training data: same rendering as stats, validation first, cache, padding to the longest, length grouping."""

from __future__ import annotations

import json

import pytest

from minicpm_data.errors import FormatError
from minicpm_train.data import IGNORE_INDEX, PaddingCollator, load_supervised
from train_helpers import MAX_LENGTH, TASK_TRAIN


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    from minicpm_data.tokenizer import load_tokenizer

    return load_tokenizer(str(tiny_llama))


def test_samples_are_exactly_what_the_renderer_gives(tokenizer, tmp_path):
    from minicpm_data.io import read_conversations
    from minicpm_data.render import render_many

    dataset, summary = load_supervised(TASK_TRAIN, tokenizer, max_length=MAX_LENGTH, cache_dir=tmp_path)
    expected = render_many([c for _, c in read_conversations(TASK_TRAIN)], tokenizer, max_length=MAX_LENGTH)
    assert dataset.input_ids == [list(s.input_ids) for s in expected]
    assert dataset.labels == [list(s.labels) for s in expected]
    assert summary.records == summary.used == len(expected)
    assert summary.tokens == sum(map(len, dataset.input_ids))
    assert summary.trained_tokens == sum(t != IGNORE_INDEX for ls in dataset.labels for t in ls) > 0


def test_second_run_reads_the_cache_without_tokenizing(tokenizer, tmp_path, monkeypatch):
    first, _ = load_supervised(TASK_TRAIN, tokenizer, max_length=MAX_LENGTH, cache_dir=tmp_path)
    import minicpm_data.render

    def no_rendering(*args, **kwargs):
        raise AssertionError("rendered again despite the cache")

    monkeypatch.setattr(minicpm_data.render, "render_many", no_rendering)
    second, summary = load_supervised(TASK_TRAIN, tokenizer, max_length=MAX_LENGTH, cache_dir=tmp_path)
    assert summary.from_cache and second.input_ids == first.input_ids and second.labels == first.labels


def test_cache_key_follows_content_length_and_template(tokenizer, tmp_path):
    from minicpm_train.data import cache_key

    copy = tmp_path / "train.json"
    copy.write_bytes(TASK_TRAIN.read_bytes())
    key = cache_key(copy, tokenizer, template="chatml", max_length=MAX_LENGTH, truncation="right")
    assert key == cache_key(copy, tokenizer, template="chatml", max_length=MAX_LENGTH, truncation="right")
    assert key != cache_key(copy, tokenizer, template="chatml", max_length=64, truncation="right")
    assert key != cache_key(copy, tokenizer, template="minicpm2", max_length=MAX_LENGTH, truncation="right")
    copy.write_bytes(TASK_TRAIN.read_bytes().replace(b"entailment", b"entailed", 1))
    assert key != cache_key(copy, tokenizer, template="chatml", max_length=MAX_LENGTH, truncation="right")


def test_samples_without_trained_tokens_are_dropped_and_counted(tokenizer, tmp_path):
    records = json.loads(TASK_TRAIN.read_text())[:4]
    records[1]["messages"][1]["content"] = "premise: " + "a long premise " * 200  # the answer falls off
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    dataset, summary = load_supervised(data, tokenizer, max_length=MAX_LENGTH, cache_dir=tmp_path)
    assert (summary.records, summary.used, summary.dropped_no_trained_tokens) == (4, 3, 1)
    assert summary.truncated >= 1 and len(dataset) == 3
    assert all(any(t != IGNORE_INDEX for t in labels) for labels in dataset.labels)


def test_invalid_file_names_records_and_the_validate_command(tokenizer, tmp_path):
    data = tmp_path / "bad.json"
    data.write_text(json.dumps([{"messages": [{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": "ok"}]},
                                {"messages": [{"role": "robot", "content": "hi"}]}]))
    with pytest.raises(FormatError, match=rf"2 problem\(s\) in record\(s\) 1; first: .*record 1 .*minicpm-data validate {data}"):
        load_supervised(data, tokenizer, max_length=MAX_LENGTH, cache_dir=tmp_path)


def test_batches_pad_to_their_longest_sample_only(tokenizer, tmp_path):
    dataset, _ = load_supervised(TASK_TRAIN, tokenizer, max_length=MAX_LENGTH, cache_dir=tmp_path)
    features = [dataset[i] for i in range(4)]
    batch = PaddingCollator(tokenizer.pad_token_id)(features)
    longest = max(len(f["input_ids"]) for f in features)
    assert batch["input_ids"].shape == (4, longest) and longest < MAX_LENGTH
    for row, feature in enumerate(features):
        n = len(feature["input_ids"])
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (longest - n)
        assert batch["labels"][row, n:].eq(IGNORE_INDEX).all()
        assert batch["labels"][row, :n].tolist() == feature["labels"]


def test_length_grouping_keeps_padding_low(tokenizer, tmp_path):
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler

    dataset, _ = load_supervised(TASK_TRAIN, tokenizer, max_length=MAX_LENGTH, cache_dir=tmp_path)
    # Spread the lengths so grouping has something to do: every other sample loses half its prompt.
    dataset.input_ids = [ids if i % 2 else ids[: len(ids) // 2] + ids[-4:] for i, ids in enumerate(dataset.input_ids)]

    def padding(order):
        batches = [order[i:i + 8] for i in range(0, len(order), 8)]
        return sum(max(len(dataset.input_ids[j]) for j in b) * len(b) - sum(len(dataset.input_ids[j]) for j in b)
                   for b in batches)

    generator = torch.Generator().manual_seed(0)
    grouped = list(LengthGroupedSampler(8, lengths=dataset.lengths, generator=generator))
    shuffled = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0)).tolist()
    assert padding(grouped) < padding(shuffled) / 2


def test_train_on_last_and_train_flags_reach_the_training_labels(tokenizer, tmp_path):
    from minicpm_data.conversation import Conversation
    from minicpm_data.render import render

    records = [{"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                             {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]},
               {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "no", "train": False}]}]
    path = tmp_path / "flags.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    for train_on in ("all", "last"):
        dataset, summary = load_supervised(path, tokenizer, max_length=MAX_LENGTH, train_on=train_on, cache_dir=tmp_path)
        expected = render(Conversation.from_record(records[0]), tokenizer, max_length=MAX_LENGTH, train_on=train_on)
        assert dataset.labels == [expected.labels]  # the train: false record has nothing to train: dropped
        assert (summary.used, summary.dropped_no_trained_tokens, summary.from_cache) == (1, 1, False)
