"""Every file in ../shared/realdata through convert: nothing lost, output valid (or none when nothing is written);
OCNLI exactly as MiniCPM's, and MiniCPM's own messages files unchanged."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from minicpm_data.convert import ConvertOptions, convert_files
from minicpm_data.validate import validate_file

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata"
# Tables need their columns named; everything else is auto-detected.
OPTIONS = {
    "songys_chatbot/ChatbotData.csv": ConvertOptions(source="csv", user_col="Q", assistant_col="A"),
    "PROVENANCE.tsv": ConvertOptions(source="csv", user_col="path_in_repo", assistant_col="source_repo(owner+name)"),
}
FILES = sorted(str(p.relative_to(REALDATA)) for p in REALDATA.rglob("*") if p.is_file()) if REALDATA.is_dir() else []


def _count_records(path: Path) -> int:
    """Records counted independently of minicpm_data (stdlib json / csv)."""
    if path.suffix in (".csv", ".tsv"):
        with open(path, encoding="utf-8-sig", newline="") as handle:
            return sum(1 for row in csv.reader(handle, delimiter="\t" if path.suffix == ".tsv" else ",") if row) - 1
    text = path.read_text(encoding="utf-8-sig")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return sum(1 for line in text.splitlines() if line.strip())
    return len(data) if isinstance(data, list) else 1


@pytest.mark.parametrize("name", FILES)
def test_realdata_file_converts_without_loss(shared_dir, tmp_path, name):
    source = shared_dir / "realdata" / name
    out = tmp_path / "out.json"
    summary = convert_files([source], out, options=OPTIONS.get(name, ConvertOptions()))
    assert summary.read == _count_records(source)
    assert summary.read == summary.written + summary.rejected
    rejects_file = tmp_path / "out.rejects.jsonl"
    assert rejects_file.exists() == bool(summary.rejected)  # no rejects, no (empty) rejects file
    if summary.rejected:
        assert len(rejects_file.read_text(encoding="utf-8").splitlines()) == summary.rejected
    if summary.written:
        assert summary.output == str(out) and len(json.loads(out.read_text(encoding="utf-8"))) == summary.written
        assert validate_file(out) == []
    else:  # e.g. the unlabelled OCNLI test split: no output file, everything in the rejects
        assert summary.output is None and not out.exists()


def test_ocnli_matches_minicpms_own_conversion(shared_dir, tmp_path):
    first_13 = tmp_path / "dev13.json"
    lines = (shared_dir / "realdata" / "ocnli" / "dev.json").read_text(encoding="utf-8").splitlines()[:13]
    first_13.write_text("\n".join(lines), encoding="utf-8")
    convert_files([first_13], tmp_path / "out.json", options=ConvertOptions(source="ocnli"))
    expected = json.loads((shared_dir / "realdata" / "minicpm" / "ocnli_public_chatml" / "dev.json").read_text("utf-8"))
    assert json.loads((tmp_path / "out.json").read_text(encoding="utf-8")) == expected


@pytest.mark.parametrize("name, reason, count", [
    ("ocnli/dev.json", "no consensus label", 50),
    ("ocnli/test.json", "no label", 3000),
    ("llamafactory/glaive_toolcall_en_demo.json", "tool turn", 153),
])
def test_realdata_rejects_by_reason(shared_dir, tmp_path, name, reason, count):
    summary = convert_files([shared_dir / "realdata" / name], tmp_path / "out.jsonl")
    assert dict(summary.rejects) == {reason: count}


def test_realdata_repairs(shared_dir, tmp_path):
    summary = convert_files([shared_dir / "realdata" / "axolotl" / "conversation.missingturns.json"],
                            tmp_path / "out.jsonl")
    assert summary.repairs == {"drop empty turns": 1, "merge same-role turns": 1}


@pytest.mark.parametrize("name", ["ocnli_public_chatml/dev.json", "AdvertiseGenChatML/dev.json"])
def test_minicpms_own_messages_files_convert_to_themselves(shared_dir, tmp_path, name):
    """Already the target format: whitespace included (the OCNLI prompt ends in a newline), nothing changes."""
    source = shared_dir / "realdata" / "minicpm" / name
    expected = json.loads(source.read_text(encoding="utf-8"))
    for options in (ConvertOptions(source="messages"), ConvertOptions(source="messages", repair=False)):
        summary = convert_files([source], tmp_path / "out.json", options=options)
        assert (summary.written, summary.rejected, dict(summary.repairs)) == (len(expected), 0, {})
        assert json.loads((tmp_path / "out.json").read_text(encoding="utf-8")) == expected


def test_json_key_mapping_on_a_real_file_matches_the_alpaca_source(shared_dir, tmp_path):
    """LLaMA-Factory's Alpaca demo mapped by key: records without an input convert as the alpaca source does."""
    source = shared_dir / "realdata" / "llamafactory" / "alpaca_zh_demo.json"
    mapped = convert_files([source], tmp_path / "mapped.json",
                           options=ConvertOptions(user_col="instruction", assistant_col="output"))
    alpaca = convert_files([source], tmp_path / "alpaca.json", options=ConvertOptions(source="alpaca"))
    records = json.loads(source.read_text(encoding="utf-8"))
    assert (mapped.written, alpaca.written, mapped.files[0].format) == (len(records), len(records), "csv")
    pairs = zip(records, json.loads((tmp_path / "mapped.json").read_text(encoding="utf-8")),
                json.loads((tmp_path / "alpaca.json").read_text(encoding="utf-8")))
    without_input = [(m, a) for record, m, a in pairs if not record["input"].strip()]
    assert len(without_input) > 100 and all(m == a for m, a in without_input)
