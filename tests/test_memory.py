"""Measured GPU memory against the plan, on a simulated device (this machine has no GPU): the callback reads
torch.cuda's peak counters per rank, a run writes them into metrics.json with its plan and prints one line,
``plan --from_run`` compares a finished run; a CPU run claims nothing."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from minicpm_train.memory import MemoryCallback, PlannedMemory, RankMemory, summary_line
from minicpm_train.plan import MIB
from train_helpers import TASK_TRAIN, run_cli, run_in_process

GPU_TOTAL = 141 * 1024 * MIB
PEAK_ALLOCATED, PEAK_RESERVED = 9_000 * MIB, 10_000 * MIB
RESERVED_AT_END, USED_AT_END = 8_000 * MIB, 8_600 * MIB  # 600 MiB outside PyTorch: context, NCCL


def simulate_gpu(monkeypatch) -> list:
    """torch.cuda's memory functions answering as a GPU whose run peaked at the figures above."""
    import torch

    resets: list = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: resets.append(device))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: PEAK_ALLOCATED)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: PEAK_RESERVED)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: RESERVED_AT_END)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (GPU_TOTAL - USED_AT_END, GPU_TOTAL))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Simulated H200")
    return resets


EXPECTED = RankMemory(0, "Simulated H200", GPU_TOTAL, PEAK_ALLOCATED, PEAK_RESERVED, 600 * MIB)


def test_callback_reads_peaks_on_a_gpu_and_nothing_on_cpu(monkeypatch):
    import torch

    resets = simulate_gpu(monkeypatch)
    callback = MemoryCallback()
    gpu_args = SimpleNamespace(device=torch.device("cuda", 0), process_index=0)
    callback.on_train_begin(gpu_args, None, None)
    assert resets == [torch.device("cuda", 0)]
    callback.on_train_end(gpu_args, None, None)
    assert callback.ranks == [EXPECTED]
    assert EXPECTED.peak_total == PEAK_RESERVED + 600 * MIB

    on_cpu = MemoryCallback()
    cpu_args = SimpleNamespace(device=torch.device("cpu"), process_index=0)
    on_cpu.on_train_begin(cpu_args, None, None)
    on_cpu.on_train_end(cpu_args, None, None)
    assert on_cpu.ranks == [] and resets == [torch.device("cuda", 0)]


def test_ranks_are_gathered_in_rank_order(monkeypatch):
    """Under several ranks every rank's figures reach rank 0 (torch.distributed simulated: 2 ranks)."""
    import torch.distributed as dist

    from minicpm_train.memory import _gather

    other = RankMemory(1, "Simulated H200", GPU_TOTAL, 1, 2, 3)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)

    def all_gather_object(out, mine):
        out[:] = [other, mine]

    monkeypatch.setattr(dist, "all_gather_object", all_gather_object)
    assert _gather(EXPECTED) == [EXPECTED, other]


def test_a_run_without_a_plan_still_records_its_peaks(tmp_path):
    from minicpm_train.args import LaunchOptions, ResolvedRun, RunOptions
    from minicpm_train.memory import memory_record

    run = ResolvedRun(RunOptions(model_name_or_path=str(tmp_path)), LaunchOptions(), {})  # no config.json there
    record = memory_record(run, [EXPECTED])
    assert record["planned"] is None and "has no config.json" in record["plan_problem"]
    assert record["ranks"] == [vars(EXPECTED)] and record["summary"].endswith("no plan for this run")


def test_summary_line_names_the_rank_that_used_most():
    planned = PlannedMemory(allocated=8_000 * MIB, reserved=10_000 * MIB, total=12_000 * MIB)
    ranks = [EXPECTED, RankMemory(1, "Simulated H200", GPU_TOTAL, 9_500 * MIB, 10_400 * MIB, 600 * MIB)]
    line = summary_line(planned, ranks)
    assert line == ("memory: planned 12,000 MiB per GPU (allocated 8,000), measured 11,000 MiB on rank 1 of 2 "
                    "(Simulated H200: peak reserved 10,400 + 600 outside PyTorch; peak allocated 9,500): plan +9%")
    assert summary_line(None, [EXPECTED]).endswith("; no plan for this run")


def _argv(model, output_dir, cache) -> list[str]:
    return ["--model_name_or_path", str(model), "--output_dir", str(output_dir), "--train_data_path", str(TASK_TRAIN),
            "--data_cache_dir", str(cache), "--model_max_length", "128", "--per_device_train_batch_size", "4",
            "--max_steps", "2", "--save_strategy", "no", "--report_to", "none", "--logging_steps", "1"]


