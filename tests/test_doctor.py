"""minicpm-train doctor: verdicts over simulated machines, and the real command on this one."""

from __future__ import annotations

import dataclasses
import json

from minicpm_train.doctor import Environment, check, gather, overall
from minicpm_train.launch import Device

PACKAGES = {"transformers": "5.24.0", "peft": "0.21.2", "accelerate": "1.15.0", "deepspeed": "0.19.8",
            "bitsandbytes": "0.50.2"}
RTX_4090 = Device("NVIDIA GeForce RTX 4090", (8, 9), 23.6)
V100 = Device("Tesla V100-SXM2-16GB", (7, 0), 15.8)
A100 = Device("NVIDIA A100-SXM4-80GB", (8, 0), 79.2)


def machine(gpus: list[Device], **changes) -> Environment:
    """A healthy machine with these GPUs (a CUDA build of torch unless there are none)."""
    base = Environment(python="3.11.7", platform="Linux x86_64", torch="2.13.0+cu128" if gpus else "2.13.0+cpu",
                       torch_cuda="12.8" if gpus else None, cuda_available=bool(gpus), gpus=gpus,
                       packages=dict(PACKAGES), deepspeed_ops={"cpu_adam": True, "fused_adam": True},
                       deepspeed_accelerator="cuda" if gpus else "cpu", ninja=True, compiler="/usr/bin/c++",
                       nvcc="/usr/local/cuda/bin/nvcc" if gpus else None, bnb_backend="CUDA" if gpus else "CPU")
    return dataclasses.replace(base, **changes)


def by_item(env: Environment) -> dict:
    return {c.item: c for c in check(env)}


def test_no_gpu_is_a_sensible_warning():
    checks = by_item(machine([]))
    assert checks["GPU"].verdict == "warn" and "CPU" in checks["GPU"].advice
    assert checks["bf16"].verdict == "info" and "float32" in checks["bf16"].advice
    assert checks["bitsandbytes backend"].verdict == "ok"
    assert overall(check(machine([]))) == "warn"


def test_two_rtx_4090_need_nccl_settings():
    checks = by_item(machine([RTX_4090, RTX_4090]))
    assert checks["NCCL"].verdict == "info" and "NCCL_P2P_DISABLE" in checks["NCCL"].value
    assert "sets NCCL_P2P_DISABLE=1 NCCL_IB_DISABLE=1" in checks["NCCL"].advice
    exported = machine([RTX_4090, RTX_4090], env={"NCCL_P2P_DISABLE": "1", "NCCL_IB_DISABLE": "1"})
    assert by_item(exported)["NCCL"].verdict == "ok"
    assert by_item(machine([A100, A100]))["NCCL"].value == "defaults"
    assert by_item(machine([RTX_4090]))["NCCL"].value == "not needed"
    assert checks["bf16"].verdict == "ok" and checks["GPU 0"].verdict == "ok"
    assert overall(check(machine([RTX_4090, RTX_4090]))) == "ok"


def test_v100_has_no_bf16_and_is_below_the_guide():
    checks = by_item(machine([V100]))
    assert checks["bf16"].verdict == "warn" and "--fp16" in checks["bf16"].advice
    assert checks["GPU 0"].verdict == "warn" and "7.5" in checks["GPU 0"].advice


def test_small_gpu_points_to_qlora():
    checks = by_item(machine([Device("NVIDIA GeForce RTX 3060 Laptop GPU", (8, 6), 5.8)]))
    assert checks["GPU 0"].verdict == "warn" and "QLoRA" in checks["GPU 0"].advice
    eight = by_item(machine([Device("NVIDIA GeForce RTX 3070", (8, 6), 7.8)]))
    assert "--qlora" in eight["GPU 0"].advice


def test_broken_setups_fail():
    cpu_torch = by_item(machine([A100], torch_cuda=None, cuda_available=False, bnb_backend="CPU"))
    assert cpu_torch["torch CUDA"].verdict == "fail"
    assert cpu_torch["bitsandbytes backend"].verdict == "fail"
    no_ninja = by_item(machine([A100], ninja=False))
    assert no_ninja["DeepSpeed cpu_adam"].verdict == "fail" and "ninja" in no_ninja["DeepSpeed cpu_adam"].advice
    old = by_item(machine([], packages={**PACKAGES, "transformers": "4.46.3"}))
    assert old["transformers"].verdict == "fail" and "5.24" in old["transformers"].advice
    missing = by_item(machine([], packages={**PACKAGES, "deepspeed": None}))
    assert missing["deepspeed"].verdict == "warn" and "--deepspeed" in missing["deepspeed"].advice
    assert "DeepSpeed cpu_adam" not in missing
    no_nvcc = by_item(machine([A100], nvcc=None))["DeepSpeed fused_adam"]
    assert no_nvcc.verdict == "warn" and "nvcc" in no_nvcc.advice
    assert overall(check(machine([A100], ninja=False))) == "fail"


def test_deepspeed_ops_name_the_kernel_each_preset_compiles():
    """cpu_adam (offload presets) is a CPU kernel everywhere; fused_adam is CUDA on GPUs, a CPU build on CPU."""
    cpu, gpu = by_item(machine([])), by_item(machine([A100]))
    assert cpu["DeepSpeed cpu_adam"].value == gpu["DeepSpeed cpu_adam"].value == "can build (CPU kernel)"
    assert cpu["DeepSpeed fused_adam"].value == "can build (CPU kernel)"
    assert gpu["DeepSpeed fused_adam"].value == "can build (CUDA kernel)"
    assert "zero2_offload" in cpu["DeepSpeed cpu_adam"].advice
    assert "(zero2, zero3)" in cpu["DeepSpeed fused_adam"].advice
    assert by_item(machine([], nvcc=None))["DeepSpeed fused_adam"].verdict == "ok"  # nvcc only for the CUDA kernel


def test_this_machine_and_the_command(monkeypatch, capsys):
    from train_helpers import run_cli

    env = gather()
    assert env.torch and env.packages["transformers"]
    checks = check(env)
    assert {"Python", "torch", "transformers", "peft", "deepspeed", "bitsandbytes"} <= {c.item for c in checks}
    code, out, _ = run_cli(monkeypatch, capsys, "doctor", "--json")
    report = json.loads(out)
    assert report["verdict"] == overall(checks) and code == (1 if report["verdict"] == "fail" else 0)
    assert [c["item"] for c in report["checks"]] == [c.item for c in checks]
