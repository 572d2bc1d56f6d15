"""Where and how a run executes: in this process, or under the ``deepspeed`` launcher (or ``torchrun``, for a
run started once per node without DeepSpeed).

:func:`decide` is a pure function from a device description to decisions (mode, ranks, precision,
NCCL environment, the launcher's command line), so every hardware rule is unit-tested with simulated devices.
:func:`run_launcher` carries the decisions out; the rules for several nodes are ``minicpm_train.nodes``'.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from minicpm_data.errors import MinicpmError
from minicpm_train import nodes
from minicpm_train.args import LaunchOptions, ResolvedRun

NCCL_CONSUMER_ENV = {"NCCL_P2P_DISABLE": "1", "NCCL_IB_DISABLE": "1"}
_RTX_40 = re.compile(r"RTX\s*40[5-9]0", re.IGNORECASE)


GENERATED_HOSTFILE = "GENERATED_HOSTFILE"  # in launcher_argv: the hostfile run_launcher writes beside the run


class HardwareError(MinicpmError):
    """The requested devices or precision do not exist on this machine."""


class LaunchError(MinicpmError):
    """The training processes the launcher started stopped with an error."""


@dataclass(frozen=True)
class Device:
    """One accelerator as the decisions need it."""

    name: str
    compute_capability: tuple[int, int]
    memory_gib: float = 0.0

    @property
    def supports_bf16(self) -> bool:
        return self.compute_capability >= (8, 0)  # Ampere and newer


@dataclass
class HardwarePlan:
    """What :func:`decide` chose."""

    mode: str  # "in_process", "launcher", or "rank" (this process is one rank of a run srun started)
    device: str  # "cpu" or "cuda"
    ranks: int  # processes on this node
    precision: str  # "bf16", "fp16" or "fp32"
    env: dict[str, str] = field(default_factory=dict)
    launcher_argv: list[str] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    launcher: str = "deepspeed"  # or "torchrun"
    nodes: int = 1
    node_rank: int | None = None  # set for a run started once per node
    hostfile: str | None = None  # the hostfile to write for DeepSpeed's --no_ssh start (GENERATED_HOSTFILE)


def detect_devices() -> list[Device]:
    """The NVIDIA GPUs of this machine (empty on a CPU-only one).

    Asks ``nvidia-smi`` first so CUDA stays uninitialised here: ``CUDA_VISIBLE_DEVICES`` (from
    ``--include``) must still take effect when the run starts in this process.
    """
    smi = shutil.which("nvidia-smi")
    if smi:
        query = [smi, "--query-gpu=name,compute_cap,memory.total", "--format=csv,noheader,nounits"]
        try:
            lines = subprocess.run(query, capture_output=True, text=True, timeout=30, check=True).stdout.splitlines()
            return [_device_from_smi(line) for line in lines if line.strip()]
        except (OSError, subprocess.SubprocessError, ValueError):
            pass  # fall back to torch below
    import torch

    if not torch.cuda.is_available():
        return []
    return [Device(p.name, (p.major, p.minor), p.total_memory / 2**30)
            for p in map(torch.cuda.get_device_properties, range(torch.cuda.device_count()))]


def _device_from_smi(line: str) -> Device:
    """``NVIDIA GeForce RTX 4090, 8.9, 24564`` -> Device."""
    name, capability, memory_mib = (part.strip() for part in line.rsplit(",", 2))
    major, minor = capability.split(".")
    return Device(name, (int(major), int(minor)), float(memory_mib) / 1024)


def _included_indices(spec: str, count: int) -> list[int]:
    """``localhost:0,1`` (or ``host:0,1@host2:0``, this node's part) -> device indices on this node."""
    indices: list[int] = []
    for part in spec.split("@"):
        host, _, slots = part.partition(":")
        if host not in ("localhost", "127.0.0.1", os.uname().nodename) and "@" in spec:
            continue
        indices += [int(s) for s in slots.split(",") if s.strip()] if slots else list(range(count))
    return indices


def _selected(launch: LaunchOptions, devices: list[Device]) -> list[int]:
    count = len(devices)
    try:
        selected = _included_indices(launch.include, count) if launch.include else list(range(count))
        if launch.exclude:
            excluded = set(_included_indices(launch.exclude, count))
            selected = [i for i in selected if i not in excluded]
    except ValueError as error:
        raise HardwareError(f"cannot read --include/--exclude {launch.include or launch.exclude!r}: "
                            "expected e.g. localhost:0,1") from error
    missing = [i for i in selected if i >= count]
    if missing:
        raise HardwareError(f"--include names GPU {missing[0]}, but this machine has {count} "
                            f"(0-{count - 1})")
    if launch.num_gpus is not None:
        if launch.num_gpus > len(selected):
            raise HardwareError(f"--num_gpus {launch.num_gpus}, but only {len(selected)} GPU(s) are available")
        selected = selected[: launch.num_gpus]
    if not selected:
        raise HardwareError("no GPU left after --include/--exclude")
    return selected


def _requested_precision(precision: str | None, bf16: bool, fp16: bool) -> str | None:
    if precision:
        return precision
    if bf16 and fp16:
        raise HardwareError("--bf16 and --fp16 together: choose one")
    return "bf16" if bf16 else "fp16" if fp16 else None


def decide(launch: LaunchOptions, devices: list[Device], *, precision: str | None = None,
           bf16: bool = False, fp16: bool = False, deepspeed: bool = False) -> HardwarePlan:
    """Decide mode, ranks, precision, environment and launcher for ``devices`` (empty: CPU only).

    ``deepspeed``: the run uses DeepSpeed (a run started once per node then goes through DeepSpeed's launcher,
    otherwise through torchrun).
    """
    requested = _requested_precision(precision, bf16, fp16)
    nodes.check_launch(launch)
    multi_node = bool(launch.hostfile) or nodes.node_count(launch) > 1
    if not devices:
        plan = _decide_cpu(launch, requested, multi_node)
        return _with_launcher(plan, launch, None, deepspeed) if plan.mode == "launcher" else plan

    notices: list[str] = []
    selected = _selected(launch, devices)
    chosen = [devices[i] for i in selected]
    mode = "launcher" if len(chosen) > 1 or multi_node else "in_process"
    # In this process, CUDA_VISIBLE_DEVICES picks the device; the launcher sets it per rank itself.
    env = {"CUDA_VISIBLE_DEVICES": str(selected[0])} if mode == "in_process" else {}
    if mode == "launcher":
        consumer = [d.name for d in chosen if _RTX_40.search(d.name)]
        if consumer:
            env.update(NCCL_CONSUMER_ENV)
            notices.append(f"{consumer[0]} is an RTX 40-series card (no peer-to-peer over PCIe): "
                           "setting NCCL_P2P_DISABLE=1 NCCL_IB_DISABLE=1")

    no_bf16 = [d for d in chosen if not d.supports_bf16]
    if requested == "auto":
        final = "fp16" if no_bf16 else "bf16"
        if no_bf16:
            notices.append(f"{no_bf16[0].name} has no bf16: --precision auto uses fp16")
    elif requested == "bf16" and no_bf16:
        device = no_bf16[0]
        raise HardwareError(
            f"--bf16: {device.name} (compute capability {device.compute_capability[0]}."
            f"{device.compute_capability[1]}) has no bf16; use --fp16 instead, or --precision auto")
    else:
        final = requested or "fp32"

    plan = HardwarePlan(mode, "cuda", len(chosen), final, env, [], notices)
    return _with_launcher(plan, launch, selected, deepspeed) if mode == "launcher" else plan


def _decide_cpu(launch: LaunchOptions, requested: str | None, multi_node: bool) -> HardwarePlan:
    notices: list[str] = []
    if requested == "fp16":
        raise HardwareError("--fp16 on CPU: there is no fp16 training on CPU (it would silently run in float32, "
                            "and fp16 weights diverge); drop --fp16 to train in float32 on CPU")
    if requested == "bf16":
        notices.append("no GPU: --bf16 ignored, training in float32 on CPU")
    for flag in ("include", "exclude"):
        if getattr(launch, flag):
            notices.append(f"no GPU: --{flag} {getattr(launch, flag)} ignored, training on CPU")
    ranks = launch.num_gpus or 1
    if ranks > 1 or multi_node:
        notices.append(f"no GPU: --num_gpus {ranks} starts {ranks} CPU process{'es' * (ranks > 1)} (gloo backend)")
        return HardwarePlan("launcher", "cpu", ranks, "fp32", {}, [], notices)
    return HardwarePlan("in_process", "cpu", 1, "fp32", {}, [], notices)


def _with_launcher(plan: HardwarePlan, launch: LaunchOptions, selected: list[int] | None,
                   deepspeed: bool) -> HardwarePlan:
    """The plan with the launcher that starts its ranks: this node's part of a per-node start (DeepSpeed's
    ``--no_ssh`` mode for a DeepSpeed run, else torchrun), or DeepSpeed's launcher for this node or a hostfile."""
    port = str(launch.master_port or nodes.DEFAULT_MASTER_PORT)
    if launch.node_rank is None:
        include = f"localhost:{','.join(map(str, selected))}" if selected is not None else None
        return replace(plan, launcher_argv=_launcher_argv(launch, include=include, num_gpus=plan.ranks),
                       nodes=nodes.node_count(launch))
    count, rank = nodes.node_count(launch), str(launch.node_rank)
    where = ["--master_addr", launch.master_addr, "--master_port", port]
    every_gpu = selected is None or selected == list(range(len(selected)))
    if not deepspeed:
        env = plan.env if every_gpu else {**plan.env, "CUDA_VISIBLE_DEVICES": ",".join(map(str, selected))}
        argv = ["--nnodes", str(count), "--node_rank", rank, *where, "--nproc_per_node", str(plan.ranks)]
        return replace(plan, env=env, launcher="torchrun", launcher_argv=argv, nodes=count, node_rank=launch.node_rank)
    hostfile = None
    if launch.hostfile:  # the user's hostfile names the nodes and their slots; its --include / --num_gpus apply
        picks = [token for flag in ("include", "num_gpus", "num_nodes") if getattr(launch, flag) is not None
                 for token in (f"--{flag}", str(getattr(launch, flag)))]
        argv = ["--hostfile", launch.hostfile]
    else:  # a hostfile of N identical nodes: DeepSpeed's --no_ssh start needs one to number the ranks
        names = [f"node{index}" for index in range(count)]
        slots = plan.ranks if every_gpu else max(selected) + 1
        hostfile = "".join(f"{name} slots={slots}\n" for name in names)
        picks = (["--num_gpus", str(plan.ranks)] if every_gpu else
                 ["--include", "@".join(f"{name}:{','.join(map(str, selected))}" for name in names)])
        argv = ["--hostfile", GENERATED_HOSTFILE]
    argv += ["--no_ssh", "--node_rank", rank, *where, *picks]
    return replace(plan, launcher_argv=argv, nodes=count, node_rank=launch.node_rank, hostfile=hostfile)


def _launcher_argv(launch: LaunchOptions, *, include: str | None = None, num_gpus: int | None = None) -> list[str]:
    argv = ["--include", include] if include else ["--num_gpus", str(num_gpus)]
    if launch.hostfile:
        argv = ["--hostfile", launch.hostfile]  # the hostfile names the slots on every node
        if launch.include:
            argv += ["--include", launch.include]
    if launch.num_nodes:
        argv += ["--num_nodes", str(launch.num_nodes)]
    if launch.master_addr:
        argv += ["--master_addr", launch.master_addr]
    argv += ["--master_port", str(launch.master_port or nodes.DEFAULT_MASTER_PORT)]
    return argv


def apply_plan(run: ResolvedRun, plan: HardwarePlan) -> ResolvedRun:
    """The run with the plan's precision and device written into its training arguments, and its notices."""
    training = dict(run.training)
    training["bf16"] = plan.precision == "bf16"
    training["fp16"] = plan.precision == "fp16"
    if plan.device == "cpu":
        training["use_cpu"] = True
    return replace(run, training=training, env={**run.env, **plan.env}, notices=run.notices + plan.notices)


def plan_run(run: ResolvedRun, devices: list[Device] | None = None,
             env: Mapping[str, str] | None = None) -> tuple[ResolvedRun, HardwarePlan]:
    """Decide for this machine's devices (and, inside ``srun``, SLURM's nodes) and return the run with the
    decisions applied."""
    launch, rank_env, notices = nodes.slurm_launch(run.launch, os.environ if env is None else env)
    run = replace(run, launch=launch, notices=run.notices + notices)
    devices = detect_devices() if devices is None else devices
    plan = decide(launch, devices, precision=run.options.precision, bf16=bool(run.training.get("bf16")),
                  fp16=bool(run.training.get("fp16")), deepspeed=bool(run.training.get("deepspeed")))
    if rank_env:  # srun started this process as one rank: no launcher
        plan = replace(plan, mode="rank", ranks=1, env={**plan.env, **rank_env}, launcher_argv=[], hostfile=None)
    return apply_plan(run, plan), plan


def name_cpu_accelerator(env: MutableMapping[str, str]) -> None:
    """For a CPU run: tell DeepSpeed its accelerator (it warns while guessing it), unless the user chose one."""
    env.setdefault("DS_ACCELERATOR", "cpu")


def launcher_command(plan: HardwarePlan, resolved_json: Path) -> list[str]:
    """The ``deepspeed`` (or ``torchrun``) command that runs the recipe on every rank of this node."""
    if plan.launcher == "torchrun":
        return ["torchrun", *plan.launcher_argv, "--module", "minicpm_train.recipe", str(resolved_json)]
    executable = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
    argv = [str(hostfile_path(resolved_json)) if token == GENERATED_HOSTFILE else token for token in plan.launcher_argv]
    return [executable, *argv, "--no_local_rank", "--module", "minicpm_train.recipe", str(resolved_json)]


def hostfile_path(resolved_json: Path) -> Path:
    """Where a per-node DeepSpeed start's generated hostfile goes: beside the resolved run."""
    return resolved_json.with_suffix(".hostfile")


def run_launcher(run: ResolvedRun, plan: HardwarePlan) -> int:
    """Start the launcher over the recipe and wait for it; returns 0, or raises :class:`LaunchError` with the one
    line this node's ranks left (their own error, or the lost contact with another node)."""
    output_dir = Path(run.training["output_dir"])
    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".json", dir=output_dir, prefix=".launch-", delete=False) as f:
        json.dump(run.to_dict(), f)
    resolved, errors = Path(f.name), nodes.error_folder(Path(f.name))
    errors.mkdir()
    if plan.hostfile:
        hostfile_path(resolved).write_text(plan.hostfile)
    env = {**os.environ, **run.env, "PYTHONUNBUFFERED": "1"}
    if plan.device == "cpu":
        env.setdefault("CUDA_VISIBLE_DEVICES", "")
        name_cpu_accelerator(env)
    try:
        command = launcher_command(plan, resolved)
        code = _torchrun(command[1:], env) if plan.launcher == "torchrun" else subprocess.call(command, env=env)
        failure = nodes.read_failure(errors)
    finally:
        for path in (resolved, hostfile_path(resolved)):
            path.unlink(missing_ok=True)
        shutil.rmtree(errors, ignore_errors=True)
    if code == 0:
        return 0
    raise LaunchError(failure or f"the training processes on this node stopped with exit code {code} without an "
                                 "error of their own (killed? out of memory?): see their output above")


def _torchrun(argv: list[str], env: Mapping[str, str]) -> int:
    """``torchrun ARGV`` in this process (its own entry point), so a failed rank ends as an exit code, not as
    torchrun's traceback; its workers get ``env``."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    saved = dict(os.environ)
    os.environ.update(env)
    try:
        run(get_args_parser().parse_args(argv))
        return 0
    except ChildFailedError as failed:
        return next((f.exitcode for f in failed.failures.values() if f.exitcode > 0), 1)
    finally:
        os.environ.clear()
        os.environ.update(saved)
