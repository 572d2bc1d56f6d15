"""`minicpm-train run --help` / `plan --help`: the run's flags in groups with their defaults, on an 80-column
terminal; `--help_all`: every Hugging Face TrainingArguments flag, from transformers' own parser."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from minicpm_train.args import LaunchOptions, RunOptions
from minicpm_train.flag_help import FLAG_GROUPS, FLAG_HELP, flag_lines, own_fields
from train_helpers import run_cli

CLI = str(Path(sys.executable).with_name("minicpm-train"))
_BOX = re.compile(r"^[│╭╰]|[│╮╯]$")


def _help(*args: str) -> tuple[list[str], str]:
    """The help as a terminal of 80 columns shows it: its lines, and its text with the panels' borders and
    the wrapping undone (one space between words)."""
    result = subprocess.run([CLI, *args], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "COLUMNS": "80", "NO_COLOR": "1"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    return lines, " ".join(" ".join(_BOX.sub("", line) for line in lines).split())


def _rows(text: str) -> dict[str, str]:
    """Each grouped flag's row (its help and default), cut from ``text`` up to the next row's flag."""
    flags = [line.flag for group in FLAG_GROUPS for line in flag_lines(group)]
    starts = [text.index(flag + " ", text.index("The guide's finetune.py flags")) for flag in flags]
    assert starts == sorted(starts), "rows are shown in the groups' order"
    ends = starts[1:] + [text.index("[HF]: a Hugging Face TrainingArguments flag")]
    return {flag.split()[0][2:]: text[start:end] for flag, start, end in zip(flags, starts, ends)}


def test_every_own_flag_is_in_exactly_one_group_and_every_other_one_is_a_training_argument():
    from transformers import TrainingArguments

    grouped = [name for names in FLAG_GROUPS.values() for name in names]
    own = [f.name for options in (RunOptions, LaunchOptions) for f in dataclasses.fields(options)]
    assert sorted(name for name in grouped if name in own) == sorted(own)  # each once, none missing
    training = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    others = [name for name in grouped if name not in own]
    assert len(others) == len(set(others)) and set(others) <= training
    assert set(others) <= set(FLAG_HELP)  # described here: --help does not import transformers


@pytest.mark.parametrize("command", ["run", "plan"])
def test_help_shows_every_own_flag_with_its_default_in_80_columns(command):
    lines, text = _help(command, "--help")
    assert max(len(line) for line in lines) <= 80
    for title in FLAG_GROUPS:
        assert title in text
    rows = _rows(text)
    for name in own_fields():
        assert "[default: " in rows[name], name
    expected = {"model_max_length": "512", "use_lora": "off", "qlora": "off", "lora_r": "64", "lora_alpha": "32",
                "lora_dropout": "0.1", "packing": "off", "truncation": "right", "trust_remote_code": "off",
                "template": "detected", "master_port": "29500"}
    for name, default in expected.items():
        assert f"[default: {default}]" in rows[name], (name, rows[name])
    for name in ("learning_rate", "bf16", "deepspeed", "output_dir"):  # the guide's Hugging Face flags
        assert rows[name].endswith("[HF] "), rows[name]
    assert "(default:" not in rows["data_cache_dir"]  # said once, in the default
    for option in ("--script", "--config", "--help_all"):
        assert option in text
    assert "Every TrainingArguments flag is accepted" in text
    assert f"minicpm-train {command} --help_all lists them" in text


@pytest.mark.parametrize("command", ["run", "plan"])
def test_help_all_lists_every_training_argument_from_transformers(command):
    from transformers import TrainingArguments

    lines, text = _help(command, "--help_all")
    listed = {match[1] for line in lines if (match := re.match(r"\s+(--\w+)", line))}
    fields = {f"--{f.name}" for f in dataclasses.fields(TrainingArguments) if f.init}
    assert fields <= listed, sorted(fields - listed)
    assert "--learning_rate FLOAT" in text and "(default: 5e-05)" in text
    assert "--bf16 [true|false]" in text and "Choices: linear, cosine," in text
    assert f"accepted by minicpm-train {command}" in text
    assert "--lora_r" not in listed  # only transformers' flags: the toolkit's own are in --help


def test_a_misspelt_flag_still_gets_the_closest_real_one(monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "run", "--model_name_or_path", "m", "--output_dir", "o",
                           "--train_data_path", "t.json", "--lora_rr", "8")
    assert code == 1 and err.count("\n") == 1
    assert "unrecognised argument --lora_rr; did you mean --lora_r?" in err


# --- every help page of both CLIs: one spelling per CLI, nothing cut at 80 columns ------------------------------

def _apps() -> dict:
    from minicpm_data.cli import app as data_app
    from minicpm_train.cli import app as train_app

    return {"data": data_app, "train": train_app}


def _commands(cli: str) -> dict:
    import typer

    return typer.main.get_command(_apps()[cli]).commands


_PAGES = [(cli, name) for cli in ("data", "train") for name in (None, *_commands(cli))]


@pytest.mark.parametrize("cli, command", _PAGES, ids=lambda value: value or "-")
def test_every_help_page_fits_80_columns_and_cuts_nothing(monkeypatch, cli, command):
    from typer.testing import CliRunner

    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setenv("NO_COLOR", "1")
    result = CliRunner().invoke(_apps()[cli], [*filter(None, [command]), "--help"])
    lines = result.output.splitlines()
    assert result.exit_code == 0 and len(lines) > 5, result.output
    assert max(map(len, lines)) <= 80
    assert "…" not in result.output  # Rich cuts a flag name or a word that does not fit with an ellipsis


@pytest.mark.parametrize("cli", ["data", "train"])
def test_every_flag_is_declared_in_its_clis_one_spelling(cli):
    """minicpm-train writes flags with underscores (the guide's finetune.py and Hugging Face's spelling), minicpm-data
    with hyphens; each takes the other spelling too (flag_name), which a help page never shows."""
    wrong = "-" if cli == "train" else "_"
    declared = [(name, option) for name, command in _commands(cli).items() for param in command.params
                for option in (*param.opts, *param.secondary_opts) if option.startswith("--")]
    assert len(declared) > 10
    assert [(name, option) for name, option in declared if wrong in option[2:]] == []


def test_minicpm_data_takes_the_underscore_spelling_too(capsys, tmp_path):
    from test_data_cli import run_cli as run_data_cli

    code, _, err = run_data_cli(capsys, "convert", tmp_path / "missing.json", "-o", tmp_path / "o", "--dev_ratio",
                                "0.5", "--tool_turns", "drop")
    assert code == 1 and err == f"error: {tmp_path / 'missing.json'}: no such file\n"  # parsed, then refused
