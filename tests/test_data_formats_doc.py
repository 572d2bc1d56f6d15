"""docs/data-formats.md: its commands run as written, and it lists every reject reason and repair it adds."""

from __future__ import annotations

import os
import re
import shlex

from test_data_cli import run_cli

from minicpm_data.repair import REASONING_POLICIES, REPAIRS
from minicpm_data.sources import REJECT_REASONS


def _doc(repo_root):
    return (repo_root / "docs" / "data-formats.md").read_text(encoding="utf-8")


def test_every_command_runs(capsys, repo_root, tmp_path, monkeypatch):
    commands = [line for line in _doc(repo_root).splitlines() if line.startswith("minicpm-data ")]
    assert len(commands) >= 8
    monkeypatch.chdir(repo_root)
    for command in commands:
        argv = [arg.replace("out/", f"{tmp_path}{os.sep}") for arg in shlex.split(command)[1:]]
        code, out, err = run_cli(capsys, *argv)
        assert code == 0, (command, err)


def test_every_reject_reason_and_repair_is_documented(repo_root):
    documented = _doc(repo_root) + (repo_root / "docs" / "data.md").read_text(encoding="utf-8")
    rows = set(re.findall(r"^\| `([^`]+)` \|", documented, flags=re.MULTILINE))
    assert set(REJECT_REASONS) <= rows
    assert {"drop reasoning", "reasoning into <think>"} <= set(REPAIRS)
    assert all(f"`{kind}`" in documented for kind in REPAIRS)
    assert all(f"`{policy}`" in documented for policy in REASONING_POLICIES)
