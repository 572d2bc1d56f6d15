"""split: deterministic for a seed, disjoint, together the input; also convert --dev-ratio."""

from __future__ import annotations

import json

import pytest

from minicpm_data.convert import ConvertOptions, convert_and_split
from minicpm_data.errors import InputError
from minicpm_data.io import write_records
from minicpm_data.split import dev_indices, split_file
from minicpm_data.validate import validate_file


def _records(n):
    return [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(n)]


def _load(path):
    return json.loads(path.read_text(encoding="utf-8"))


def test_split_is_deterministic_disjoint_and_complete(tmp_path):
    records = _records(50)
    write_records(tmp_path / "all.json", records)
    first = split_file(tmp_path / "all.json", tmp_path / "a", dev_ratio=0.2, seed=7)
    split_file(tmp_path / "all.json", tmp_path / "b", dev_ratio=0.2, seed=7)
    split_file(tmp_path / "all.json", tmp_path / "c", dev_ratio=0.2, seed=8)
    train, dev = _load(tmp_path / "a" / "train.json"), _load(tmp_path / "a" / "dev.json")
    assert (first.train, first.dev) == (40, 10) == (len(train), len(dev))
    assert sorted(map(json.dumps, train + dev)) == sorted(map(json.dumps, records))
    assert not {json.dumps(r) for r in train} & {json.dumps(r) for r in dev}
    assert train == [r for r in records if r in train]  # input order kept
    assert (tmp_path / "b" / "dev.json").read_bytes() == (tmp_path / "a" / "dev.json").read_bytes()
    assert (tmp_path / "c" / "dev.json").read_bytes() != (tmp_path / "a" / "dev.json").read_bytes()


def test_split_keeps_jsonl_and_small_inputs(tmp_path):
    write_records(tmp_path / "all.jsonl", _records(3))
    result = split_file(tmp_path / "all.jsonl", tmp_path / "out", dev_ratio=0.1)
    assert (result.train, result.dev) == (2, 1)  # at least one dev record
    assert result.dev_path.endswith("dev.jsonl")


def test_split_refuses_bad_ratio_and_overwriting_its_input(tmp_path):
    with pytest.raises(InputError, match="between 0 and 1"):
        dev_indices(10, 1.5, 0)
    write_records(tmp_path / "train.json", _records(4))
    with pytest.raises(InputError, match="overwrite its own input"):
        split_file(tmp_path / "train.json", tmp_path)


@pytest.mark.parametrize("content", ["", "[]"])
def test_split_refuses_an_input_without_records(tmp_path, content):
    (tmp_path / "empty.json").write_text(content)
    with pytest.raises(InputError, match="empty.json: no records to split"):
        split_file(tmp_path / "empty.json", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_split_refuses_a_directory(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(InputError, match="data: is a directory"):
        split_file(tmp_path / "data", tmp_path / "out")


def test_convert_with_dev_ratio_of_an_empty_input_writes_no_splits(tmp_path):
    (tmp_path / "empty.json").write_text("[]")
    summary = convert_and_split([tmp_path / "empty.json"], tmp_path / "out", dev_ratio=0.1)
    assert (summary.read, summary.output, summary.splits) == (0, None, {})
    assert list((tmp_path / "out").iterdir()) == []  # nothing rejected either: no rejects file


def test_convert_with_dev_ratio_refuses_to_overwrite_its_input(fixtures_dir, tmp_path):
    """sp/train.json -o sp: the split's train.json is the input; refused before anything is written."""
    folder = tmp_path / "sp"
    write_records(folder / "train.json", _records(5))
    before = (folder / "train.json").read_bytes()
    for rejects in (None, folder / "train.json"):
        with pytest.raises(InputError, match=rf"^{folder / 'train.json'}: the (output|rejects file) is also an input; "
                                             "choose another path$"):
            convert_and_split([folder / "train.json"], folder, dev_ratio=0.2, rejects_path=rejects)
    assert (folder / "train.json").read_bytes() == before and [p.name for p in folder.iterdir()] == ["train.json"]
    write_records(folder / "dev.jsonl", _records(5))
    with pytest.raises(InputError, match="dev.jsonl: the output is also an input"):
        convert_and_split([folder / "dev.jsonl"], folder, dev_ratio=0.2, fmt="jsonl")


def test_split_targets_are_checked_before_writing(tmp_path):
    write_records(tmp_path / "all.json", _records(4))
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match=r"file: is a file; with --dev-ratio, -o names a folder"):
        split_file(tmp_path / "all.json", tmp_path / "file")
    (tmp_path / "out" / "dev.json").mkdir(parents=True)
    with pytest.raises(InputError, match=r"dev.json: is a directory; name a file"):
        split_file(tmp_path / "all.json", tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["dev.json"]


def test_convert_with_dev_ratio(fixtures_dir, tmp_path):
    summary = convert_and_split([fixtures_dir / "raw" / "alpaca.json"], tmp_path / "out", dev_ratio=0.3, seed=1,
                                options=ConvertOptions())
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["dev.json", "rejects.jsonl", "train.json"]
    train, dev = _load(out / "train.json"), _load(out / "dev.json")
    assert len(train) + len(dev) == summary.written == 6 and len(dev) == 2
    assert summary.splits["dev"]["records"] == 2
    assert validate_file(out / "train.json") == validate_file(out / "dev.json") == []