def test_simulated_gpu_run_records_planned_vs_measured(monkeypatch, capsys, tiny_llama, data_cache, tmp_path):
    """The training itself runs on CPU; only the memory callback sees a (simulated) GPU."""
    import minicpm_train.memory as memory

    simulate_gpu(monkeypatch)
    monkeypatch.setattr(memory, "measured_device", lambda args: __import__("torch").device("cuda", 0))
    lines: list[str] = []
    run_in_process(_argv(tiny_llama, tmp_path / "gpu", data_cache), report=lines.append)
    capsys.readouterr()  # the run's own output
    recorded = json.loads((tmp_path / "gpu" / "metrics.json").read_text())["memory"]
    assert recorded["ranks"] == [vars(EXPECTED)] and recorded["plan_problem"] is None
    planned = PlannedMemory(**recorded["planned"])
    assert 0 < planned.allocated < planned.reserved < planned.total
    assert [line for line in lines if line.startswith("memory:")] == [recorded["summary"]]
    assert recorded["summary"].startswith(f"memory: planned {planned.total / MIB:,.0f} MiB per GPU")

    code, out, err = run_cli(monkeypatch, capsys, "plan", "--from_run", str(tmp_path / "gpu"), "--json")
    assert code == 0, err
    comparison = json.loads(out)
    assert comparison["planned_mib"] == comparison["planned_at_run_mib"] == {
        k: round(v / MIB) for k, v in recorded["planned"].items()}
    assert comparison["ranks"][0]["peak_total_mib"] == 10_600 and comparison["ranks"][0]["gpu"] == "Simulated H200"
    code, out, err = run_cli(monkeypatch, capsys, "plan", "--from_run", str(tmp_path / "gpu"))
    assert code == 0 and "total (nvidia-smi)" in out and "10,600" in out and "peak allocated" in out


def test_cpu_run_claims_nothing(monkeypatch, capsys, tiny_llama, data_cache, tmp_path):
    lines: list[str] = []
    run_in_process(_argv(tiny_llama, tmp_path / "cpu", data_cache), report=lines.append)
    capsys.readouterr()
    assert "memory" not in json.loads((tmp_path / "cpu" / "metrics.json").read_text())
    assert not any(line.startswith("memory:") for line in lines)
    code, _, err = run_cli(monkeypatch, capsys, "plan", "--from_run", str(tmp_path / "cpu"))
    assert code == 1 and "measured no GPU memory" in err and err.count("\n") == 1
    code, _, err = run_cli(monkeypatch, capsys, "plan", "--from_run", str(tmp_path / "nothing"))
    assert code == 1 and "no run_config.json" in err
    code, _, err = run_cli(monkeypatch, capsys, "plan", "--from_run", str(tmp_path / "cpu"), "--bf16")
    assert code == 1 and "takes no run flags" in err


@pytest.mark.parametrize("flag", ["--pad_to_max", "--loss_impl"])
def test_plan_table_shows_every_term(monkeypatch, capsys, flag):
    extra = ["--pad_to_max"] if flag == "--pad_to_max" else ["--loss_impl", "full"]
    code, out, err = run_cli(monkeypatch, capsys, "plan", "--model_name_or_path", "MiniCPM-2B-sft-bf16", "--bf16",
                             "--per_device_train_batch_size", "1", "--deepspeed", "zero3", "--num_gpus", "4",
                             *extra, "--gpu_memory", "40")
    assert code == 0, err
    for label in ("weights (frozen)", "trainable parameters", "gradients", "optimizer states", "activations",
                  "ZeRO-3 live parameters", "DeepSpeed buffers", "allocator reserve", "CUDA context", "total"):
        assert label in out, label
    assert ("padded to max" in out) == (flag == "--pad_to_max")
    code, out, _ = run_cli(monkeypatch, capsys, "plan", "--model_name_or_path", "MiniCPM-2B-sft-bf16", "--bf16",
                           "--per_device_train_batch_size", "1", "--deepspeed", "zero3", "--num_gpus", "4", *extra,
                           "--json")
    terms = {t["term"]: t for t in json.loads(out)["terms"]}
    assert "stage3_max_live_parameters 1.00G" in terms["live_parameters"]["what"]
    assert "reduce_bucket_size 5.3M (auto = h^2)" in terms["buffers"]["what"]
    assert sum(t["mib"] for t in terms.values()) == pytest.approx(json.loads(out)["per_gpu_total_mib"], abs=5)
