"""Hardware decisions, from simulated device descriptions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from minicpm_train.args import LaunchOptions
from minicpm_train.launch import Device, HardwareError, decide, launcher_command

A100 = Device("NVIDIA A100-SXM4-80GB", (8, 0), 80)
RTX4090 = Device("NVIDIA GeForce RTX 4090", (8, 9), 24)
RTX3090 = Device("NVIDIA GeForce RTX 3090", (8, 6), 24)
RTX2080 = Device("NVIDIA GeForce RTX 2080 Ti", (7, 5), 11)
V100 = Device("Tesla V100-SXM2-32GB", (7, 0), 32)


def test_cpu_ignores_device_selection_and_runs_float32():
    plan = decide(LaunchOptions(include="localhost:1", master_port=19888), [], bf16=True)
    assert (plan.mode, plan.device, plan.precision, plan.ranks) == ("in_process", "cpu", "fp32", 1)
    assert any("--include localhost:1 ignored" in n for n in plan.notices)
    assert any("--bf16 ignored, training in float32" in n for n in plan.notices)


def test_cpu_fp16_is_refused_with_the_reason():
    with pytest.raises(HardwareError, match="--fp16 on CPU.*drop --fp16"):
        decide(LaunchOptions(), [], fp16=True)
    assert decide(LaunchOptions(), [], precision="auto").precision == "fp32"


def test_cpu_several_ranks_use_the_launcher():
    plan = decide(LaunchOptions(num_gpus=2, master_port=29555), [])
    assert (plan.mode, plan.ranks) == ("launcher", 2)
    assert plan.launcher_argv == ["--num_gpus", "2", "--master_port", "29555"]


def test_one_gpu_runs_in_process_on_the_included_device():
    plan = decide(LaunchOptions(include="localhost:1"), [A100, A100], bf16=True)
    assert (plan.mode, plan.precision, plan.env["CUDA_VISIBLE_DEVICES"]) == ("in_process", "bf16", "1")
    assert "NCCL_P2P_DISABLE" not in plan.env


def test_several_gpus_start_the_deepspeed_launcher():
    plan = decide(LaunchOptions(include="localhost:0,1", master_port=19888), [A100] * 4, bf16=True)
    assert (plan.mode, plan.ranks) == ("launcher", 2)
    command = launcher_command(plan, Path("r.json"))
    assert Path(command[0]).name == "deepspeed"
    assert command[1:] == ["--include", "localhost:0,1", "--master_port", "19888", "--no_local_rank",
                           "--module", "minicpm_train.recipe", "r.json"]
    assert decide(LaunchOptions(num_gpus=3), [A100] * 4).ranks == 3


def test_hostfile_goes_multi_node():
    plan = decide(LaunchOptions(hostfile="hosts", num_nodes=2, master_addr="10.0.0.1"), [A100], bf16=True)
    assert plan.mode == "launcher"
    assert plan.launcher_argv == ["--hostfile", "hosts", "--num_nodes", "2", "--master_addr", "10.0.0.1",
                                  "--master_port", "29500"]


def test_rtx_40_series_multi_gpu_sets_nccl_and_says_so():
    plan = decide(LaunchOptions(num_gpus=2), [RTX4090, RTX4090], bf16=True)
    assert plan.env["NCCL_P2P_DISABLE"] == "1" and plan.env["NCCL_IB_DISABLE"] == "1"
    assert any("NCCL_P2P_DISABLE=1 NCCL_IB_DISABLE=1" in n for n in plan.notices)
    single = decide(LaunchOptions(), [RTX4090], bf16=True)
    assert "NCCL_P2P_DISABLE" not in single.env
    ampere = decide(LaunchOptions(), [RTX3090, RTX3090])
    assert "NCCL_P2P_DISABLE" not in ampere.env


@pytest.mark.parametrize("device", [RTX2080, V100])
def test_bf16_without_hardware_support_stops_with_the_fix(device):
    with pytest.raises(HardwareError, match=r"has no bf16; use --fp16"):
        decide(LaunchOptions(), [device], bf16=True)
    auto = decide(LaunchOptions(), [device], precision="auto")
    assert auto.precision == "fp16" and "auto uses fp16" in auto.notices[0]
    assert decide(LaunchOptions(), [device], fp16=True).precision == "fp16"


def test_auto_precision_picks_bf16_where_available_and_default_is_fp32():
    assert decide(LaunchOptions(), [A100], precision="auto").precision == "bf16"
    assert decide(LaunchOptions(), [A100]).precision == "fp32"


def test_impossible_device_selection():
    with pytest.raises(HardwareError, match="names GPU 3, but this machine has 2"):
        decide(LaunchOptions(include="localhost:3"), [A100, A100])
    with pytest.raises(HardwareError, match="only 2 GPU"):
        decide(LaunchOptions(num_gpus=4), [A100, A100])
    with pytest.raises(HardwareError, match="choose one"):
        decide(LaunchOptions(), [A100], bf16=True, fp16=True)


def test_nvidia_smi_line_to_device():
    from minicpm_train.launch import _device_from_smi

    device = _device_from_smi("NVIDIA GeForce RTX 4090, 8.9, 24564")
    assert device == Device("NVIDIA GeForce RTX 4090", (8, 9), 24564 / 1024) and device.supports_bf16
    assert not _device_from_smi("Tesla T4, 7.5, 15360").supports_bf16


def test_launcher_mode_leaves_device_visibility_to_the_launcher():
    plan = decide(LaunchOptions(include="localhost:2,3"), [A100] * 4)
    assert "CUDA_VISIBLE_DEVICES" not in plan.env and plan.launcher_argv[:2] == ["--include", "localhost:2,3"]


@pytest.mark.parametrize("preset", [None, "cuda"])
def test_cpu_launcher_names_deepspeeds_accelerator_unless_set(tmp_path, monkeypatch, preset):
    """DeepSpeed warns while it guesses a CPU accelerator: a CPU run names it, a user's choice stays."""
    from minicpm_train.args import ResolvedRun, RunOptions
    from minicpm_train.launch import run_launcher

    if preset:
        monkeypatch.setenv("DS_ACCELERATOR", preset)
    else:
        monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    seen = {}
    monkeypatch.setattr("subprocess.call", lambda argv, env: seen.update(env) or 0)
    run = ResolvedRun(RunOptions(), LaunchOptions(num_gpus=2), {"output_dir": str(tmp_path)})
    assert run_launcher(run, decide(LaunchOptions(num_gpus=2), [])) == 0
    assert seen["DS_ACCELERATOR"] == (preset or "cpu") and seen["CUDA_VISIBLE_DEVICES"] == ""


