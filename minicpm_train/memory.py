"""GPU memory a run really used, against what ``plan`` predicted for it.

:class:`MemoryCallback` resets CUDA's peak counters when training starts; when it ends it reads, on every
rank, ``torch.cuda.max_memory_allocated`` (tensors), ``torch.cuda.max_memory_reserved`` (what the caching
allocator held) and what the device has in use outside PyTorch's reserve (CUDA context, NCCL, other
processes: ``torch.cuda.mem_get_info``), and gathers them on rank 0. The recipe writes them into
``metrics.json`` with the plan for the same run; ``plan --from_run`` re-plans a finished run and compares.
On CPU runs nothing is measured and nothing is claimed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from transformers import TrainerCallback

from minicpm_data.errors import MinicpmError
from minicpm_train.plan import MIB, MemoryEstimate, PlanError, estimate, settings_from_run


@dataclass(frozen=True)
class RankMemory:
    """What one rank's GPU held at its peak, in bytes."""

    rank: int
    gpu: str
    gpu_total: int
    peak_allocated: int
    peak_reserved: int
    outside_pytorch: int  # in use on the device beyond PyTorch's reserve, at the end of training

    @property
    def peak_total(self) -> int:
        """The peak as ``nvidia-smi`` would show it: PyTorch's peak reserve plus what lies outside it."""
        return self.peak_reserved + self.outside_pytorch


@dataclass(frozen=True)
class PlannedMemory:
    """The plan's figures for a run, in bytes (allocated: tensors; reserved: + allocator; total: + context)."""

    allocated: int
    reserved: int
    total: int

    @classmethod
    def of(cls, result: MemoryEstimate) -> "PlannedMemory":
        return cls(result.allocated, result.reserved, result.total)


def measured_device(args):
    """The CUDA device this rank trains on, or None on CPU (nothing is measured there)."""
    device = args.device
    return device if device.type == "cuda" else None


def _measure(device, rank: int) -> RankMemory:
    import torch

    free, total = torch.cuda.mem_get_info(device)
    outside = max(0, total - free - torch.cuda.memory_reserved(device))
    return RankMemory(rank, torch.cuda.get_device_name(device), total, torch.cuda.max_memory_allocated(device),
                      torch.cuda.max_memory_reserved(device), outside)


