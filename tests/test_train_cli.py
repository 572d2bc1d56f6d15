"""`minicpm-train run --script`: the guide's own script, verbatim, runs end to end on a CPU-only machine;
run and plan flags in either spelling; flag mistakes as one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from train_helpers import MAX_LENGTH, TASK_DEV, TASK_TRAIN, run_cli


CLI = str(Path(sys.executable).with_name("minicpm-train"))
GUIDE_SCRIPT = Path(__file__).resolve().parents[1] / "fixtures" / "scripts" / "lora_finetune_ocnli.sh"


def test_guide_script_runs_on_cpu(tmp_path, tiny_llama, data_cache):
    overrides = ["--model_name_or_path", str(tiny_llama), "--train_data_path", str(TASK_TRAIN),
                 "--eval_data_path", str(TASK_DEV), "--model_max_length", str(MAX_LENGTH), "--max_steps", "6",
                 "--eval_steps", "3", "--save_steps", "3", "--logging_steps", "1", "--warmup_steps", "0",
                 "--learning_rate", "5e-3", "--data_cache_dir", str(data_cache)]
    result = subprocess.run([CLI, "run", "--script", str(GUIDE_SCRIPT), *overrides], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    out = " ".join(result.stdout.split())  # undo Rich's wrapping
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for shown in ("export NCCL_P2P_DISABLE", "--evaluation_strategy", "use_lora", "--deepspeed",
                  "configs/ds_config_zero2_offload.json"):
        assert shown in out, shown
    for notice in ("comment after '\\' ends the command in bash", "--include localhost:1 ignored",
                   "using the shipped preset 'zero2_offload'", "--evaluation_strategy is the old name",
                   "--bf16 ignored, training in float32", "QLoRA"):
        assert notice in out, notice
    runs = list((tmp_path / "output" / "OCNLILoRA").iterdir())
    assert len(runs) == 1 and runs[0].name.isdigit() and len(runs[0].name) == 14  # $formatted_time
    assert (runs[0] / "adapter_model.safetensors").is_file() and (runs[0] / "checkpoint-3").is_dir()
    config = json.loads((runs[0] / "run_config.json").read_text())
    assert config["options"]["qlora"] and config["env"]["NCCL_P2P_DISABLE"] == "1"
    assert config["training_arguments"]["train_sampling_strategy"] == "group_by_length"
    assert config["training_arguments"]["eval_strategy"] == "steps"
    assert "eval loss" in out and "tok/s" in out
    assert "Setting accelerator to CPU" not in result.stdout + result.stderr  # DS_ACCELERATOR=cpu, set by run
    assert any("--include localhost:1 ignored" in notice for notice in config["notices"])  # hardware notices too


def test_short_run_shows_its_loss_and_its_adapter_finds_the_base_from_anywhere(tiny_llama, tmp_path, data_cache,
                                                                                monkeypatch, capsys):
    (tmp_path / "model").symlink_to(tiny_llama)
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(monkeypatch, capsys, "run", "--model_name_or_path", "model", "--output_dir", "out",
                             "--train_data_path", str(TASK_TRAIN), "--use_lora", "--max_steps", "3",
                             "--data_cache_dir", str(data_cache))
    assert code == 0, err
    assert "train" in out and "loss " in out and "tok/s" in out  # the progress display had a loss to show
    history = json.loads((tmp_path / "out" / "metrics.json").read_text())["log_history"]
    assert [entry["step"] for entry in history if "loss" in entry] == [1]  # logging_first_step, then every 10
    base = json.loads((tmp_path / "out" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == str(tmp_path / "model")


def test_run_and_plan_flags_take_both_spellings(tiny_llama, tmp_path, monkeypatch, capsys):
    flags = ["--model_name_or_path", str(tiny_llama), "--output_dir", str(tmp_path / "out"),
             "--train_data_path", str(TASK_TRAIN), "--max_steps", "3", "--num_gpus", "1"]
    dashed = [flag.replace("_", "-") if flag.startswith("--") else flag for flag in flags]
    shown = []
    for argv in (["run", "--dry_run", *flags], ["run", "--dry-run", *dashed]):
        code, out, err = run_cli(monkeypatch, capsys, *argv)
        assert code == 0 and "run: in-process" in out, err
        shown.append(out)
    assert shown[0] == shown[1]
    plans = [run_cli(monkeypatch, capsys, "plan", gpu_memory, "8", "--json", *argv)[1]
             for gpu_memory, argv in (("--gpu_memory", flags), ("--gpu-memory", dashed))]
    assert plans[0] == plans[1] and json.loads(plans[0])["verdict"] == "fits"
    code, _, err = run_cli(monkeypatch, capsys, "run", *flags, "--resume-from-checkpoint", str(tmp_path / "none"))
    assert code == 1 and err.count("\n") == 1 and "--resume_from_checkpoint" in err and "does not exist" in err


def test_config_is_an_option_of_run_and_plan_and_flags_override_it(tiny_llama, tmp_path, monkeypatch, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"model_name_or_path: {tiny_llama}\ntrain_data_path: {TASK_TRAIN}\nuse_lora: true\n"
                      f"output_dir: {tmp_path / 'from-config'}\n", encoding="utf-8")
    code, out, err = run_cli(monkeypatch, capsys, "run", "--dry-run", "--config", str(config),
                             "--output_dir", str(tmp_path / "from-flag"))
    assert code == 0, err
    out = " ".join(out.split())
    assert ", LoRA ->" in out and "from-flag" in out and "from-config" not in out
    code, out, err = run_cli(monkeypatch, capsys, "plan", f"--config={config}", "--gpu-memory", "8", "--json")
    assert code == 0, err
    assert json.loads(out)["settings"]["method"] == "lora"