@pytest.mark.parametrize("rank", ["0", "1"])
def test_a_rank_meeting_a_library_error_exits_with_one_line_from_rank_zero(rank, tmp_path, monkeypatch, capsys):
    from minicpm_train import recipe
    from minicpm_train.args import parse_run_args

    run = parse_run_args(["--model_name_or_path", str(tmp_path / "no-such-model"), "--output_dir", str(tmp_path / "out"),
                          "--train_data_path", str(tmp_path / "no-such.json")])
    resolved = tmp_path / "resolved.json"
    resolved.write_text(json.dumps(run.to_dict()))
    monkeypatch.setenv("RANK", rank)
    with pytest.raises(SystemExit) as exit_info:
        recipe.main([str(resolved)])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    if rank == "0":
        assert err.startswith("error: ") and err.count("\n") == 1 and "no-such" in err
    else:
        assert err == ""


def test_one_process_deepspeed_run_moves_off_a_busy_port(monkeypatch):
    """Another run holds the guide's --master_port: this one-process run takes a free port, and says so;
    a stale WORLD_SIZE left in the shell does not turn it into a multi-rank rendezvous."""
    import os
    import socket

    from minicpm_train.recipe import _deepspeed_single_process_env

    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "4")
    notes = []
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        _deepspeed_single_process_env(taken, notes.append)
        assert (os.environ["WORLD_SIZE"], os.environ["RANK"]) == ("1", "0")
        assert int(os.environ["MASTER_PORT"]) != taken and notes == [f"note: port {taken} is in use; "
                                                                     f"this one-process run uses port "
                                                                     f"{os.environ['MASTER_PORT']} instead"]
