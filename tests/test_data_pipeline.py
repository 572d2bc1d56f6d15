"""Training data: same rendering as stats, validated in the same pass, a memory-mapped cache written
atomically, padding to the longest, length grouping, several files with weights."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minicpm_data.errors import FormatError, MinicpmError
from minicpm_train.data import (IGNORE_INDEX, DataError, PaddingCollator, SupervisedDataset, load_data,
                                load_supervised, mix, named_sets)
from train_helpers import MAX_LENGTH, TASK_DEV, TASK_TRAIN


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    from minicpm_data.tokenizer import load_tokenizer

    return load_tokenizer(str(tiny_llama))


def _rows(dataset) -> tuple[list[list[int]], list[list[int]]]:
    return ([dataset[i]["input_ids"].tolist() for i in range(len(dataset))],
            [dataset[i]["labels"].tolist() for i in range(len(dataset))])


def test_samples_are_exactly_what_the_renderer_gives(tokenizer, tmp_path):
    from minicpm_data.io import read_conversations
    from minicpm_data.render import render_many

    dataset, summary = load_supervised(TASK_TRAIN, tokenizer, max_length=MAX_LENGTH, cache_dir=tmp_path)
    expected = render_many([c for _, c in read_conversations(TASK_TRAIN)], tokenizer, max_length=MAX_LENGTH)
    ids, labels = _rows(dataset)
    assert ids == [list(s.input_ids) for s in expected]
    assert labels == [list(s.labels) for s in expected]
    assert summary.records == summary.used == len(expected)
    assert summary.tokens == sum(map(len, ids)) == int(dataset.lengths.sum())
    assert summary.trained_tokens == sum(t != IGNORE_INDEX for ls in labels for t in ls) > 0
    assert dataset.ids.dtype.itemsize == 2  # a vocabulary under 65,536 ids fits 16 bits


def test_same_batch_gives_the_same_loss_as_the_list_pipeline(tiny_llama, tokenizer, tmp_path):
    """The batch the trainer sees equals the one the previous pipeline built (Python lists, padded by hand)."""
    import torch
    from transformers import AutoModelForCausalLM

    from minicpm_data.io import read_conversations
    from minicpm_data.render import render_many

    dataset, _ = load_supervised(TASK_DEV, tokenizer, max_length=MAX_LENGTH, cache_dir=tmp_path)
    batch = PaddingCollator(tokenizer.pad_token_id)([dataset[i] for i in range(8)])
    samples = render_many([c for _, c in read_conversations(TASK_DEV)][:8], tokenizer, max_length=MAX_LENGTH)
    longest = max(len(s.input_ids) for s in samples)
    before = {"input_ids": torch.tensor([s.input_ids + [tokenizer.pad_token_id] * (longest - len(s.input_ids))
                                         for s in samples]),
              "labels": torch.tensor([s.labels + [IGNORE_INDEX] * (longest - len(s.labels)) for s in samples]),
              "attention_mask": torch.tensor([[1] * len(s.input_ids) + [0] * (longest - len(s.input_ids))
                                              for s in samples])}
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    with torch.no_grad():
        assert model(**batch).loss.item() == model(**before).loss.item()


def test_second_run_maps_the_cache_without_rendering(tokenizer, tmp_path, monkeypatch):
    first, _ = load_supervised(TASK_TRAIN, tokenizer, max_length=MAX_LENGTH, cache_dir=tmp_path)
    import minicpm_data.render

    def no_rendering(*args, **kwargs):
        raise AssertionError("rendered again despite the cache")

    monkeypatch.setattr(minicpm_data.render, "render_stream", no_rendering)
    second, summary = load_supervised(TASK_TRAIN, tokenizer, max_length=MAX_LENGTH, cache_dir=tmp_path)
    assert summary.from_cache and _rows(second) == _rows(first)
    assert isinstance(second.ids.base, np.memmap)  # mapped from the file, not read into memory


def test_cache_key_follows_content_length_template_options_and_format(tokenizer, tmp_path, monkeypatch):
    import minicpm_train.data as data
    from minicpm_train.data import cache_key

    copy = tmp_path / "train.json"
    copy.write_bytes(TASK_TRAIN.read_bytes())

    def key(**changes):
        settings = {"template": "chatml", "max_length": MAX_LENGTH, "truncation": "right", **changes}
        return cache_key(copy, tokenizer, **settings)

    first = key()
    assert first == key() == key(render_options={})
    assert first != key(max_length=64)
    assert first != key(template="minicpm2")
    assert first != key(truncation="drop")
    assert first != key(render_options={"train_on": "all"})
    monkeypatch.setattr(data, "CACHE_FORMAT", data.CACHE_FORMAT + 1)
    assert first != key()  # an older layout is never read as this one
    monkeypatch.undo()
    copy.write_bytes(TASK_TRAIN.read_bytes().replace(b"entailment", b"entailed", 1))
    assert first != key()


def test_samples_without_trained_tokens_are_dropped_and_counted(tokenizer, tmp_path):
    records = json.loads(TASK_TRAIN.read_text())[:4]
    records[1]["messages"][1]["content"] = "premise: " + "a long premise " * 200  # the answer falls off
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    dataset, summary = load_supervised(data, tokenizer, max_length=MAX_LENGTH, cache_dir=tmp_path)
    assert (summary.records, summary.used, summary.dropped_no_trained_tokens) == (4, 3, 1)
    assert summary.truncated >= 1 and len(dataset) == 3
    assert all((dataset[i]["labels"] != IGNORE_INDEX).any() for i in range(3))


def test_invalid_file_names_records_and_the_validate_command(tokenizer, tmp_path):
    data = tmp_path / "bad.json"
    data.write_text(json.dumps([{"messages": [{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": "ok"}]},
                                {"messages": [{"role": "robot", "content": "hi"}]}]))
    with pytest.raises(FormatError, match=rf"2 problem\(s\) in record\(s\) 1; first: .*record 1 .*minicpm-data validate {data}"):
        load_supervised(data, tokenizer, max_length=MAX_LENGTH, cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache").iterdir()) or all(p.suffix == ".lock" for p in (tmp_path / "cache").iterdir())


def test_one_pass_validation_reports_every_bad_record_of_a_large_file(tokenizer, tmp_path):
    records = [json.loads(json.dumps(r)) for r in json.loads(TASK_TRAIN.read_text()) * 20]  # 2,560: several batches
    records[5]["messages"][2]["role"] = "user"
    del records[2000]["messages"][2]
    data = tmp_path / "big.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    from minicpm_data.validate import require_valid

    with pytest.raises(FormatError) as separate:
        require_valid(data)
    with pytest.raises(FormatError, match=r"in record\(s\) 5, 2000; first: .*:6 record 5 ") as one_pass:
        load_supervised(data, tokenizer, max_length=MAX_LENGTH, cache_dir=tmp_path / "cache")
    assert str(one_pass.value) == str(separate.value)


def test_a_killed_render_leaves_no_cache_and_the_next_run_renders_all(tokenizer, tmp_path, monkeypatch):
    import minicpm_data.render

    real = minicpm_data.render.render_stream

    def killed(*args, **kwargs):
        for count, sample in enumerate(real(*args, **kwargs)):
            if count == 100:
                raise KeyboardInterrupt
            yield sample

    records = json.loads(TASK_TRAIN.read_text()) * 40  # 5,120 samples: some are written before the kill
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    monkeypatch.setattr(minicpm_data.render, "render_stream", killed)
    with pytest.raises(KeyboardInterrupt):
        load_supervised(data, tokenizer, max_length=MAX_LENGTH, cache_dir=tmp_path / "cache")
    assert [p for p in (tmp_path / "cache").iterdir() if p.suffix != ".lock"] == []
    monkeypatch.undo()
    dataset, summary = load_supervised(data, tokenizer, max_length=MAX_LENGTH, cache_dir=tmp_path / "cache")
    assert not summary.from_cache and len(dataset) == summary.used == len(records)


def test_progress_reports_samples_tokens_and_the_record_count(tokenizer, tmp_path):
    records = json.loads(TASK_TRAIN.read_text()) * 20
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records, indent=2))
    updates = []
    _, summary = load_supervised(data, tokenizer, max_length=MAX_LENGTH, cache_dir=tmp_path, on_progress=updates.append)
    assert [u.samples for u in updates] == [1024, 2048, 2560]
    assert all(u.total == len(records) for u in updates) and updates[-1].finished
    assert updates[-1].tokens == summary.tokens and updates[0].tokens < updates[1].tokens < summary.tokens


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
        assert batch["labels"][row, :n].tolist() == feature["labels"].tolist()
        assert batch["input_ids"][row, n:].eq(tokenizer.pad_token_id).all()


def test_length_grouping_keeps_padding_low(tokenizer, tmp_path):
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler

    dataset, _ = load_supervised(TASK_TRAIN, tokenizer, max_length=MAX_LENGTH, cache_dir=tmp_path)
    ids, labels = _rows(dataset)
    # Spread the lengths so grouping has something to do: every other sample loses half its prompt.
    ids = [row if i % 2 else row[: len(row) // 2] + row[-4:] for i, row in enumerate(ids)]
    labels = [row if i % 2 else row[: len(row) // 2] + row[-4:] for i, row in enumerate(labels)]
    dataset = SupervisedDataset.from_samples(ids, labels)
    lengths = dataset.lengths

    def padding(order):
        batches = [order[i:i + 8] for i in range(0, len(order), 8)]
        return sum(max(lengths[j] for j in b) * len(b) - sum(lengths[j] for j in b) for b in batches)

    # As the Trainer builds it: lengths read from the dataset's rows.
    generator = torch.Generator().manual_seed(0)
    sampler = LengthGroupedSampler(8, dataset=dataset, generator=generator)
    assert sampler.lengths == lengths.tolist()
    shuffled = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0)).tolist()
    assert padding(list(sampler)) < padding(shuffled) / 2


def _write(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records))
    return path


def test_several_files_folders_globs_and_weights(tokenizer, tmp_path):
    records = json.loads(TASK_TRAIN.read_text())
    a = _write(tmp_path / "a.json", records[:40])
    folder = tmp_path / "more"
    b = _write(folder / "b.json", records[40:70])
    c = (folder / "c.jsonl")
    c.write_text("\n".join(json.dumps(r) for r in records[70:80]) + "\n")
    (folder / "notes.txt").write_text("not data")
    (folder / "b.rejects.jsonl").write_text(json.dumps({"reason": "missing field", "record": {}}) + "\n")

    files, summary = load_data(f"{a}:2,{folder}:0.5", tokenizer, max_length=MAX_LENGTH, cache_dir=tmp_path / "cache")
    assert [(Path(s.path).name, s.used, s.weight, s.epoch_samples) for _, s in files] == [
        ("a.json", 40, 2.0, 80), ("b.json", 30, 0.5, 15), ("c.jsonl", 10, 0.5, 5)]
    assert files[0][1].notes == [f"left out {folder / 'b.rejects.jsonl'}: rejects of minicpm-data convert (records "
                                 "it could not convert, with the reasons), not training data"]
    assert (summary.records, summary.used, summary.epoch_samples) == (80, 80, 100)
    assert [f["path"] for f in summary.files] == [str(a), str(folder / "b.json"), str(folder / "c.jsonl")]
    assert summary.tokens == sum(s.tokens for _, s in files)
    train = mix(files)
    assert len(train) == 100
    single_a, _ = load_supervised(a, tokenizer, max_length=MAX_LENGTH, cache_dir=tmp_path / "cache")
    assert [train[i]["input_ids"].tolist() for i in (0, 40)] == [single_a[0]["input_ids"].tolist()] * 2
    assert len(train.lengths) == 100 and train.lengths[0] == single_a.lengths[0]
    again, _ = load_data(f"{a}:2,{folder}:0.5", tokenizer, max_length=MAX_LENGTH, cache_dir=tmp_path / "cache")
    assert mix(again).picks.tolist() == train.picks.tolist()  # the same epoch on every rank and every run

    globbed, _ = load_data(str(folder / "*.json*"), tokenizer, max_length=MAX_LENGTH, cache_dir=tmp_path / "cache")
    assert [Path(s.path).name for _, s in globbed] == ["b.json", "c.jsonl"] and all(s.from_cache for _, s in globbed)
    assert list(named_sets(globbed)) == ["b", "c"]
    assert list(named_sets(globbed + globbed)) == ["b", "c", "b_2", "c_3"]


@pytest.mark.parametrize("spec, message", [
    ("missing.json", "data file not found: missing.json"),
    ("{dir}/*.csv", "no .json or .jsonl file matches"),
    ("{dir}:-1", "weight after ':' must be a number >= 0"),
    ("{train}:0", "every weight is 0, which leaves no sample to use"),
])
def test_bad_data_specs_are_one_line_errors(tokenizer, tmp_path, spec, message):
    with pytest.raises(MinicpmError, match=message):  # DataError, or InputError from the shared path expansion
        load_data(spec.format(dir=tmp_path, train=TASK_TRAIN), tokenizer, max_length=MAX_LENGTH, cache_dir=tmp_path)


def test_an_invalid_file_among_several_is_named(tokenizer, tmp_path):
    good = _write(tmp_path / "good.json", json.loads(TASK_TRAIN.read_text())[:5])
    bad = _write(tmp_path / "bad.json", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(FormatError, match=rf"^{bad}: 2 problem\(s\) in record\(s\) 0;"):
        load_data(f"{good},{bad}", tokenizer, max_length=MAX_LENGTH, cache_dir=tmp_path / "cache")


_RANK = """
import json, sys
from minicpm_data.tokenizer import load_tokenizer
import minicpm_data.render as render
from minicpm_train.data import load_supervised
real = render.render_stream
def counted(*args, **kwargs):
    print("rendering", flush=True)
    yield from real(*args, **kwargs)
