"""The minicpm-data convert / validate / split commands: output, exit codes, one-line errors, light imports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from minicpm_data.cli import main

NO_HEAVY_IMPORTS = """
import sys
from minicpm_data.cli import main
for argv in (["--help"], ["convert", sys.argv[1], "-o", sys.argv[2]]):
    sys.argv = ["minicpm-data", *argv]
    try:
        main()
    except SystemExit as done:
        assert not done.code, done.code
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
assert not heavy, heavy
print("light")
"""


def run_cli(capsys, *argv):
    """Run the console entry in-process; returns (exit code, stdout, stderr)."""
    sys.argv = ["minicpm-data", *map(str, argv)]
    try:
        main()
        code = 0
    except SystemExit as done:
        code = done.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_help_and_convert_import_neither_torch_nor_transformers(fixtures_dir, tmp_path):
    result = subprocess.run([sys.executable, "-c", NO_HEAVY_IMPORTS, str(fixtures_dir / "raw" / "alpaca.json"),
                             str(tmp_path / "out.json")], capture_output=True, text=True)
    assert result.returncode == 0 and "light" in result.stdout, result.stderr


def test_console_script_error_is_one_line_without_traceback(fixtures_dir, tmp_path):
    exe = Path(sys.executable).parent / "minicpm-data"  # the console script installed beside this Python
    result = subprocess.run([str(exe), "convert", str(fixtures_dir / "raw" / "broken.json"), "-o", str(tmp_path / "o.json")],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "broken.json:3: invalid JSON" in result.stderr


@pytest.mark.parametrize("argv, message", [
    (["convert", "raw/broken_utf8.jsonl"], "broken_utf8.jsonl:2: bytes are neither UTF-8 nor GB18030"),
    (["convert", "raw/table.csv", "--from", "csv", "--user-col", "Q", "--assistant-col", "answer"],
     "table.csv: missing column 'Q'"),
    (["convert", "raw/alpaca.json", "--from", "yaml"], "unknown format 'yaml'"),
    (["convert", "raw/table.csv"], "table.csv: cannot detect the format"),
    (["convert", "raw/absent.json"], "absent.json: no such file"),
    (["convert", "raw/alpaca.json", "--encoding", "klingon"], "unknown encoding 'klingon'"),
    (["convert", "raw/alpaca.json", "--from", "alpaca", "--encoding", "utf-16"],
     "alpaca.json:1: bytes cannot be decoded as utf-16"),
    (["convert", "raw/table.csv", "--template", "Q {", "--assistant-col", "answer"], "--template 'Q {': Single '{'"),
    (["convert", "raw/table.csv", "--template", "{question!x}", "--assistant-col", "answer"],
     "{question} has a conversion or format spec"),
    (["split", "raw/alpaca.json", "--dev-ratio", "2"], "--dev-ratio must be between 0 and 1"),
    (["convert", "raw/alpaca.json", "--tool-turns", "keep"], "unknown tool policy 'keep'"),
    (["convert", "raw/alpaca.json", "--workers", "0"], "--workers must be 1 or more"),
])
def test_bad_input_is_one_line_exit_1(capsys, fixtures_dir, tmp_path, argv, message):
    argv = [str(fixtures_dir / a) if a.startswith("raw/") else a for a in argv] + ["-o", str(tmp_path / "out.json")]
    code, out, err = run_cli(capsys, *argv)
    assert code == 1 and message in err and "Traceback" not in err + out
    assert len(err.strip().splitlines()) == 1


def test_a_directory_input_is_named_as_such(capsys, fixtures_dir, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    tokenizer = ["--tokenizer", fixtures_dir / "tokenizers" / "chatml"]
    for argv in (["convert", folder, "-o", tmp_path / "o.json"], ["split", folder, "-o", tmp_path / "split"],
                 ["inspect", folder, *tokenizer]):
        code, out, err = run_cli(capsys, *argv)
        assert code == 1 and f"{folder}: is a directory; name the files in it" in err, argv
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err + out
    for argv in (["validate", folder], ["stats", folder, *tokenizer]):  # these take folders, as training does
        code, out, err = run_cli(capsys, *argv)
        assert code == 1 and _one_error_line(err) == f"error: {folder}: folder has no .json or .jsonl file", argv


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_empty_inputs(capsys, tmp_path):
    for name, content in (("zero.json", ""), ("blank.jsonl", "\n \n"), ("list.json", "[]")):
        path = tmp_path / name
        path.write_text(content)
        code, out, err = run_cli(capsys, "convert", path, "-o", tmp_path / "out.json")
        assert code == 1 and "read 0 = written 0" in out and _one_error_line(err) == f"error: no records in {path}"
        assert not (tmp_path / "out.json").exists()
        code, out, _ = run_cli(capsys, "validate", path, "--json")
        assert code == 1 and json.loads(out)["problems"][0]["message"].startswith(("file is empty", "no records"))
        code, out, err = run_cli(capsys, "split", path, "-o", tmp_path / "split")
        assert code == 1 and f"{path}: no records to split" in _one_error_line(err)


def test_nothing_written_exits_1_after_the_summary(capsys, fixtures_dir, tmp_path):
    source = tmp_path / "rejected.jsonl"
    source.write_text("".join(line for line in (fixtures_dir / "raw" / "ocnli.json").read_text("utf-8").splitlines(True)
                              if "-" in json.loads(line).get("label", "-") or "label" not in line), encoding="utf-8")
    for extra in ([], ["--json"], ["--dev-ratio", "0.2"]):
        out_path = tmp_path / ("out" if extra[:1] == ["--dev-ratio"] else "out.json")
        code, out, err = run_cli(capsys, "convert", source, "--from", "ocnli", "-o", out_path, *extra)
        rejects = out_path / "rejects.jsonl" if extra[:1] == ["--dev-ratio"] else tmp_path / "out.rejects.jsonl"
        assert code == 1 and _one_error_line(err) == (
            f"error: no records written: all 2 rejected (no consensus label: 1, no label: 1); see {rejects}")
        assert "read 2 = written 0 + rejected 2" in out or json.loads(out)["output"] is None
        assert len(rejects.read_text().splitlines()) == 2 and not (tmp_path / "out.json").exists()
        assert not (tmp_path / "out" / "train.json").exists()


def test_convert_with_dev_ratio_refuses_to_overwrite_its_input(capsys, fixtures_dir, tmp_path):
    code, _, _ = run_cli(capsys, "convert", fixtures_dir / "raw" / "alpaca.json", "-o", tmp_path / "sp.json")
    (tmp_path / "sp").mkdir()
    (tmp_path / "sp.json").rename(tmp_path / "sp" / "train.json")
    before = (tmp_path / "sp" / "train.json").read_bytes()
    code, out, err = run_cli(capsys, "convert", tmp_path / "sp" / "train.json", "-o", tmp_path / "sp", "--dev-ratio", 0.2)
    assert code == 1 and _one_error_line(err) == (
        f"error: {tmp_path / 'sp' / 'train.json'}: the output is also an input; choose another path")
    assert (tmp_path / "sp" / "train.json").read_bytes() == before and len(list((tmp_path / "sp").iterdir())) == 1


def test_output_paths_the_system_would_refuse_are_one_line(capsys, fixtures_dir, tmp_path, monkeypatch):
    source = fixtures_dir / "raw" / "alpaca.json"
    (tmp_path / "dirout.json").mkdir()
    (tmp_path / "plain").write_text("x")
    cases = [
        (["convert", source, "-o", tmp_path / "dirout.json"], f"{tmp_path / 'dirout.json'}: is a directory; name a file"),
        (["convert", source, "-o", tmp_path / "o.json", "--rejects", tmp_path / "dirout.json"],
         f"{tmp_path / 'dirout.json'}: is a directory; name a file"),
        (["convert", source, "-o", tmp_path / "plain", "--dev-ratio", 0.2],
         f"{tmp_path / 'plain'}: is a file; with --dev-ratio, -o names a folder (it gets train.* and dev.*)"),
        (["split", tmp_path / "plain.json", "-o", tmp_path / "plain"], f"{tmp_path / 'plain'}: is a file;"),
        (["convert", source, "-o", tmp_path / "plain" / "o.json"],
         f"{tmp_path / 'plain' / 'o.json'}: {tmp_path / 'plain'} is a file, not a folder"),
    ]
    run_cli(capsys, "convert", source, "-o", tmp_path / "plain.json")
    for argv, message in cases:
        code, out, err = run_cli(capsys, *argv)
        assert code == 1 and _one_error_line(err).startswith(f"error: {message}"), (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dirout.json", "plain", "plain.json", "plain.rejects.jsonl"]

    import tempfile

    def refuse(*args, dir, **kwargs):
        raise PermissionError(13, "Permission denied", str(Path(dir) / ".o.json.x.tmp"))

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", refuse)  # as in a folder without write permission
    code, out, err = run_cli(capsys, "convert", source, "-o", tmp_path / "locked" / "o.json")
    assert code == 1 and _one_error_line(err) == f"error: {tmp_path / 'locked' / 'o.json'}: cannot write there: Permission denied"


@pytest.mark.skipif(not hasattr(__import__("os"), "geteuid") or __import__("os").geteuid() == 0,
                    reason="root may write to any folder")
def test_an_unwritable_folder_is_one_line(capsys, fixtures_dir, tmp_path):
    (tmp_path / "locked").mkdir(mode=0o500)
    code, out, err = run_cli(capsys, "convert", fixtures_dir / "raw" / "alpaca.json", "-o", tmp_path / "locked" / "o.json")
    assert code == 1 and _one_error_line(err).endswith("cannot write there: Permission denied")


def test_summary_table_wraps_long_input_names_in_a_pipe(capsys, fixtures_dir, tmp_path):
    source = tmp_path / ("a_rather_long_folder_name_" * 3) / "alpaca_with_a_long_descriptive_name.json"
    source.parent.mkdir()
    source.write_bytes((fixtures_dir / "raw" / "alpaca.json").read_bytes())
    code, out, _ = run_cli(capsys, "convert", source, "-o", tmp_path / "out.json")
    table = out[:out.index("└")].splitlines()  # the convert table, before the repairs and rejects tables
    rows = [line.split("│")[1].strip() for line in table if line.startswith("│")]
    assert code == 0 and all(len(line) <= 80 for line in out.splitlines())
    assert "…" not in out and len(rows) > 1 and "".join(rows) == str(source)  # folded over several lines


def test_convert_prints_the_summary_and_detection(capsys, fixtures_dir, tmp_path):
    code, out, err = run_cli(capsys, "convert", fixtures_dir / "raw" / "sharegpt.json", "-o", tmp_path / "out.json")
    assert code == 0 and "detected format sharegpt" in err
    assert "read 18 = written 9 + rejected 9" in out
    assert "merge same-role turns" in out and "tool turn" in out


def test_convert_json_summary(capsys, fixtures_dir, tmp_path):
    code, out, _ = run_cli(capsys, "convert", fixtures_dir / "raw" / "ocnli.json", "-o", tmp_path / "o.jsonl",
                           "--json", "--system", "判断关系")
    summary = json.loads(out)
    assert code == 0 and (summary["read"], summary["written"], summary["rejected"]) == (6, 3, 3)
    assert summary["rejects"] == {"no consensus label": 1, "no label": 1, "unknown label": 1}
    assert summary["files"][0]["format"] == "ocnli" and summary["rejects_file"].endswith("o.rejects.jsonl")


def test_convert_dev_ratio_and_split_commands(capsys, fixtures_dir, tmp_path):
    code, out, _ = run_cli(capsys, "convert", fixtures_dir / "raw" / "alpaca.json", "-o", tmp_path / "conv",
                           "--dev-ratio", "0.2", "--json")
    assert code == 0 and json.loads(out)["splits"]["dev"]["records"] == 1
    code, out, _ = run_cli(capsys, "split", tmp_path / "conv" / "train.json", "-o", tmp_path / "again",
                           "--dev-ratio", "0.2", "--seed", "3", "--json")
    result = json.loads(out)
    assert code == 0 and (result["train"]["records"], result["dev"]["records"]) == (4, 1)


def test_validate_exit_codes_table_and_json(capsys, monkeypatch, fixtures_dir, tmp_path):
    import minicpm_data.cli

    monkeypatch.setattr(minicpm_data.cli.console, "width", 200)  # one table row per problem
    run_cli(capsys, "convert", fixtures_dir / "raw" / "alpaca.json", "-o", tmp_path / "good.json")
    code, out, _ = run_cli(capsys, "validate", tmp_path / "good.json")
    assert code == 0 and "valid" in out
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": ""}]}) + "\n")
    code, out, _ = run_cli(capsys, "validate", tmp_path / "good.json", bad)
    row = next(line for line in out.splitlines() if "/messages/1/content" in line)
    assert code == 1 and "3 problems" in out and "turn is user, expected assistant" in out
    assert all(cell in row for cell in ("│ 0 ", "│ 1 ", "/messages/1/content", "content is empty or only whitespace"))
    code, out, _ = run_cli(capsys, "validate", bad, "--json")
    problems = json.loads(out)["problems"]
    assert code == 1 and problems[0] == {"file": str(bad), "index": 0, "line": 1, "pointer": "/messages/1/content",
                                         "message": "content is empty or only whitespace"}
