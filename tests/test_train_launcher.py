"""`minicpm-train run --num_gpus 2`: the deepspeed launcher with two CPU ranks, ZeRO-3 with CPU offload.

Killed for real (the whole process group) after its first checkpoint, then resumed with
``--resume_from_checkpoint auto``: it continues from that checkpoint, learns, and the saved full model
reloads (in this process, which never ran ZeRO-3) to the evaluation loss the run reported.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from train_helpers import MAX_LENGTH, TASK_DEV, task_argv


CLI = str(Path(sys.executable).with_name("minicpm-train"))


def _dev_loss_as_two_ranks_compute_it(model_dir: Path) -> float:
    """Eval loss as the 2-rank run computed it: one batch of 16 per rank, the mean of the two batch losses."""
    import torch
    from transformers import AutoModelForCausalLM

    from minicpm_data.tokenizer import load_tokenizer
    from minicpm_train.data import PaddingCollator, load_supervised

    tokenizer = load_tokenizer(str(model_dir))
    dataset, _ = load_supervised(TASK_DEV, tokenizer, max_length=MAX_LENGTH, cache_dir=model_dir / ".cache")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    collate = PaddingCollator(tokenizer.pad_token_id)
    with torch.no_grad():
        losses = [model(**collate([dataset[i] for i in range(start, start + 16)])).loss.item() for start in (0, 16)]
    return sum(losses) / 2


@pytest.mark.slow
def test_two_cpu_ranks_zero3_offload_killed_and_resumed(tmp_path, tiny_llama, data_cache):
    output = tmp_path / "z3"
    argv = [CLI, "run", *task_argv(tiny_llama, output, data_cache, steps=24), "--save_steps", "4",
            "--num_gpus", "2", "--master_port", "29641", "--deepspeed", "zero3_offload"]
    argv[argv.index("--eval_steps") + 1] = "4"
    log = (tmp_path / "first.log").open("w")
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    checkpoint = output / "checkpoint-4" / "trainer_state.json"
    deadline = time.monotonic() + 240
    while not checkpoint.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)  # let the checkpoint finish writing
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert checkpoint.is_file(), (tmp_path / "first.log").read_text()[-3000:]
    assert not (output / "metrics.json").exists()  # really killed before the end
    saved = sorted(int(p.name.split("-")[1]) for p in output.glob("checkpoint-*") if (p / "trainer_state.json").is_file())

    resumed = subprocess.run(argv + ["--resume_from_checkpoint", "auto"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resume: {output / f'checkpoint-{saved[-1]}'}" in resumed.stdout
    assert "--num_gpus 2 starts 2 CPU processes" in resumed.stdout

    metrics = json.loads((output / "metrics.json").read_text())
    history = metrics["log_history"]
    evals = [e["eval_loss"] for e in history if "eval_loss" in e]
    assert evals[-1] < evals[0]
    assert json.loads((output / "run_config.json").read_text())["training"]["deepspeed"].endswith("zero3_offload.json")
    assert metrics["final"]["eval_loss"] == pytest.approx(_dev_loss_as_two_ranks_compute_it(output), abs=1e-3)


# Loaded by every Python process of the run (PYTHONPATH): each rank logs when it renders and a digest of the
# training rows it got, so the test sees inside the ranks without any hook in the library.
_RANK_PROBE = '''
import hashlib, os
import minicpm_data.render as render
import minicpm_train.data as data

LOG = os.environ["RANK_PROBE_LOG"]
real_stream, real_load = render.render_stream, data.load_data

def _log(line):
    with open(LOG, "a") as f:
        f.write(f"{os.environ.get('RANK', '-')} {line}\\n")

def render_stream(*args, **kwargs):
    _log("render")
    yield from real_stream(*args, **kwargs)

def load_data(spec, *args, **kwargs):
    files, summary = real_load(spec, *args, **kwargs)
    digest = hashlib.sha256()
    for dataset, _ in files:
        for index in range(len(dataset)):
            row = dataset[index]
            digest.update(row["input_ids"].tobytes() + row["labels"].tobytes())
    _log(f"data {os.path.basename(spec)} {digest.hexdigest()}")
    return files, summary

render.render_stream, data.load_data = render_stream, load_data
'''


@pytest.mark.slow
def test_two_ranks_render_once_and_train_on_identical_data(tmp_path, tiny_llama):
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "sitecustomize.py").write_text(_RANK_PROBE)
    log, cache = tmp_path / "ranks.log", tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(probe), os.environ.get("PYTHONPATH", "")]),
           "RANK_PROBE_LOG": str(log)}
    argv = [CLI, "run", *task_argv(tiny_llama, tmp_path / "out", cache, steps=2), "--num_gpus", "2",
            "--master_port", "29643", "--deepspeed", "zero2", "--save_strategy", "no"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    lines = log.read_text().splitlines()
    assert sorted(line for line in lines if line.endswith("render")) == ["0 render", "0 render"]  # train, dev
    digests = {rank: [line.split()[2:] for line in lines if line.startswith(f"{rank} data")] for rank in "01"}
    assert len(digests["0"]) == 2 and digests["0"] == digests["1"]  # the same rows on both ranks
    entries = sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock"))
    assert len(entries) == 2 and not any(".tmp-" in name for name in entries)  # each file's cache written once
    summary = json.loads((tmp_path / "out" / "data_summary.json").read_text())
    assert summary["train"]["used"] == 128 and not summary["train"]["from_cache"]
