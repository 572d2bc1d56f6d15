"""Reading raw files in every layout and encoding; atomic writes; errors that name file and line."""

from __future__ import annotations

import json

import pytest

from minicpm_data.errors import InputError
from minicpm_data.io import iter_raw_records, read_conversations, record_writer, table_columns, write_records

CHINESE_TURN = "你好，请介绍一下北京。"


def _data(path, **kwargs):
    return [record.data for record in iter_raw_records(path, **kwargs)]


ASCII_START = 100_000  # past the 64 KB the encoding used to be guessed from


def _write_rows(path, rows, encoding, errors="strict"):
    """``(q, a)`` rows as a CSV, JSON Lines or a JSON list (one record per line), by ``path``'s suffix."""
    if path.suffix == ".csv":
        text = "q,a\n" + "".join(f"{q},{a}\n" for q, a in rows)
    else:
        lines = [json.dumps({"q": q, "a": a}, ensure_ascii=False) for q, a in rows]
        text = "".join(f"{line}\n" for line in lines) if path.suffix == ".jsonl" else "[\n" + ",\n".join(lines) + "\n]\n"
    path.write_bytes(text.encode(encoding, errors))
    return path


def _late_gbk(tmp_path, suffix, ascii_bytes=ASCII_START):
    """A file in GBK whose first ``ascii_bytes`` are ASCII; returns its path and its records."""
    count = ascii_bytes // 40 + 1
    rows = [(f"question {i:06d} padded to forty bytes", f"a{i}") for i in range(count)] + [(CHINESE_TURN, "北京")]
    return _write_rows(tmp_path / f"late{suffix}", rows, "gbk"), [{"q": q, "a": a} for q, a in rows]


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv"])
def test_gbk_after_a_long_ascii_start_is_detected_where_it_begins(tmp_path, suffix):
    path, records = _late_gbk(tmp_path, suffix)
    assert path.read_bytes()[:ASCII_START].isascii()
    assert _data(path) == records


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_gbk_detected_after_several_reads_of_ascii(tmp_path, monkeypatch, suffix):
    import minicpm_data.io

    monkeypatch.setattr(minicpm_data.io, "_READ_BYTES", 4096)  # the switch comes many reads in, mid-line
    path, records = _late_gbk(tmp_path, suffix, ascii_bytes=50_000)
    assert _data(path) == records


@pytest.mark.parametrize("suffix, line", [(".json", 10003), (".jsonl", 10002), (".csv", 10003)])
def test_a_bad_byte_after_utf8_text_is_an_error_on_its_line(tmp_path, suffix, line):
    """Non-ASCII UTF-8 came first, so a later GBK byte is broken input, not a reason to switch."""
    rows = [("你好", "hi")] + [(f"q{i}", f"a{i}") for i in range(10_000)] + [("\udcc4\udce3", "x")]
    # \udcc4\udce3: the bytes of 你 in GBK, past the first 64 KB
    path = _write_rows(tmp_path / f"bad{suffix}", rows, "utf-8", "surrogateescape")
    with pytest.raises(InputError, match=rf"^{path}:{line}: bytes cannot be decoded as utf-8; pass --encoding$"):
        _data(path)


def test_a_cut_off_last_line_is_named(tmp_path):
    path = tmp_path / "cut.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n{"a": [3, \n', encoding="utf-8")
    with pytest.raises(InputError, match=rf"^{path}:3: invalid JSON: unexpected end of data"):
        _data(path)


def test_gbk_and_crlf_jsonl_read_the_same_text(fixtures_dir):
    gbk = _data(fixtures_dir / "raw" / "sharegpt_gbk.jsonl")
    crlf = _data(fixtures_dir / "raw" / "sharegpt_crlf.jsonl")
    assert gbk == crlf
    assert gbk[0]["conversations"][0]["value"] == CHINESE_TURN


def test_bom_and_utf16_json_lists(fixtures_dir):
    expected = [{"instruction": "把句子翻译成英文", "input": "我爱你", "output": "I love you"}]
    assert _data(fixtures_dir / "raw" / "alpaca_bom.json") == expected
    assert _data(fixtures_dir / "raw" / "alpaca_utf16.json") == expected


def test_explicit_encoding_overrides_detection(fixtures_dir):
    records = _data(fixtures_dir / "raw" / "sharegpt_gbk.jsonl", encoding="gbk")
    assert records[0]["conversations"][0]["value"] == CHINESE_TURN


def test_single_object_and_json_lines_named_json(fixtures_dir):
    single = list(iter_raw_records(fixtures_dir / "raw" / "single_object.json"))
    assert [(r.index, r.line) for r in single] == [(0, None)]
    assert single[0].data["conversations"][0]["value"] == CHINESE_TURN
    lines = list(iter_raw_records(fixtures_dir / "raw" / "lines_named.json"))
    assert [(r.index, r.line) for r in lines] == [(0, 1), (1, 2)]


def test_csv_quoted_multiline_crlf_and_line_numbers(fixtures_dir):
    rows = list(iter_raw_records(fixtures_dir / "raw" / "table.csv"))
    assert [r.line for r in rows] == [2, 3, 5, 6]  # the second row spans lines 3-4
    assert rows[1].data["answer"] == "Line one,\nline two"
    assert rows[2].data["question"] == 'Say "quoted"'
    tsv = [r.data for r in iter_raw_records(fixtures_dir / "raw" / "table.tsv")]
    gb = [r.data for r in iter_raw_records(fixtures_dir / "raw" / "table_gb18030.csv")]
    assert tsv == gb == [r.data for r in rows]


