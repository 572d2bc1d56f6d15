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
                 ["stats", folder, *tokenizer], ["inspect", folder, *tokenizer]):
        code, out, err = run_cli(capsys, *argv)
        assert code == 1 and f"{folder}: is a directory; name the files in it" in err, argv
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err + out
    code, out, _ = run_cli(capsys, "validate", folder, "--json")
    assert code == 1 and json.loads(out)["problems"][0]["message"] == "is a directory; name the files in it"


def test_empty_inputs(capsys, tmp_path):
    for name, content in (("zero.json", ""), ("blank.jsonl", "\n \n"), ("list.json", "[]")):
        path = tmp_path / name
        path.write_text(content)
        code, out, err = run_cli(capsys, "convert", path, "-o", tmp_path / "out.json")
        assert code == 0 and "read 0 = written 0" in out and f"warning: {path}: no records" in err
        code, out, _ = run_cli(capsys, "validate", path, "--json")
        assert code == 1 and json.loads(out)["problems"][0]["message"].startswith(("file is empty", "no records"))
        code, out, err = run_cli(capsys, "split", path, "-o", tmp_path / "split")
        assert code == 1 and f"{path}: no records to split" in err and len(err.strip().splitlines()) == 1


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