render.render_stream = counted
tokenizer = load_tokenizer(sys.argv[1])
dataset, summary = load_supervised(sys.argv[2], tokenizer, max_length=256, cache_dir=sys.argv[3],
                                   local_main=sys.argv[4] == "main")
print(json.dumps([len(dataset), summary.tokens, dataset[len(dataset) - 1]["input_ids"].tolist()]))
"""


def test_independent_processes_render_once_and_map_the_same_cache(tiny_llama, tmp_path):
    """Two processes started together (as ranks are): the local main one renders, the other waits and maps."""
    data = _write(tmp_path / "data.json", json.loads(TASK_TRAIN.read_text()) * 30)
    script = tmp_path / "rank.py"
    script.write_text(_RANK)
    ranks = [subprocess.Popen([sys.executable, str(script), str(tiny_llama), str(data), str(tmp_path / "cache"), role],
                              stdout=subprocess.PIPE, text=True) for role in ("other", "main")]
    outputs = [rank.communicate(timeout=120)[0] for rank in ranks]
    assert all(rank.returncode == 0 for rank in ranks)
    assert [output.count("rendering") for output in outputs] == [0, 1]
    assert json.loads(outputs[0].splitlines()[-1]) == json.loads(outputs[1].splitlines()[-1])
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 1


def test_trainer_groups_by_length_from_the_offsets_without_reading_rows(tiny_llama, tokenizer, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, TrainingArguments
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from minicpm_train.data import trainer_class

    dataset, _ = load_supervised(TASK_TRAIN, tokenizer, max_length=MAX_LENGTH, cache_dir=tmp_path)

    class Unread(SupervisedDataset):
        def __getitem__(self, index):
            raise AssertionError("a row was read to learn its length")

    unread = Unread(dataset.ids, dataset.trained, dataset.offsets)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, use_cpu=True,
                             train_sampling_strategy="group_by_length", report_to="none")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    sampler = trainer_class()(model=model, args=args, train_dataset=unread)._get_train_sampler()
    torch.manual_seed(0)
    ours = list(sampler)
    torch.manual_seed(0)
    assert ours == list(LengthGroupedSampler(4, dataset=dataset))  # what the Trainer's own sampler gives


def test_render_bar_shows_rates_against_the_estimated_total_and_goes_when_done():
    import io

    from rich.console import Console

    from minicpm_train.callbacks import ProgressCallback
    from minicpm_train.data import RenderProgress

    display = ProgressCallback(Console(file=io.StringIO(), force_terminal=True))
    display.render_progress(RenderProgress("data/train.json", 1024, 70_000, 2560))
    display.render_progress(RenderProgress("data/train.json", 2048, 140_000, 2560))
    task = display._rendering.tasks[0]
    assert (task.description, task.completed, task.total) == ("train.json", 2048, 2560)
    assert "samples/s" in task.fields["rates"] and "tok/s" in task.fields["rates"]
    display.render_progress(RenderProgress("data/train.json", 2600, 182_000, 2600, finished=True))
    assert display._rendering is None  # a later file gets a bar of its own


def test_train_on_last_and_train_flags_reach_the_training_labels(tokenizer, tmp_path):
    from minicpm_data.conversation import Conversation
    from minicpm_data.render import render

    records = [{"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                             {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]},
               {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "no", "train": False}]}]
    path = tmp_path / "flags.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    for train_on in ("all", "last"):
        dataset, summary = load_supervised(path, tokenizer, max_length=MAX_LENGTH,
                                           render_options={"train_on": train_on}, cache_dir=tmp_path)
        expected = render(Conversation.from_record(records[0]), tokenizer, max_length=MAX_LENGTH, train_on=train_on)
        assert len(dataset) == 1  # the train: false record has nothing to train: dropped
        assert dataset[0]["labels"].tolist() == list(expected.labels)
        assert (summary.used, summary.dropped_no_trained_tokens, summary.from_cache) == (1, 1, False)