def test_parquet_rows(fixtures_dir):
    rows = _data(fixtures_dir / "raw" / "table.parquet")
    assert rows == _data(fixtures_dir / "raw" / "table.csv")


@pytest.mark.parametrize("name, message", [
    ("broken.json", "broken.json:3: invalid JSON"),
    ("broken_utf8.jsonl", "broken_utf8.jsonl:2: bytes are neither UTF-8 nor GB18030"),
])
def test_broken_files_name_the_line(fixtures_dir, name, message):
    with pytest.raises(InputError, match=message):
        _data(fixtures_dir / "raw" / name)


def test_bad_bytes_after_a_long_ascii_start_name_their_line(tmp_path):
    path = tmp_path / "late.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "x" * 1000}]}) + "\n"
    path.write_bytes(good.encode() * 100 + b'{"messages": "\xff"}\n')
    with pytest.raises(InputError, match=r"late.jsonl:101: bytes are neither UTF-8 nor GB18030; pass --encoding"):
        _data(path)


def test_csv_quote_never_closed_names_the_row_it_opened_in(tmp_path):
    path = tmp_path / "open.csv"
    path.write_text('q,a\nhi,there\n"oops,never closed\nmore,rows\nand,more\n', encoding="utf-8")
    with pytest.raises(InputError, match=rf"^{path}:3: invalid CSV: a quoted field in the row starting on this line "
                                         "is never closed$"):
        _data(path)
    path.write_text('q,a\nhi,"the"re\n', encoding="utf-8")
    with pytest.raises(InputError, match=rf"^{path}:2: invalid CSV: ',' expected after"):
        _data(path)


def test_csv_lines_of_old_mac_and_windows_line_ends(tmp_path):
    path = tmp_path / "cr.csv"
    path.write_bytes(b'q,a\rone,"two\r\nlines"\rthree,four\r')
    rows = list(iter_raw_records(path))
    assert [(r.line, r.data) for r in rows] == [(2, {"q": "one", "a": "two\nlines"}), (4, {"q": "three", "a": "four"})]


def test_table_columns_even_without_rows(tmp_path, fixtures_dir):
    (tmp_path / "header.csv").write_text("question,answer\n", encoding="utf-8")
    (tmp_path / "empty.csv").write_text("", encoding="utf-8")
    assert table_columns(tmp_path / "header.csv") == ["question", "answer"]
    assert table_columns(tmp_path / "empty.csv") == []
    assert table_columns(fixtures_dir / "raw" / "table.parquet") == ["question", "answer", "persona", "topic"]


@pytest.mark.parametrize("name, content, encoding", [
    ("ascii.json", b'[{"a": 1}]', "utf-16"),  # the UTF-16/32 decoders refuse a stream without a BOM
    ("ascii.jsonl", b'{"a": 1}\n', "utf-32"),
    ("ascii.csv", b"q,a\nx,y\n", "utf-16"),
])
def test_a_forced_encoding_that_does_not_fit_names_file_line_and_encoding(tmp_path, name, content, encoding):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(InputError, match=rf"{name}:1: bytes cannot be decoded as {encoding}"):
        _data(tmp_path / name, encoding=encoding)


@pytest.mark.parametrize("encoding", ["klingon", "base64"])
def test_unknown_and_non_text_encodings(fixtures_dir, encoding):
    with pytest.raises(InputError, match=f"unknown encoding '{encoding}'"):
        _data(fixtures_dir / "raw" / "alpaca.json", encoding=encoding)


def test_unsupported_and_missing_files_and_directories(tmp_path):
    (tmp_path / "data.xml").write_text("<x/>")
    with pytest.raises(InputError, match="unsupported file type .xml"):
        iter_raw_records(tmp_path / "data.xml")
    with pytest.raises(InputError, match="no such file"):
        iter_raw_records(tmp_path / "absent.json")
    (tmp_path / "folder.json").mkdir()
    with pytest.raises(InputError, match="folder.json: is a directory; name the files in it"):
        iter_raw_records(tmp_path / "folder.json")


def test_writes_json_list_and_jsonl_unescaped(tmp_path):
    records = [{"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "hi"}]}] * 2
    write_records(tmp_path / "out.json", records)
    write_records(tmp_path / "out.jsonl", records)
    text = (tmp_path / "out.json").read_text(encoding="utf-8")
    assert "你好" in text and json.loads(text) == records
    lines = (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == records
    write_records(tmp_path / "empty.json", [])
    assert json.loads((tmp_path / "empty.json").read_text()) == []


def test_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.jsonl"
    target.write_text("previous contents\n")

    def records():
        yield {"messages": []}
        raise KeyboardInterrupt  # the user pressed Ctrl-C mid-write

    with pytest.raises(KeyboardInterrupt):
        write_records(target, records())
    assert target.read_text() == "previous contents\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_writer_output_is_readable_by_others(tmp_path):
    with record_writer(tmp_path / "out.jsonl") as writer:
        writer.write({"messages": []})
    assert (tmp_path / "out.jsonl").stat().st_mode & 0o044  # not the temporary file's private 0600


def test_read_conversations_from_list_and_lines(tmp_path):
    record = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    write_records(tmp_path / "a.json", [record, record])
    write_records(tmp_path / "a.jsonl", [record])
    assert [(i, c.to_record()) for i, c in read_conversations(tmp_path / "a.json")] == [(0, record), (1, record)]
    assert [c.to_record() for _, c in read_conversations(tmp_path / "a.jsonl")] == [record]
    write_records(tmp_path / "bad.jsonl", [record, {"conversations": []}])
    with pytest.raises(InputError, match=r"bad.jsonl:2: record 1 is not a messages record"):
        list(read_conversations(tmp_path / "bad.jsonl"))
