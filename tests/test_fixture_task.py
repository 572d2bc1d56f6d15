"""The demo's raw task table (fixtures/raw/nli.csv) converts into exactly the records the tests train on."""

from __future__ import annotations

import importlib
import json
import re

import pytest

from minicpm_data.convert import ConvertOptions, convert_and_split


@pytest.fixture
def build_task(fixtures_dir, monkeypatch):
    monkeypatch.syspath_prepend(str(fixtures_dir / "train"))
    return importlib.import_module("build_task")


def _canonical(records: list[dict]) -> list[str]:
    return sorted(json.dumps(record, ensure_ascii=False, sort_keys=True) for record in records)


def _read(directory) -> list[list[dict]]:
    return [json.loads((directory / name).read_text(encoding="utf-8")) for name in ("train.json", "dev.json")]


def test_raw_table_converts_to_the_training_fixtures(fixtures_dir, tmp_path, build_task):
    options = ConvertOptions(source="csv", assistant_col="label", template=build_task.USER_TEMPLATE,
                             system=build_task.SYSTEM)
    summary = convert_and_split([fixtures_dir / "raw" / "nli.csv"], tmp_path, dev_ratio=0.2, options=options)
    train, dev = _read(tmp_path)
    shipped_train, shipped_dev = _read(fixtures_dir / "train")

    assert (summary.read, summary.rejected, len(train), len(dev)) == (160, 0, 128, 32)
    assert _canonical(train + dev) == _canonical(shipped_train + shipped_dev)


def test_demo_converts_the_table_with_the_task_template_and_system(fixtures_dir, build_task):
    demo = (fixtures_dir.parent / "scripts" / "demo.sh").read_text()
    command = re.search(r"minicpm-data convert fixtures/raw/nli\.csv.*?-o ", demo, re.S).group(0)
    assert "--template $'" + build_task.USER_TEMPLATE.replace("\n", "\\n") + "'" in command
    assert f'--system "{build_task.SYSTEM}"' in command
    assert "--assistant-col label" in command
