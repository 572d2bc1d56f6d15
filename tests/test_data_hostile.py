"""Hostile data through `minicpm-data`, as users meet it: media in chat data, records without an exchange, a wrong
--from, UTF-16/32 without a byte-order mark, and convert's rejects files beside outputs (never read as data)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_data_cli import run_cli

from minicpm_data.errors import InputError
from minicpm_data.io import _without_bom_encoding, expand_data_path
from minicpm_data.media import parts_as_placeholders, without_placeholders

MESSAGES = {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]}


def _convert(capsys, *argv):
    """``convert ... --json``: exit code, the summary, stderr."""
    code, out, err = run_cli(capsys, "convert", *argv, "--json")
    summary = json.loads(out)
    assert summary["read"] == summary["written"] + summary["rejected"] and "Traceback" not in err
    return code, summary, err


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _one_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


# --- media ------------------------------------------------------------------------------------------------


def test_llamafactory_multimodal_records_are_rejected_as_not_text(capsys, fixtures_dir, tmp_path):
    out = tmp_path / "mllm.jsonl"
    code, summary, err = _convert(capsys, fixtures_dir / "raw" / "mllm.json", "-o", out)
    assert code == 0 and "detected format messages" in err
    assert (summary["written"], summary["rejects"]) == (1, {"not text: image": 5, "not text: video": 2,
                                                            "not text: audio": 1})
    details = {r["index"]: r["detail"] for r in _lines(tmp_path / "mllm.rejects.jsonl")}
    assert details[0] == "media files under images; <image> in turn 0; --media drop keeps the text without them"
    assert details[4] == ("media files under videos, audios; <video><audio> in turn 0; --media drop keeps the text "
                          "without them")
    assert details[5].startswith("media files under images;")  # the key alone, no placeholder
    assert details[6] == "message 0 has a image_url part; --media drop keeps the text"
    assert _lines(out) == [MESSAGES]  # "images": [] names nothing


def test_media_drop_removes_placeholders_and_parts_and_counts_them(capsys, fixtures_dir, tmp_path):
    out = tmp_path / "mllm.jsonl"
    code, summary, _ = _convert(capsys, fixtures_dir / "raw" / "mllm.json", "-o", out, "--media", "drop")
    assert code == 0 and summary["repairs"] == {"drop media": 7}
    assert summary["rejects"] == {"answer without prompt": 1}  # "<image>" was the whole question
    written = _lines(out)
    assert [m["content"] for m in written[0]["messages"]][:1] == ["Who are they?"]
    assert [r["messages"][0]["content"] for r in written[1:7]] == [
        "他们是谁？", "What's that sound?", "Why is this video funny?", "What is the video describing?",
        "Please describe this image", "What animal is this?"]
    assert not any("<" in m["content"] for r in written for m in r["messages"])
    assert run_cli(capsys, "validate", out)[0] == 0


def test_llava_image_key_and_bad_media_policy(capsys, tmp_path):
    source = tmp_path / "llava.json"
    source.write_text(json.dumps([{"id": "1", "image": "coco/1.jpg", "conversations": [
        {"from": "human", "value": "What is this?\n<image>"}, {"from": "gpt", "value": "A bus."}]}]))
    code, summary, _ = _convert(capsys, source, "-o", tmp_path / "o.json", "--media", "drop")
    assert code == 0 and json.loads((tmp_path / "o.json").read_text())[0]["messages"][0]["content"] == "What is this?"
    code, _, err = run_cli(capsys, "convert", source, "-o", tmp_path / "o.json", "--media", "keep")
    assert code == 1 and _one_error(err) == "error: unknown media policy 'keep'; choose one of reject, drop"


def test_validate_refuses_records_that_name_media_files(capsys, fixtures_dir):
    code, out, _ = run_cli(capsys, "validate", fixtures_dir / "raw" / "mllm.json", "--json")
    problems = json.loads(out)["problems"]
    assert code == 1 and {p["pointer"] for p in problems} >= {"/0/images", "/2/audios", "/3/videos"}
    assert "/8/images" not in {p["pointer"] for p in problems}  # an empty list names nothing
    assert problems[0]["message"].endswith("(minicpm-data convert --media drop keeps the text)")


@pytest.mark.parametrize("text, expected", [
    ("<image>Who?", "Who?"), ("<image>\nWho?", "Who?"), ("Who?\n<image>", "Who?"), ("a <image> b", "a b"),
    ("<video><audio>What?", "What?"), ("a\n\n<image>\n\nb", "a b"), ("no media", "no media"), ("<image>", ""),
])
def test_placeholders_go_with_their_whitespace(text, expected):
    assert without_placeholders(text) == expected


def test_media_parts_become_placeholders_in_a_copy():
    record = {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}, "Hi",
                                                        {"type": ["odd"]}]}]}
    assert parts_as_placeholders(record)["messages"][0]["content"][:2] == ["<audio>", "Hi"]
    assert record["messages"][0]["content"][0]["type"] == "input_audio"  # the original is left alone


# --- records without an exchange; a wrong --from -------------------------------------------------------------


def test_prompts_without_answers_are_named_so(capsys, tmp_path):
    source = tmp_path / "prompts.jsonl"
    records = [{"messages": [{"role": "user", "content": "Hi"}]},
               {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "Hi"}]},
               {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "}]},
               {"messages": [{"role": "assistant", "content": "Hello"}]},
               {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "Hello"}]},
               {"messages": []}, MESSAGES]
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    code, summary, _ = _convert(capsys, source, "-o", tmp_path / "o.jsonl")
    assert code == 0 and summary["rejects"] == {"prompt without answer": 3, "answer without prompt": 2,
                                                "empty conversation": 1}
    details = [(r["reason"], r["detail"]) for r in _lines(tmp_path / "o.rejects.jsonl")]
    assert details[2] == ("prompt without answer", "the assistant turn is empty")
    assert details[3] == ("answer without prompt", "no user turn comes before the assistant turn")
    assert details[5] == ("empty conversation", "no messages")


def test_a_wrong_from_names_the_format_auto_detects(capsys, fixtures_dir, tmp_path):
    code, out, err = run_cli(capsys, "convert", fixtures_dir / "raw" / "sharegpt.json", "--from", "alpaca",
                             "-o", tmp_path / "o.json")
    assert code == 1 and "read 18 = written 0 + rejected 18" in out
    assert _one_error(err).endswith("sharegpt.json: 17 of 18 records lack a field --from alpaca needs; auto detects "
                                    "sharegpt for this file: try --from sharegpt, or leave --from out")
    mixed = tmp_path / "mixed.jsonl"  # one record fits (after the 100 auto reads): a warning, the output written
    mixed.write_text("".join(
        json.dumps({"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": "a"}]}) + "\n"
        for i in range(100)) + json.dumps(MESSAGES) + "\n")
    code, summary, err = _convert(capsys, mixed, "--from", "messages", "-o", tmp_path / "m.json")
    assert (code, summary["written"], summary["files"][0]["auto_format"]) == (0, 1, "sharegpt")
    assert "warning: " in err and "100 of 101 records lack a field --from messages needs; auto detects sharegpt" in err
    code, summary, err = _convert(capsys, mixed, "--from", "sharegpt", "-o", tmp_path / "s.json")  # it fits
    assert summary["written"] == 101 and "warning" not in err and summary["files"][0]["auto_format"] is None


# --- UTF-16 / UTF-32 without a byte-order mark ---------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be"])
def test_text_without_a_byte_order_mark_names_the_encoding_to_try(capsys, fixtures_dir, tmp_path, encoding):
    source = tmp_path / "alpaca.json"
    source.write_bytes((fixtures_dir / "raw" / "alpaca.json").read_text(encoding="utf-8").encode(encoding))
    message = (f"looks like {encoding.upper()} text without a byte-order mark (NUL bytes between its characters); "
               f"read it with --encoding {encoding}, or save it as UTF-8")
    code, _, err = run_cli(capsys, "convert", source, "-o", tmp_path / "o.json")
    assert code == 1 and _one_error(err) == f"error: {source}: {message}"
    code, out, _ = run_cli(capsys, "validate", source, "--json")
    assert code == 1 and json.loads(out)["problems"][0]["message"] == message
    code, summary, _ = _convert(capsys, source, "-o", tmp_path / "o.json", "--encoding", encoding)
    assert (code, summary["read"]) == (0, 9)


def test_which_bytes_look_like_utf16():
    chinese = ("问题,回答\n" + "中文问题内容很长的一句话,中文回答也是很长的一句话\n" * 20).encode("utf-16-le")
    assert _without_bom_encoding(chinese) == "utf-16-le"  # few ASCII characters, and 一 (U+4E00) has a NUL byte
    assert _without_bom_encoding('{"a": 1}'.encode("utf-16-be")) == "utf-16-be"
    assert _without_bom_encoding("问题".encode("utf-8")) is None
    assert _without_bom_encoding(bytes(range(256)) * 16) is None  # NUL bytes, but no text layout


# --- rejects files --------------------------------------------------------------------------------------------


def test_no_rejects_no_rejects_file_and_a_stale_one_goes(capsys, tmp_path):
    source = tmp_path / "ok.jsonl"
    source.write_text(json.dumps(MESSAGES) + "\n")
    stale = tmp_path / "out" / "train.rejects.jsonl"
    stale.parent.mkdir()
    stale.write_text("")
    code, summary, _ = _convert(capsys, source, "-o", tmp_path / "out" / "train.json")
    assert code == 0 and summary["rejects_file"] is None and not stale.exists()
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["train.json"]
    code, out, _ = run_cli(capsys, "convert", source, "-o", tmp_path / "split", "--dev-ratio", "0.5")
    assert code == 0 and "rejects: none (every record written)" in out
    assert sorted(p.name for p in (tmp_path / "split").iterdir()) == ["dev.json", "train.json"]


def _converted_folder(capsys, fixtures_dir, tmp_path) -> Path:
    """A folder as convert leaves it: outputs and their rejects files, and a --dev-ratio folder inside."""
    folder = tmp_path / "data"
    for name, output in (("sharegpt.json", "a.json"), ("alpaca.json", "b.jsonl")):
        assert run_cli(capsys, "convert", fixtures_dir / "raw" / name, "-o", folder / output)[0] == 0
    assert run_cli(capsys, "convert", fixtures_dir / "raw" / "ocnli.json", "-o", folder / "ocnli",
                   "--dev-ratio", "0.3")[0] == 0
    assert {p.name for p in folder.rglob("*rejects.jsonl")} == {"a.rejects.jsonl", "b.rejects.jsonl", "rejects.jsonl"}
    return folder


def test_validate_folders_and_globs_leave_rejects_files_out(capsys, fixtures_dir, tmp_path):
    folder = _converted_folder(capsys, fixtures_dir, tmp_path)
    for argv in ([folder], [f"{folder}/*.json*"], sorted(folder.iterdir())):  # the last: what a shell glob gives
        code, out, err = run_cli(capsys, "validate", *argv)
        assert code == 0 and out.startswith("valid: ") and "rejects" not in out, argv
        assert err.startswith(f"note: left out {folder / 'a.rejects.jsonl'}, {folder / 'b.rejects.jsonl'}")
        assert err.strip().endswith("not training data")
    code, _, err = run_cli(capsys, "validate", folder / "a.rejects.jsonl")
    assert code == 1 and _one_error(err).endswith("no data file is left: name the converted output")


def test_training_data_paths_leave_rejects_files_out(capsys, fixtures_dir, tmp_path):
    from minicpm_train.data import DataError, data_files, left_out_rejects

    folder = _converted_folder(capsys, fixtures_dir, tmp_path)
    (folder / "empty.rejects.jsonl").write_text("")  # as an older convert left them
    for spec in (str(folder), f"{folder}/*.json*", f"{folder}/a.json,{folder}/b.rejects.jsonl"):
        files = [path for path, _ in data_files(spec)]
        assert files and not any("rejects" in path.name for path in files), spec
        assert left_out_rejects(spec), spec
    assert [p.name for p, _ in data_files(f"{folder}/ocnli")] == ["dev.json", "train.json"]
    with pytest.raises(InputError, match="no data file is left: name the converted output"):
        data_files(f"{folder}/*.rejects.jsonl")
    with pytest.raises(DataError, match="data file not found"):
        data_files(f"{folder}/missing.json")


def test_expand_data_path_errors_name_the_folder_or_glob(tmp_path):
    with pytest.raises(InputError, match=f"^{tmp_path}: folder has no .json or .jsonl file$"):
        expand_data_path(str(tmp_path))
    with pytest.raises(InputError, match=r"^no \.json or \.jsonl file matches .*\*\.json$"):
        expand_data_path(f"{tmp_path}/*.json")


def test_validate_wraps_a_long_file_name_never_cuts_it(capsys, monkeypatch, tmp_path):
    from rich.console import Console

    import minicpm_data.cli as cli

    monkeypatch.setattr(cli, "console", Console(width=80, no_color=True))  # an 80-column terminal
    path = tmp_path / ("a-long-folder-name-" * 4) / "train-with-a-long-name.jsonl"
    path.parent.mkdir()
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]}))
    code, out, _ = run_cli(capsys, "validate", path)
    cells = [line.split("│")[1].strip() for line in out.splitlines() if line.startswith("│")]
    assert code == 1 and max(map(len, out.splitlines())) <= 80 and "…" not in out
    assert "".join(cells) == str(path)  # the file column, its wrapped pieces joined
