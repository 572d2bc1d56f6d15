"""The training command line: guide flags, legacy names, --config, DeepSpeed presets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from minicpm_train.args import PRESET_DIR, ArgumentError, parse_run_args, resolve_deepspeed

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
REQUIRED = ["--model_name_or_path", "m", "--output_dir", "out", "--train_data_path", "t.json"]

# Every flag of the guide's lora_finetune_ocnli.sh, as it writes them.
GUIDE_FLAGS = [
    "--model_name_or_path", "MiniCPM-2B-sft-bf16", "--output_dir", "output/OCNLILoRA/x/",
    "--train_data_path", "data/train.json", "--eval_data_path", "data/dev.json", "--learning_rate", "5e-5",
    "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "128", "--model_max_length", "128",
    "--bf16", "--use_lora", "--qlora", "--gradient_accumulation_steps", "1", "--warmup_steps", "100",
    "--max_steps", "1000", "--weight_decay", "0.01", "--evaluation_strategy", "steps", "--eval_steps", "500",
    "--save_strategy", "steps", "--save_steps", "500", "--seed", "42", "--log_level", "info",
    "--logging_strategy", "steps", "--logging_steps", "10", "--deepspeed", "configs/ds_config_zero2_offload.json",
]


def test_every_guide_flag_parses():
    run = parse_run_args(GUIDE_FLAGS)
    assert run.options.model_name_or_path == "MiniCPM-2B-sft-bf16"
    assert run.options.eval_data_path == "data/dev.json"
    assert (run.options.model_max_length, run.options.use_lora, run.options.qlora) == (128, True, True)
    t = run.training
    assert t["learning_rate"] == 5e-5 and t["bf16"] is True and t["max_steps"] == 1000
    assert t["per_device_train_batch_size"] == 16 and t["per_device_eval_batch_size"] == 128
    assert t["eval_strategy"] == "steps" and t["eval_steps"] == 500 and t["save_steps"] == 500
    assert t["seed"] == 42 and t["log_level"] == "info" and t["logging_steps"] == 10
    assert t["weight_decay"] == 0.01 and t["warmup_steps"] == 100
    assert t["deepspeed"] == str(PRESET_DIR / "zero2_offload.json")
    assert "evaluation_strategy" not in t


def test_legacy_name_maps_with_one_notice():
    run = parse_run_args(REQUIRED + ["--evaluation-strategy=steps", "--group_by_length"])
    assert run.training["eval_strategy"] == "steps"
    assert run.training["train_sampling_strategy"] == "group_by_length"
    assert sum("--evaluation_strategy is the old name of --eval_strategy" in n for n in run.notices) == 1


def test_any_training_arguments_flag_works():
    run = parse_run_args(REQUIRED + ["--lr_scheduler_type", "cosine", "--max_grad_norm", "0.5",
                                     "--gradient_checkpointing", "--dataloader_num_workers", "2"])
    assert run.training["lr_scheduler_type"] == "cosine"
    assert run.training["max_grad_norm"] == 0.5 and run.training["activation_checkpointing"] is True
    assert "--gradient_checkpointing is the old name of --activation_checkpointing" in " ".join(run.notices)


def test_unknown_flag_names_the_closest():
    with pytest.raises(ArgumentError, match="did you mean --learning_rate"):
        parse_run_args(REQUIRED + ["--learning_rat", "1e-4"])


def test_missing_required_flags_listed():
    with pytest.raises(ArgumentError, match="--model_name_or_path, --train_data_path, --output_dir"):
        parse_run_args(["--bf16"])


def test_qlora_implies_lora_with_guide_defaults():
    run = parse_run_args(REQUIRED + ["--qlora"])
    o = run.options
    assert (o.use_lora, o.lora_r, o.lora_alpha, o.lora_dropout, o.lora_target) == (True, 64, 32, 0.1, None)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_config_file_with_flags_overriding(tmp_path, suffix):
    values = {"model_name_or_path": "m", "output_dir": "out", "train_data_path": "t.json", "learning_rate": 1e-4,
              "use_lora": True, "evaluation_strategy": "steps", "report_to": ["none"], "lora_r": 8}
    config = tmp_path / f"run{suffix}"
    if suffix == ".json":
        config.write_text(json.dumps(values))
    else:
        import yaml

        config.write_text(yaml.safe_dump(values))
    run = parse_run_args(["--config", str(config), "--learning_rate", "3e-4"])
    assert run.training["learning_rate"] == 3e-4  # the flag wins
    assert run.options.use_lora is True and run.options.lora_r == 8
    assert run.training["eval_strategy"] == "steps"


def test_deepspeed_none_switches_off_a_config_files_deepspeed(tmp_path):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"model_name_or_path": "m", "output_dir": "out", "train_data_path": "t.json",
                                  "deepspeed": "zero2_offload"}))
    assert parse_run_args(["--config", str(config)]).training["deepspeed"].endswith("zero2_offload.json")
    assert "deepspeed" not in parse_run_args(["--config", str(config), "--deepspeed", "none"]).training


def test_config_file_errors(tmp_path):
    with pytest.raises(ArgumentError, match="config file not found"):
        parse_run_args(["--config", str(tmp_path / "none.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n- not a mapping\n")
    with pytest.raises(ArgumentError, match="expected a mapping"):
        parse_run_args(["--config", str(bad)])


def test_deepspeed_presets_and_guide_paths(tmp_path):
    notices: list[str] = []
    for name in ("zero2", "zero2_offload", "zero3", "zero3_offload"):
        path = Path(resolve_deepspeed(name, notices))
        config = json.loads(path.read_text())
        assert config["zero_optimization"]["stage"] == int(name[4])
        assert ("offload_optimizer" in config["zero_optimization"]) == name.endswith("offload")
        assert config["train_micro_batch_size_per_gpu"] == "auto"
    assert notices == []
    assert resolve_deepspeed("configs/ds_config_zero3.json", notices) == str(PRESET_DIR / "zero3.json")
    assert "does not exist here; using the shipped preset 'zero3'" in notices[0]
    own = tmp_path / "mine.json"
    own.write_text("{}")
    assert resolve_deepspeed(str(own), notices) == str(own)
    with pytest.raises(ArgumentError, match="not a preset"):
        resolve_deepspeed("configs/other.json", notices)


def test_deepspeed_cannot_evaluate_before_training():
    with pytest.raises(ArgumentError, match="DeepSpeed cannot evaluate before training"):
        parse_run_args(REQUIRED + ["--deepspeed", "zero2", "--eval_on_start"])


def test_bad_value_is_one_line_error():
    with pytest.raises(ArgumentError, match="--learning_rate.*invalid float value: 'fast'"):
        parse_run_args(REQUIRED + ["--learning_rate", "fast"])


def test_plan_needs_only_the_model():
    run = parse_run_args(["--model_name_or_path", "m", "--use_lora"], require_data=False)
    assert run.options.use_lora and run.options.train_data_path is None
    with pytest.raises(ArgumentError, match="missing required flag: --model_name_or_path"):
        parse_run_args(["--use_lora"], require_data=False)


def test_flags_take_both_spellings(tmp_path):
    """Dashes or underscores, for our options, HF TrainingArguments, launcher flags and config keys alike."""
    config = tmp_path / "run.yaml"
    config.write_text("lora-r: 8\nper-device-train-batch-size: 4\n")
    dashed = parse_run_args(["--model-name-or-path", "m", "--output-dir", "out", "--train-data-path=t.json",
                             "--config", str(config), "--max-steps", "5", "--num-gpus", "2", "--master-port", "1234",
                             "--per-gpu-eval-batch-size", "3"])
    underscored = parse_run_args(["--model_name_or_path", "m", "--output_dir", "out", "--train_data_path=t.json",
                                  "--lora_r", "8", "--per_device_train_batch_size", "4", "--max_steps", "5",
                                  "--num_gpus", "2", "--master_port", "1234", "--per_gpu_eval_batch_size", "3"])
    assert dashed.to_dict() == underscored.to_dict()
    assert (dashed.options.lora_r, dashed.launch.num_gpus, dashed.launch.master_port) == (8, 2, 1234)
    assert dashed.training["per_device_eval_batch_size"] == 3 and dashed.notices == underscored.notices


def test_resume_from_checkpoint_must_be_a_checkpoint(tmp_path):
    from minicpm_train.args import latest_checkpoint
    from train_helpers import complete_checkpoint

    run_dir = tmp_path / "run"
    for step in (2, 10, 11):
        complete_checkpoint(run_dir / f"checkpoint-{step}", step)
    (run_dir / "checkpoint-11" / "optimizer.pt").write_bytes(b"PK\x03\x04 cut short")  # truncated
    (run_dir / "checkpoint-12").mkdir()  # killed while saving
    assert latest_checkpoint(run_dir) == run_dir / "checkpoint-10"  # by step, not by name; complete only
    assert latest_checkpoint(tmp_path / "missing") is None
    for value in (str(run_dir / "checkpoint-2"), "auto", "false"):
        parse_run_args(REQUIRED + ["--resume_from_checkpoint", value])
    for value, message in ((tmp_path / "missing", "does not exist"), (run_dir / "checkpoint-12", "no trainer_state"),
                           (run_dir / "checkpoint-11", "is damaged: optimizer.pt is truncated.*latest complete one is "
                                                       f"{run_dir / 'checkpoint-10'}"),
                           (run_dir, f"run folder, not a checkpoint.*latest is {run_dir / 'checkpoint-10'}")):
        with pytest.raises(ArgumentError, match=f"--resume_from_checkpoint .*{message}"):
            parse_run_args(REQUIRED + ["--resume_from_checkpoint", str(value)])


@pytest.mark.parametrize("name, text, message", [
    ("bad.yaml", "learning_rate: 1e-4\nuse_lora: [true\n", r"bad.yaml: not valid YAML \(line 3\): "),
    ("bad.json", '{"learning_rate": 1e-4,\n "use_lora": }', r"bad.json: not valid JSON \(line 2\): Expecting value"),
    ("run.yaml", "learning_rat: 1e-4\n", r"run.yaml: unknown key 'learning_rat'; did you mean learning_rate\?"),
])
def test_config_file_errors_are_one_line_and_name_the_file(tmp_path, name, text, message):
    config = tmp_path / name
    config.write_text(text)
    with pytest.raises(ArgumentError, match=message) as error:
        parse_run_args(["--config", str(config)] + REQUIRED)
    assert "\n" not in str(error.value) and "unrecognised argument" not in str(error.value)


def test_qlora_with_zero3_and_missing_hostfile_refused_at_parse_time(tmp_path):
    own = tmp_path / "ds.json"
    own.write_text('{"zero_optimization": {"stage": 3}}')
    for deepspeed in ("zero3", "zero3_offload", str(own), '{"zero_optimization": {"stage": 3}}'):
        with pytest.raises(ArgumentError) as error:
            parse_run_args(REQUIRED + ["--qlora", "--deepspeed", deepspeed])
        assert str(error.value) == ("QLoRA with ZeRO-3 is not supported: use --deepspeed zero2_offload (the "
                                    "guide's QLoRA setting) or zero2")
    assert parse_run_args(REQUIRED + ["--qlora", "--deepspeed", "zero2_offload"]).options.qlora
    assert parse_run_args(REQUIRED + ["--use_lora", "--deepspeed", "zero3"]).options.use_lora
    with pytest.raises(ArgumentError, match=r"^--hostfile .*nodes does not exist: it lists the nodes"):
        parse_run_args(REQUIRED + ["--hostfile", str(tmp_path / "nodes")])
    (tmp_path / "nodes").write_text("worker-1 slots=8\n")
    assert parse_run_args(REQUIRED + ["--hostfile", str(tmp_path / "nodes")]).launch.hostfile.endswith("nodes")
    with pytest.raises(ArgumentError, match="--num_gpus: invalid int value: 'two'"):
        parse_run_args(REQUIRED + ["--num_gpus", "two"])
