"""`minicpm-train run` on several training files with weights and several eval files, each reported."""

from __future__ import annotations

import json
import os

from train_helpers import TASK_DEV, TASK_TRAIN, task_argv


def test_weighted_training_files_and_one_loss_per_eval_file(tmp_path, tiny_llama, data_cache):
    from minicpm_train.args import parse_run_args
    from minicpm_train.launch import plan_run
    from minicpm_train.recipe import train

    records, dev = json.loads(TASK_TRAIN.read_text()), json.loads(TASK_DEV.read_text())
    folder = tmp_path / "data"
    folder.mkdir()
    for name, part in (("a.json", records[:64]), ("b.jsonl", records[64:])):
        text = json.dumps(part) if name.endswith(".json") else "\n".join(map(json.dumps, part)) + "\n"
        (folder / name).write_text(text)
    (tmp_path / "dev_one.json").write_text(json.dumps(dev[:16]))
    (tmp_path / "dev_two.json").write_text(json.dumps(dev[16:]))
    argv = task_argv(tiny_llama, tmp_path / "out", data_cache, steps=4)
    argv[argv.index("--train_data_path") + 1] = f"{folder / 'a.json'}:2,{folder / 'b.jsonl'}"
    argv[argv.index("--eval_data_path") + 1] = f"{tmp_path / 'dev_one.json'},{tmp_path / 'dev_two.json'}"
    messages = []
    saved = dict(os.environ)
    try:  # as train_helpers.run_in_process, with the run's report lines kept
        run, _ = plan_run(parse_run_args(argv))
        result = train(run, report=messages.append)
    finally:
        os.environ.clear()
        os.environ.update(saved)

    assert {"eval_dev_one_loss", "eval_dev_two_loss"} <= set(result.metrics)
    summary = json.loads((tmp_path / "out" / "data_summary.json").read_text())
    assert (summary["train"]["used"], summary["train"]["epoch_samples"]) == (128, 192)
    assert [(f["used"], f["weight"]) for f in summary["train"]["files"]] == [(64, 2.0), (64, 1.0)]
    assert [f["used"] for f in summary["eval"]["files"]] == [16, 16]
    data_lines = [m for m in messages if m.startswith("data ")]
    assert len(data_lines) == 6 and "weight 2 (128 per epoch)" in data_lines[0]
