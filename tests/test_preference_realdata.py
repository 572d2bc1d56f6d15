"""Real preference data (fixtures/realdata, from LLaMA-Factory's demo files) as external test cases: convert
detects and keeps every record, and an SFT source refuses it (test_render_pairs.py renders the converted pairs
on the real MiniCPM tokenizers)."""

from __future__ import annotations

import csv
import json

import pytest

from minicpm_data.convert import ConvertOptions, convert_files
from minicpm_data.io import read_examples
from minicpm_data.validate import file_kind, validate_file

FILES = {"dpo_en_demo.head.jsonl": ("sharegpt-pairs", "pairs", 7), "dpo_zh_demo.sample.jsonl": ("sharegpt-pairs", "pairs", 5),
         "dpo_zh_demo.short.jsonl": ("sharegpt-pairs", "pairs", 68),
         "dpo_en_demo.short.jsonl": ("sharegpt-pairs", "pairs", 5),
         "kto_en_demo.head.jsonl": ("llamafactory-kto", "kto", 2)}


@pytest.fixture(scope="module")
def realdata(fixtures_dir):
    return fixtures_dir / "realdata"


@pytest.fixture(scope="module")
def converted(realdata, tmp_path_factory):
    """Every real file converted by auto detection (one convert run each, shared by the tests)."""
    folder = tmp_path_factory.mktemp("real")
    return {name: convert_files([realdata / name], folder / name) for name in FILES}


def test_provenance_lists_every_file_with_its_bytes(realdata):
    rows = list(csv.DictReader((realdata / "PROVENANCE.tsv").open(encoding="utf-8"), delimiter="\t"))
    assert {row["file"] for row in rows} == {p.name for p in realdata.iterdir() if p.name != "PROVENANCE.tsv"}
    for row in rows:
        assert int(row["bytes"]) == (realdata / row["file"]).stat().st_size
        assert row["licence"] == "Apache-2.0" and len(row["commit"]) == 40


@pytest.mark.parametrize("name", FILES)
def test_real_files_convert_whole_into_their_kind(converted, realdata, name):
    source, kind, records = FILES[name]
    summary = converted[name]
    assert (summary.files[0].format, summary.files[0].detected, summary.kind) == (source, True, kind)
    assert summary.read == summary.written == records and summary.rejected == 0
    assert file_kind(summary.output) == kind and validate_file(summary.output) == []
    raw = [json.loads(line) for line in (realdata / name).read_text(encoding="utf-8").splitlines()]
    written = [item for _, item in read_examples(summary.output, kind)]
    for record, item in zip(raw, written):
        if kind == "pairs":  # the context is the conversation, the answers are the turn objects' stripped values
            assert item.messages[-1].content == record["conversations"][-1]["value"].strip()
            assert (item.chosen.content, item.rejected.content) == (record["chosen"]["value"].strip(),
                                                                    record["rejected"]["value"].strip())
        else:
            assert item.label is record["label"]
            assert item.messages[-1].content == record["messages"][-1]["content"].strip()


@pytest.mark.parametrize("name, source", [("dpo_en_demo.head.jsonl", "sharegpt"), ("kto_en_demo.head.jsonl", "messages")])
def test_the_issue_bug_sft_sources_no_longer_drop_rejected_or_label(tmp_path, realdata, name, source):
    """Before: auto took dpo_en_demo as ShareGPT (rejected dropped) and kto_en_demo as messages (label dropped)."""
    summary = convert_files([realdata / name], tmp_path / "out.json", options=ConvertOptions(source=source))
    assert summary.output is None and summary.rejects == {"preference record": FILES[name][2]}
