"""Runs on several nodes: how each node starts, and what every rank of the run must agree on.

A run on N nodes starts in one of three ways (docs/multi-node.md), always on the existing launchers:

- once per node, ``--num_nodes N --node_rank I --master_addr HOST``: DeepSpeed's launcher in its ``--no_ssh``
  mode for a DeepSpeed run, ``torchrun --nnodes --node_rank`` otherwise (``minicpm_train.launch``);
- ``--hostfile FILE``: DeepSpeed's launcher reaches every node over ssh (pdsh) from this one;
- inside a SLURM allocation, ``srun minicpm-train run ...``: :func:`slurm_launch` reads the node count, this
  node's rank and the master address from SLURM's environment, then it starts as once per node (one task per
  node), or this task is one rank itself (one task per GPU).

Under a launcher every rank joins one process group whose collectives give up after ``--ddp_timeout``
(:func:`join`), then checks with all the others that they hold the same training rows and resume from the same
checkpoint (:func:`agree`). A failure becomes one ``error:`` line per node: the rank writes it into the error
folder beside the resolved run (:func:`stop`) and the node's ``minicpm-train run`` prints it (:func:`read_failure`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from minicpm_data.errors import MinicpmError
from minicpm_train.args import LaunchOptions

DEFAULT_MASTER_PORT = 29500
DEFAULT_TIMEOUT_S = 1800  # transformers' --ddp_timeout default: how long a collective waits for a silent node
SLURM_PORT_BASE = 15000  # + the job id's last four digits: every node of a job derives the same port


class NodesError(MinicpmError):
    """The nodes of a run cannot start together, or do not agree on what they train."""


# --- starting: flags, hostfiles, SLURM ------------------------------------------------------------------------


def hostfile_nodes(path: str) -> list[str]:
    """The hosts a DeepSpeed hostfile names (``HOST slots=N`` lines), in order."""
    hosts = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        words = line.split("#", 1)[0].split()
        if words:
            hosts.append(words[0])
    return hosts


def node_count(launch: LaunchOptions) -> int:
    """How many nodes the run spans: ``--num_nodes``, else every node of ``--hostfile``, else 1."""
    if launch.num_nodes:
        return launch.num_nodes
    return len(hostfile_nodes(launch.hostfile)) if launch.hostfile else 1


def check_launch(launch: LaunchOptions) -> None:
    """A multi-node start that can work: a per-node start knows the node count, its rank and the master."""
    nodes = node_count(launch)
    if launch.node_rank is None:
        if nodes > 1 and not launch.hostfile:
            raise NodesError(f"--num_nodes {nodes}: start the run on every node with --node_rank I --master_addr "
                             "HOST (I = 0 on the node at HOST), or once with --hostfile FILE (DeepSpeed reaches the "
                             "nodes over ssh), or with srun inside a SLURM allocation")
        return
    if nodes < 2:
        raise NodesError(f"--node_rank {launch.node_rank}: give the node count with --num_nodes N (2 or more)")
    if not 0 <= launch.node_rank < nodes:
        raise NodesError(f"--node_rank {launch.node_rank} with {nodes} nodes: it must be 0 to {nodes - 1}")
    if not launch.master_addr:
        raise NodesError("--node_rank needs --master_addr HOST: the address of node 0 (--node_rank 0), the same "
                         "on every node and reachable from all of them")


def expand_hostlist(text: str) -> list[str]:
    """SLURM's compressed host list, expanded as ``scontrol show hostnames`` does:
    ``gpu[01-02,05],login-a[1-2]b`` -> gpu01 gpu02 gpu05 login-a1b login-a2b."""
    hosts: list[str] = []
    for item in re.findall(r"(?:[^,\[]|\[[^\]]*\])+", text):
        expanded = [""]
        for literal, ranges in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", item):
            choices = [literal + value for value in _range_values(ranges)] if ranges else [literal]
            expanded = [head + choice for head in expanded for choice in choices]
        hosts += [host for host in expanded if host]
    return hosts


def _range_values(ranges: str) -> list[str]:
    """``01-03,7`` -> 01 02 03 7 (the width of a range's first bound pads its numbers)."""
    values = []
    for part in ranges.split(","):
        low, _, high = part.partition("-")
        if not high:
            values.append(low)
            continue
        if not (low.isdigit() and high.isdigit()):
            raise NodesError(f"cannot read the SLURM host range [{ranges}]")
        values += [str(number).zfill(len(low)) for number in range(int(low), int(high) + 1)]
    return values


def _tasks_per_node(text: str) -> list[int]:
    """SLURM's ``2(x3),1`` -> [2, 2, 2, 1]."""
    counts = []
    for part in filter(None, text.split(",")):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if match is None:
            raise NodesError(f"cannot read SLURM's tasks per node {text!r}")
        counts += [int(match[1])] * int(match[2] or 1)
    return counts


@dataclass(frozen=True)
class SlurmStep:
    """Where this task sits in an ``srun`` step: its hosts, this node, this task."""

    hosts: list[str]  # in node-rank order
    node_rank: int
    tasks_per_node: list[int]
    rank: int
    local_rank: int
    job_id: str

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "SlurmStep | None":
        """The step this process runs in, from the variables ``srun`` sets; None outside ``srun``."""
        if "SLURM_STEP_ID" not in env or "SLURM_PROCID" not in env:
            return None
        hosts = expand_hostlist(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", ""))
        tasks = _tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", "1"))
        if len(tasks) == 1 and len(hosts) > 1:
            tasks *= len(hosts)
        return cls(hosts, int(env.get("SLURM_NODEID", "0")), tasks, int(env["SLURM_PROCID"]),
                   int(env.get("SLURM_LOCALID", "0")), env.get("SLURM_JOB_ID", "0"))

    @property
    def one_task_per_node(self) -> bool:
        return all(count == 1 for count in self.tasks_per_node)

    def master_port(self) -> int:
        return SLURM_PORT_BASE + int(self.job_id[-4:] or 0) if self.job_id.isdigit() else DEFAULT_MASTER_PORT


def slurm_launch(launch: LaunchOptions, env: Mapping[str, str]) -> tuple[LaunchOptions, dict[str, str], list[str]]:
    """The launch a run inside an ``srun`` step gets from SLURM's environment (flags given win).

    Returns the launch options, the rank environment when this task is one rank itself (several tasks per
    node; empty otherwise), and notices. With one task per node it is the per-node start: ``--num_nodes`` the
    step's nodes, ``--node_rank`` SLURM_NODEID, ``--master_addr`` its first host (or MASTER_ADDR / MASTER_PORT
    when the batch script exports them), the port derived from the job id so every node picks the same.
    """
    step = SlurmStep.from_env(env)
    if step is None:
        if int(env.get("SLURM_NNODES", "1") or 1) > 1 and launch.node_rank is None and not launch.hostfile:
            return launch, {}, [f"inside a SLURM allocation of {env['SLURM_NNODES']} nodes but not under srun: this "
                                "runs on this node only; start it on every node with `srun --ntasks-per-node=1 "
                                "minicpm-train run ...`"]
        return launch, {}, []
    if launch.hostfile or launch.node_rank is not None:
        return launch, {}, ["inside srun, but --hostfile / --node_rank given: SLURM's node list and rank are not used"]
    master = launch.master_addr or env.get("MASTER_ADDR") or step.hosts[0]
    port = launch.master_port or int(env.get("MASTER_PORT") or step.master_port())
    where = f"SLURM: node {step.node_rank} of {len(step.hosts)} ({', '.join(step.hosts)}), master {master}:{port}"
    if step.one_task_per_node:
        if len(step.hosts) == 1:
            return launch, {}, []
        options = replace(launch, num_nodes=len(step.hosts), node_rank=step.node_rank, master_addr=master,
                          master_port=port)
        return options, {}, [where]
    local = step.tasks_per_node[step.node_rank]
    rank_env = {"RANK": str(step.rank), "LOCAL_RANK": str(step.local_rank), "WORLD_SIZE": str(sum(step.tasks_per_node)),
                "LOCAL_WORLD_SIZE": str(local), "LOCAL_SIZE": str(local), "CROSS_RANK": str(step.node_rank),
                "CROSS_SIZE": str(len(step.hosts)), "MASTER_ADDR": master, "MASTER_PORT": str(port)}
    options = replace(launch, num_nodes=len(step.hosts), node_rank=step.node_rank, master_addr=master,
                      master_port=port)
    return options, rank_env, [
        f"{where}; this task is rank {step.rank} (local rank {step.local_rank} of {local})"]


# --- ranks: the process group, agreement, failures -------------------------------------------------------------


def node_rank_here() -> int:
    """This rank's node: DeepSpeed's launcher sets CROSS_RANK, torchrun GROUP_RANK (one task per GPU: ours)."""
    return int(os.environ.get("CROSS_RANK") or os.environ.get("GROUP_RANK") or 0)


def join(training: Mapping[str, Any]) -> None:
    """Start this rank's gloo process group on a CPU run of several ranks, with ``--ddp_timeout``.

    On GPUs transformers starts the group with the timeout itself; on CPU it drops it (accelerate's gloo group
    would wait torch's default), and the timeout is what ends a run whose other node went silent.
    """
    import datetime

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        seconds = int(training.get("ddp_timeout") or DEFAULT_TIMEOUT_S)
        dist.init_process_group(training.get("ddp_backend") or "gloo", timeout=datetime.timedelta(seconds=seconds))


def fingerprint(dataset) -> str:
    """A digest of the rows a dataset yields, from the arrays behind it (a memory-mapped cache is hashed, not
    read row by row); any other dataset is hashed row by row."""
    from minicpm_train.data import MixedDataset, PackedDataset, SupervisedDataset

    digest = hashlib.sha256()

    def add(value) -> None:
        import numpy as np

        array = np.ascontiguousarray(value)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        view = memoryview(array).cast("B")
        for start in range(0, len(view), 1 << 26):  # 64 MiB at a time
            digest.update(view[start:start + (1 << 26)])

    if isinstance(dataset, SupervisedDataset):
        for array in (dataset.ids, dataset.trained, dataset.offsets):
            add(array)
    elif isinstance(dataset, MixedDataset):
        for part in dataset.parts:
            digest.update(fingerprint(part).encode())
        add(dataset.picks)
    elif isinstance(dataset, PackedDataset):
        digest.update(fingerprint(dataset.source).encode())
        add(dataset.order)
        add(dataset.row_starts)
    else:
        for index in range(len(dataset)):
            for key, value in sorted(dataset[index].items()):
                digest.update(key.encode())
                add(value)
    return digest.hexdigest()[:16]


def checkpoint_step(checkpoint: str | None) -> int | None:
    """The optimizer step a checkpoint folder holds (its trainer_state.json), None for no checkpoint."""
    if checkpoint is None:
        return None
    return int(json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"])


def _where(record: Mapping[str, Any]) -> str:
    return f"node {record['node']} ({record['host']})"


def check_rows(records: list[dict[str, Any]]) -> None:
    """Every rank holds the same rows of every data set, or a :class:`NodesError` naming the ranks that differ."""
    for name in records[0]["rows"]:
        groups: dict[str, list[dict]] = {}
        for record in records:
            groups.setdefault(record["rows"].get(name, "missing"), []).append(record)
        if len(groups) > 1:
            common = max(groups, key=lambda fp: len(groups[fp]))
            odd = [r for fp, members in groups.items() if fp != common for r in members]
            ranks = ", ".join(f"rank {r['rank']} on {_where(r)}" for r in odd)
            raise NodesError(f"the ranks do not hold the same {name} rows: {ranks} differ from the other "
                             f"{len(groups[common])} (fingerprint {common}); every node must read the same data "
                             "files with the same tokenizer and flags")


def check_checkpoint(records: list[dict[str, Any]], requested: str | None) -> None:
    """Every node resumes from the same step, or a :class:`NodesError` naming the nodes that lack the latest."""
    steps = {record["node"]: record for record in records}
    if len({record["step"] for record in records}) <= 1:
        return
    latest = max(record["step"] for record in records if record["step"] is not None)
    views = "; ".join(f"{_where(r)}: {'step ' + str(r['step']) if r['step'] is not None else 'no checkpoint'}"
                      for r in steps.values())
    lacking = [r for r in steps.values() if r["step"] != latest]
    have = next(r for r in steps.values() if r["step"] == latest)
    names = ", ".join(f"{_where(r)} in {r['output_dir']}" for r in lacking)
    raise NodesError(f"--resume_from_checkpoint {requested}: the nodes would resume from different steps ({views}): "
                     f"{names} lack{'s' if len(lacking) == 1 else ''} the checkpoint of step {latest} that "
                     f"{_where(have)} resumes from; give every node the same --output_dir on a filesystem they "
                     "share (or copy the checkpoint there), then start every node again")


def agree(datasets: Mapping[str, Any], *, rendered: list[str], resume: str | None, requested: str | None,
          output_dir: Path, report: Callable[[str], None]) -> list[dict[str, Any]] | None:
    """Check with every other rank that all hold the same rows and resume from the same step (one gather).

    Returns every rank's record (rank, node, host, row fingerprints, the files it rendered, its resume step),
    or None in a run of one process; every rank raises the same :class:`NodesError` when they disagree.
    """
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    mine = {"rank": dist.get_rank(), "node": node_rank_here(), "host": socket.gethostname(),
            "rows": {name: fingerprint(dataset) for name, dataset in datasets.items()},
            "rendered": rendered, "step": checkpoint_step(resume), "output_dir": str(output_dir)}
    records: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(records, mine)
    check_rows(records)
    check_checkpoint(records, requested)
    if datasets:
        nodes = len({r["node"] for r in records})
        rows = ", ".join(f"{name} {fp}" for name, fp in records[0]["rows"].items())
        renderers = ", ".join(f"rank {r['rank']} (node {r['node']})" for r in records if r["rendered"])
        report(f"data rows: the same on all {len(records)} ranks of {nodes} node{'s' * (nodes > 1)} ({rows}); "
               + (f"rendered by {renderers}, mapped by the others" if renderers else "all from the cache"))
    return records


_GLOO_PATH = re.compile(r"^\[[^\]]*(?:gloo|c10d|torch)[^\]]*\]\s*")
_LOST = re.compile(r"connection (?:reset|closed) by peer|broken pipe|connection refused|timed out|timeout|"
                   r"nccl(?:RemoteError|SystemError)?|communicator was aborted|read error|write error", re.IGNORECASE)


def lost_contact(error: BaseException) -> str | None:
    """What ``error`` says when it is another node going away (a gloo / NCCL / rendezvous failure), else None."""
    try:
        from torch.distributed import DistError
    except ImportError:  # a torch without distributed support
        return None
    text = str(error).strip()
    if not isinstance(error, DistError) and not (isinstance(error, RuntimeError) and _GLOO_PATH.match(text)
                                                 and _LOST.search(text)):
        return None
    first = _GLOO_PATH.sub("", text.splitlines()[0] if text else type(error).__name__)
    return first.split(". This is typically")[0].rstrip(".")


def lost_contact_message(cause: str, training: Mapping[str, Any], latest: Path | None) -> str:
    """The one line a node prints when another node went silent or away."""
    seconds = int(training.get("ddp_timeout") or DEFAULT_TIMEOUT_S)
    silent = re.search(r"timed out|timeout", cause, re.IGNORECASE)
    what = (f"no answer from another node within --ddp_timeout {seconds} s" if silent else
            "lost contact with another node (it stopped, or was killed)")
    resume = (f"latest complete checkpoint: {latest}" if latest else "no complete checkpoint yet")
    return (f"{what}: {cause}; the run stopped on this node too; start every node again with "
            f"--resume_from_checkpoint auto ({resume})")


def error_folder(resolved_run: Path) -> Path:
    """Where the ranks of one node's launch leave their failure for its ``minicpm-train run`` to print."""
    return resolved_run.with_suffix(".errors")


def stop(message: str, errors: Path | None, *, lost: bool) -> None:
    """End this rank with exit code 1 after leaving ``message`` for the node's one ``error:`` line.

    With an error folder the node's ``minicpm-train run`` prints it; without one (a launcher we did not start)
    the node's first rank prints it. A rank in a process group leaves at once: tearing the group down after
    its peers have gone can hang, or abort the process ("terminate called without an active exception").
    """
    import sys

    rank, local_rank = os.environ.get("RANK", "0"), os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0"))
    if errors is not None and errors.is_dir():
        record = {"rank": int(rank), "node": node_rank_here(), "host": socket.gethostname(), "lost_contact": lost,
                  "message": message, "time": time.time()}
        partial = errors / f".rank-{rank}-{uuid.uuid4().hex[:8]}"
        partial.write_text(json.dumps(record))
        partial.rename(errors / f"rank-{rank}.json")
    elif local_rank == "0":
        print(f"error: {message}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    distributed = sys.modules.get("torch.distributed")
    if lost or (distributed is not None and distributed.is_available() and distributed.is_initialized()):
        os._exit(1)
    sys.exit(1)


def end_finished_rank() -> None:
    """End a rank whose run finished (its files written): wait for every rank, run the exit handlers, flush,
    and leave with exit code 0 without tearing down the interpreter. That teardown destroys torch's
    distributed objects (gloo's and the store's threads) in no set order, and now and then aborts a rank
    whose run succeeded ("terminate called without an active exception", seen in full test-suite runs)."""
    import atexit
    import sys

    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.barrier()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def read_failure(errors: Path) -> str | None:
    """The failure to print for a node's launch: a rank's own error before a lost contact (the consequence of
    another's), the earliest first."""
    reports = [json.loads(path.read_text()) for path in sorted(errors.glob("rank-*.json"))]
    if not reports:
        return None
    return min(reports, key=lambda report: (report["lost_contact"], report["time"]))["message"]