def _gather(mine: RankMemory) -> list[RankMemory]:
    """Every rank's figures, in rank order (a collective: every rank calls it)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [mine]
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return sorted(everyone, key=lambda r: r.rank)


class MemoryCallback(TrainerCallback):
    """Measures peak GPU memory per rank over training; ``ranks`` stays empty on CPU."""

    def __init__(self):
        self.ranks: list[RankMemory] = []

    def on_train_begin(self, args, state, control, **kwargs):
        device = measured_device(args)
        if device is not None:
            import torch

            torch.cuda.reset_peak_memory_stats(device)

    def on_train_end(self, args, state, control, **kwargs):
        device = measured_device(args)
        if device is not None:
            self.ranks = _gather(_measure(device, args.process_index))


def planned_for(run, gpus: int) -> PlannedMemory:
    """The plan for a resolved run on ``gpus`` GPUs (the run's own model folder sizes it)."""
    from minicpm_train.model_sizes import resolve_architecture

    arch, _ = resolve_architecture(run.options.model_name_or_path)
    return PlannedMemory.of(estimate(arch, settings_from_run(run, arch, gpus=gpus)))


def _difference(planned: int, measured: int) -> str:
    return f"{100 * (planned - measured) / measured:+.0f}%" if measured else "-"


def summary_line(planned: PlannedMemory | None, ranks: list[RankMemory]) -> str:
    """One line: the measured peak (the rank that used most) against the plan."""
    top = max(ranks, key=lambda r: r.peak_total)
    where = f"rank {top.rank} of {len(ranks)}" if len(ranks) > 1 else "GPU"
    measured = (f"measured {top.peak_total / MIB:,.0f} MiB on {where} ({top.gpu}: peak reserved "
                f"{top.peak_reserved / MIB:,.0f} + {top.outside_pytorch / MIB:,.0f} outside PyTorch; peak allocated "
                f"{top.peak_allocated / MIB:,.0f})")
    if planned is None:
        return f"memory: {measured}; no plan for this run"
    return (f"memory: planned {planned.total / MIB:,.0f} MiB per GPU (allocated {planned.allocated / MIB:,.0f}), "
            f"{measured}: plan {_difference(planned.total, top.peak_total)}")


def memory_record(run, ranks: list[RankMemory]) -> dict:
    """What ``metrics.json`` keeps under ``memory``: the plan at run time and each rank's peaks."""
    try:
        planned: PlannedMemory | None = planned_for(run, len(ranks))
        problem = None
    except MinicpmError as error:  # the run itself went fine; say why there is no plan instead of failing it
        planned, problem = None, str(error)
    return {"planned": asdict(planned) if planned else None, "plan_problem": problem,
            "ranks": [asdict(r) for r in ranks], "summary": summary_line(planned, ranks)}


@dataclass
class RunComparison:
    """A finished run's plan (with today's formulas) against what each of its ranks measured."""

    output_dir: Path
    planned: PlannedMemory
    planned_at_run: PlannedMemory | None
    ranks: list[RankMemory]

    @property
    def notes(self) -> list[str]:
        notes = ["measured 'total' = peak reserved + what the device had in use outside PyTorch at the end "
                 "(CUDA context, NCCL, any other process on that GPU)",
                 "the plan assumes a batch whose longest sample reaches model_max_length; shorter data uses less"]
        if self.planned_at_run and self.planned_at_run != self.planned:
            notes.append(f"at run time the plan said {self.planned_at_run.total / MIB:,.0f} MiB (formulas changed "
                         "since)")
        return notes

    def rows(self) -> list[tuple[str, str, str, str, str, str]]:
        """(rank, GPU, what, planned MiB, measured MiB, difference) per rank and figure."""
        rows = []
        for r in self.ranks:
            for what, planned, measured in (("total (nvidia-smi)", self.planned.total, r.peak_total),
                                            ("peak reserved", self.planned.reserved, r.peak_reserved),
                                            ("peak allocated", self.planned.allocated, r.peak_allocated)):
                first = what.startswith("total")
                rows.append((str(r.rank) if first else "", r.gpu if first else "", what, f"{planned / MIB:,.0f}",
                             f"{measured / MIB:,.0f}", _difference(planned, measured)))
        return rows

    def to_dict(self) -> dict:
        return {"output_dir": str(self.output_dir),
                "planned_mib": {k: round(v / MIB) for k, v in asdict(self.planned).items()},
                "planned_at_run_mib": ({k: round(v / MIB) for k, v in asdict(self.planned_at_run).items()}
                                       if self.planned_at_run else None),
                "ranks": [{"rank": r.rank, "gpu": r.gpu, "gpu_total_mib": round(r.gpu_total / MIB),
                           "peak_allocated_mib": round(r.peak_allocated / MIB),
                           "peak_reserved_mib": round(r.peak_reserved / MIB),
                           "outside_pytorch_mib": round(r.outside_pytorch / MIB),
                           "peak_total_mib": round(r.peak_total / MIB)} for r in self.ranks],
                "notes": self.notes}


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise PlanError(f"{path.parent} is not a finished run's output folder: no {path.name}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise PlanError(f"{path}: not valid JSON ({error})") from error


def compare_run(output_dir: str | Path) -> RunComparison:
    """Re-plan a finished run from its ``run_config.json`` and set it against its ``metrics.json`` peaks."""
    from minicpm_train.args import ResolvedRun

    folder = Path(output_dir)
    run = ResolvedRun.from_dict(_read_json(folder / "run_config.json"))
    memory = _read_json(folder / "metrics.json").get("memory")
    if not memory or not memory.get("ranks"):
        raise PlanError(f"{folder} measured no GPU memory: it ran on CPU, or before runs recorded it")
    ranks = [RankMemory(**r) for r in memory["ranks"]]
    at_run = PlannedMemory(**memory["planned"]) if memory.get("planned") else None
    return RunComparison(folder, planned_for(run, len(ranks)), at_run, ranks)
