"""Runs on several nodes: the decisions (per-node starts, SLURM, agreement, failures) as unit tests, and two hosts
simulated on this machine for the runs themselves.

The two hosts are two network namespaces joined by a veth pair, each with its own address and host name; one node
of the run starts in each (``ip netns exec``), on CPU with the gloo backend. The namespaces are made per module and
removed afterwards (also when a test fails); without root or ``ip`` the tests that need them skip, saying why.

Launches are expensive here (20-40 s each), so each one proves several things:
- ZeRO-3, full: a 2-node run whose node 1 is killed after checkpoint-4 (node 0 exits non-zero with one ``error:``
  line within ``--ddp_timeout``, nothing half-written looks finished), then both nodes resumed with ``auto``: losses
  equal a one-process run with the same global batch, every checkpoint complete, a shared cache rendered once in all.
- ZeRO-2, LoRA: both nodes killed after checkpoint-4, then resumed: equal to its one-process run, checkpoints
  complete, node-local caches rendered once on each node.
- four ranks (2 per node) through torchrun without DeepSpeed, node-local caches: each node renders once, and all
  four ranks hold the same rows (a digest per rank in the probe's log and the run's own fingerprints).
- two bare processes per node (no training): a node that sees another checkpoint stops both with one line naming
  it; a node cut off the network ends the other within ``--ddp_timeout``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from minicpm_train.args import LaunchOptions, latest_checkpoint
from train_helpers import MAX_LENGTH, TASK_DEV, TASK_TRAIN, run_in_process, task_argv

CLI = str(Path(sys.executable).with_name("minicpm-train"))
ADDRESSES = ("10.77.0.1", "10.77.0.2")
FAULT_TIMEOUT_S = 60  # --ddp_timeout of the launched runs: the time a node may stay silent


# --- unit tests: per-node starts, hostfiles, SLURM ------------------------------------------------------------


def test_per_node_start_uses_deepspeeds_no_ssh_mode_or_torchrun():
    from minicpm_train.launch import GENERATED_HOSTFILE, decide, launcher_command

    launch = LaunchOptions(num_nodes=2, node_rank=1, master_addr="10.0.0.1", master_port=30400, num_gpus=2)
    ds = decide(launch, [], deepspeed=True)
    assert (ds.mode, ds.launcher, ds.nodes, ds.node_rank, ds.ranks) == ("launcher", "deepspeed", 2, 1, 2)
    assert ds.launcher_argv == ["--hostfile", GENERATED_HOSTFILE, "--no_ssh", "--node_rank", "1", "--master_addr",
                                "10.0.0.1", "--master_port", "30400", "--num_gpus", "2"]
    assert ds.hostfile == "node0 slots=2\nnode1 slots=2\n"  # DeepSpeed numbers the ranks from it
    command = launcher_command(ds, Path("/out/.launch-x.json"))
    assert command[1:3] == ["--hostfile", "/out/.launch-x.hostfile"] and command[-3:] == [
        "--module", "minicpm_train.recipe", "/out/.launch-x.json"]

    plain = decide(launch, [])
    assert plain.launcher == "torchrun" and launcher_command(plain, Path("r.json")) == [
        "torchrun", "--nnodes", "2", "--node_rank", "1", "--master_addr", "10.0.0.1", "--master_port", "30400",
        "--nproc_per_node", "2", "--module", "minicpm_train.recipe", "r.json"]


def test_per_node_start_on_gpus_and_with_the_users_hostfile(tmp_path):
    from minicpm_train.launch import Device, decide

    gpus = [Device("NVIDIA A100-SXM4-80GB", (8, 0), 80)] * 4
    launch = LaunchOptions(num_nodes=2, node_rank=0, master_addr="gpu01", include="localhost:1,3")
    ds = decide(launch, gpus, bf16=True, deepspeed=True)
    assert ds.hostfile == "node0 slots=4\nnode1 slots=4\n" and ds.ranks == 2
    assert ds.launcher_argv[-2:] == ["--include", "node0:1,3@node1:1,3"]  # the same GPUs on every node
    torchrun = decide(launch, gpus, bf16=True)
    assert torchrun.env["CUDA_VISIBLE_DEVICES"] == "1,3" and torchrun.launcher_argv[-2:] == ["--nproc_per_node", "2"]

    hostfile = tmp_path / "hosts"
    hostfile.write_text("gpu01 slots=8\ngpu02 slots=8  # the second node\n")
    own = decide(LaunchOptions(hostfile=str(hostfile), node_rank=1, master_addr="gpu01"), gpus, deepspeed=True)
    assert own.nodes == 2 and own.hostfile is None
    assert own.launcher_argv == ["--hostfile", str(hostfile), "--no_ssh", "--node_rank", "1", "--master_addr",
                                 "gpu01", "--master_port", "29500"]


@pytest.mark.parametrize("launch, message", [
    (LaunchOptions(node_rank=1, master_addr="h"), "give the node count with --num_nodes"),
    (LaunchOptions(num_nodes=2, node_rank=2, master_addr="h"), "--node_rank 2 with 2 nodes: it must be 0 to 1"),
    (LaunchOptions(num_nodes=2, node_rank=0), "--node_rank needs --master_addr HOST"),
    (LaunchOptions(num_nodes=2), "--num_nodes 2: start the run on every node with --node_rank I"),
])
def test_impossible_multi_node_starts_are_refused(launch, message):
    from minicpm_train.launch import decide
    from minicpm_train.nodes import NodesError

    with pytest.raises(NodesError, match=message):
        decide(launch, [])


@pytest.mark.parametrize("text, hosts", [
    ("node001", ["node001"]),
    ("node[001-003,007]", ["node001", "node002", "node003", "node007"]),
    ("gpu[8-10],login-a[1-2]b", ["gpu8", "gpu9", "gpu10", "login-a1b", "login-a2b"]),
    ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
])
def test_slurm_host_lists_expand_as_scontrol_show_hostnames(text, hosts):
    from minicpm_train.nodes import expand_hostlist

    assert expand_hostlist(text) == hosts


def _srun_env(task: int, *, tasks_per_node: int) -> dict[str, str]:
    """The variables ``srun`` sets in task ``task`` of a 2-node allocation (nodes gpu[07-08], job 4242042)."""
    node = task // tasks_per_node
    return {"SLURM_JOB_ID": "4242042", "SLURM_STEP_ID": "0", "SLURM_JOB_NODELIST": "gpu[07-08]",
            "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_NNODES": "2", "SLURM_STEP_NUM_NODES": "2",
            "SLURM_NTASKS": str(2 * tasks_per_node), "SLURM_STEP_NUM_TASKS": str(2 * tasks_per_node),
            "SLURM_TASKS_PER_NODE": f"{tasks_per_node}(x2)", "SLURM_STEP_TASKS_PER_NODE": f"{tasks_per_node}(x2)",
            "SLURM_NODEID": str(node), "SLURM_PROCID": str(task), "SLURM_LOCALID": str(task % tasks_per_node),
            "SLURMD_NODENAME": f"gpu0{7 + node}"}


def test_srun_one_task_per_node_is_the_per_node_start():
    from minicpm_train.args import ResolvedRun, RunOptions
    from minicpm_train.launch import launcher_command, plan_run

    def launched(launch: LaunchOptions, env: dict) -> list[str]:
        run = ResolvedRun(RunOptions(), launch, {"output_dir": "out", "deepspeed": "zero3.json"})
        _, plan = plan_run(run, devices=[], env=env)
        return launcher_command(plan, Path("r.json"))

    by_hand = launched(LaunchOptions(num_gpus=2, num_nodes=2, node_rank=1, master_addr="gpu07",
                                     master_port=15000 + 2042), {})
    assert launched(LaunchOptions(num_gpus=2), _srun_env(1, tasks_per_node=1)) == by_hand
    exported = {**_srun_env(1, tasks_per_node=1), "MASTER_ADDR": "10.1.0.7", "MASTER_PORT": "30401"}
    assert "10.1.0.7" in launched(LaunchOptions(num_gpus=2), exported) and "30401" in launched(
        LaunchOptions(num_gpus=2), exported)


def test_srun_one_task_per_gpu_makes_each_task_the_rank_the_launcher_would_start():
    """Task 3 of 2 nodes x 2 tasks gets the ranks DeepSpeed's launcher gives node 1's second process."""
    from minicpm_train.args import ResolvedRun, RunOptions
    from minicpm_train.launch import plan_run

    run = ResolvedRun(RunOptions(), LaunchOptions(), {"output_dir": "out"})
    resolved, plan = plan_run(run, devices=[], env=_srun_env(3, tasks_per_node=2))
    assert plan.mode == "rank" and not plan.launcher_argv
    node_rank, local, per_node = 1, 1, 2  # deepspeed.launcher.launch: global rank = the node's first rank + local
    assert {k: plan.env[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "CROSS_RANK", "MASTER_ADDR")} == {
        "RANK": str(node_rank * per_node + local), "LOCAL_RANK": str(local), "WORLD_SIZE": "4",
        "CROSS_RANK": str(node_rank), "MASTER_ADDR": "gpu07"}
    assert resolved.env["RANK"] == "3" and any("this task is rank 3" in n for n in resolved.notices)


def test_outside_srun_a_multi_node_allocation_says_how_to_start():
    from minicpm_train.nodes import slurm_launch

    env = {"SLURM_JOB_ID": "7", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_NODEID": "0",
           "SLURM_PROCID": "0"}
    launch, rank_env, notices = slurm_launch(LaunchOptions(), env)
    assert launch == LaunchOptions() and not rank_env
    assert "srun --ntasks-per-node=1 minicpm-train run" in notices[0]


def test_guide_scripts_started_once_per_node(tmp_path):
    from minicpm_train.guide_script import resolve_script

    torchrun = tmp_path / "torchrun.sh"
    torchrun.write_text("torchrun --nnodes 2 --node_rank 1 --nproc_per_node 8 --rdzv_backend c10d "
                        "--rdzv_endpoint gpu01:29400 finetune.py --model_name_or_path m --output_dir o "
                        "--train_data_path t.json\n")
    _, run = resolve_script(torchrun, [])
    assert (run.launch.num_nodes, run.launch.node_rank, run.launch.master_addr, run.launch.master_port,
            run.launch.num_gpus) == (2, 1, "gpu01", 29400, 8)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("gpu01 slots=8\ngpu02 slots=8\n")
    deepspeed = tmp_path / "ds.sh"
    deepspeed.write_text(f"deepspeed --hostfile {hostfile} --no_ssh --node_rank 0 --master_addr gpu01 finetune.py "
                         "--model_name_or_path m --output_dir o --train_data_path t.json\n")
    _, run = resolve_script(deepspeed, [])
    assert (run.launch.hostfile, run.launch.node_rank) == (str(hostfile), 0)
    assert not any("no_ssh" in notice for notice in run.notices)  # implied by --node_rank, not ignored


def test_plan_partitions_over_every_node_and_shows_cpu_memory_per_node(tmp_path):
    from minicpm_train.plan import plan_from_argv

    def plan(preset: str, *more: str):
        return plan_from_argv(["--model_name_or_path", "MiniCPM4-8B", "--bf16", "--per_device_train_batch_size", "4",
                               "--model_max_length", "2048", "--activation_checkpointing", "true", "--deepspeed",
                               preset, *more], gpu_memory_gib=80, devices=[])

    one, two = plan("zero3", "--num_gpus", "8"), plan("zero3", "--num_gpus", "8", "--num_nodes", "2")
    sixteen = plan("zero3", "--num_gpus", "16")  # one node of 16 GPUs: as many ranks
    assert (two.settings.num_gpus, two.settings.num_nodes) == (16, 2)
    assert two.estimate.total == sixteen.estimate.total < one.estimate.total  # ZeRO-3 partitions over all 16
    offload_two, offload_one = (plan("zero3_offload", "--num_gpus", "8", *nodes) for nodes in (["--num_nodes", "2"], []))
    assert offload_two.estimate.cpu_offload * 2 == offload_one.estimate.cpu_offload  # each node holds its share
    flags = ["--model_name_or_path", "MiniCPM4-8B", "--num_gpus", "8"]
    hostfile = tmp_path / "hosts"
    hostfile.write_text("gpu07 slots=8\ngpu08 slots=8\n")
    assert plan_from_argv(flags + ["--hostfile", str(hostfile)], gpu_memory_gib=80,
                          devices=[]).settings.num_nodes == 2


def test_doctor_checks_what_several_nodes_need():
    from minicpm_train.doctor import Environment, check

    def node_checks(**changes) -> dict:
        env = Environment(python="3.11.7", platform="Linux x86_64", torch="2.13.0+cu128", torch_cuda="12.8",
                          cuda_available=True, gpus=[], packages={}, interfaces={"lo": ["127.0.0.1"],
                          "eth0": ["10.0.0.7"], "ib0": ["192.168.0.7"], "docker0": ["172.17.0.1"]},
                          hostname="gpu07", hostname_address="10.0.0.7", launchers={"pdsh": True, "ssh": True})
        for name, value in changes.items():
            setattr(env, name, value)
        return {c.item: c for c in check(env)}

    healthy = node_checks(env={"NCCL_SOCKET_IFNAME": "^docker,lo", "GLOO_SOCKET_IFNAME": "ib0"})
    assert healthy["NCCL_SOCKET_IFNAME"].verdict == "ok" and healthy["NCCL_SOCKET_IFNAME"].value.endswith("eth0, ib0")
    assert healthy["GLOO_SOCKET_IFNAME"].verdict == "ok" and healthy["host name"].verdict == "ok"
    assert healthy["--hostfile launch"].verdict == "ok" and "SLURM" not in healthy
    wrong = node_checks(env={"GLOO_SOCKET_IFNAME": "eth1", "NCCL_IB_DISABLE": "1"})
    assert wrong["GLOO_SOCKET_IFNAME"].verdict == "fail" and "set it to one of eth0, ib0, docker0" in \
        wrong["GLOO_SOCKET_IFNAME"].advice
    assert wrong["NCCL_IB_DISABLE"].verdict == "warn"
    local = node_checks(hostname_address="127.0.1.1", launchers={"pdsh": False, "ssh": True})
    assert "give --master_addr as an IP address" in local["host name"].advice
    assert local["--hostfile launch"].value == "no pdsh"
    outside = node_checks(env={"SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NNODES": "2"})
    assert outside["SLURM"].verdict == "warn" and "srun --ntasks-per-node=1" in outside["SLURM"].advice
    inside = node_checks(env=_srun_env(1, tasks_per_node=1))
    assert inside["SLURM"].value == "job 4242042, step on gpu07, gpu08: node 1, rank 1"


# --- unit tests: agreement and failures -----------------------------------------------------------------------


def _record(rank: int, node: int, *, rows: str = "aaaa", step: int | None = 8, out: str = "/shared/out") -> dict:
    return {"rank": rank, "node": node, "host": f"host-{node}", "rows": {"train": rows}, "rendered": [],
            "step": step, "output_dir": out}


def test_agreement_names_the_node_that_lacks_the_checkpoint_and_the_ranks_with_other_rows():
    from minicpm_train.nodes import NodesError, check_checkpoint, check_rows

    agreeing = [_record(rank, rank // 2) for rank in range(4)]
    check_rows(agreeing)
    check_checkpoint(agreeing, "auto")
    lacking = agreeing[:2] + [_record(rank, 1, step=None, out="/local/out") for rank in (2, 3)]
    with pytest.raises(NodesError, match=r"^--resume_from_checkpoint auto: the nodes would resume from different "
                                         r"steps \(node 0 \(host-0\): step 8; node 1 \(host-1\): no checkpoint\): "
                                         r"node 1 \(host-1\) in /local/out lacks the checkpoint of step 8 that "
                                         r"node 0 \(host-0\) resumes from"):
        check_checkpoint(lacking, "auto")
    older = agreeing[:2] + [_record(rank, 1, step=4) for rank in (2, 3)]
    with pytest.raises(NodesError, match=r"node 1 \(host-1\) in /shared/out lacks the checkpoint of step 8"):
        check_checkpoint(older, "auto")
    with pytest.raises(NodesError, match=r"^the ranks do not hold the same train rows: rank 3 on node 1 \(host-1\) "
                                         r"differ from the other 3 \(fingerprint aaaa\)"):
        check_rows(agreeing[:3] + [_record(3, 1, rows="bbbb")])


def test_fingerprints_follow_the_rows_of_every_dataset_kind():
    import numpy as np

    from minicpm_train.data import MixedDataset, SupervisedDataset, pack
    from minicpm_train.nodes import fingerprint

    dataset = SupervisedDataset.from_samples([[1, 2, 3], [4, 5]], [[-100, 2, 3], [-100, 5]])
    same = SupervisedDataset.from_samples([[1, 2, 3], [4, 5]], [[-100, 2, 3], [-100, 5]])
    other_label = SupervisedDataset.from_samples([[1, 2, 3], [4, 5]], [[-100, -100, 3], [-100, 5]])
    assert fingerprint(dataset) == fingerprint(same) != fingerprint(other_label)
    assert fingerprint(MixedDataset([dataset], np.array([0, 1]))) != fingerprint(
        MixedDataset([dataset], np.array([1, 0])))
    assert fingerprint(pack(dataset, 8)) != fingerprint(pack(dataset, 4))
    rows = [dataset[0], dataset[1]]
    assert fingerprint(rows) == fingerprint([dict(row) for row in rows])  # any other dataset: row by row


def test_gloo_failures_become_one_line_and_other_errors_stay_errors():
    from torch.distributed import DistStoreError

    from minicpm_train.nodes import lost_contact, lost_contact_message

    reset = RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
                         "[10.77.0.2]:7883: Connection reset by peer. This is typically caused by a remote worker "
                         "hanging or bugs in the application. GLHF!")
    assert lost_contact(reset) == "Read error [10.77.0.2]:7883: Connection reset by peer"
    silent = RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed "
                          "out waiting 60000ms for recv operation to complete")
    assert lost_contact(silent) == "Timed out waiting 60000ms for recv operation to complete"
    assert lost_contact(DistStoreError("Timed out after 61 seconds waiting for clients. 1/2 clients joined."))
    assert lost_contact(RuntimeError("shape mismatch")) is None and lost_contact(ValueError("timed out")) is None
    line = lost_contact_message(lost_contact(silent), {"ddp_timeout": 60}, Path("out/checkpoint-4"))
    assert line.startswith("no answer from another node within --ddp_timeout 60 s: Timed out waiting")
    assert line.endswith("--resume_from_checkpoint auto (latest complete checkpoint: out/checkpoint-4)")
    assert lost_contact_message("Read error", {}, None).startswith("lost contact with another node")


def test_a_nodes_launch_fails_with_its_ranks_first_own_error(tmp_path, monkeypatch):
    """The ranks of a node leave their failures; its `minicpm-train run` says the one that caused the others."""
    from minicpm_train.launch import LaunchError, decide, run_launcher
    from minicpm_train.args import ResolvedRun, RunOptions
    from minicpm_train.nodes import error_folder

    def ranks_fail(argv, env):
        errors = error_folder(Path(argv[-1]))
        reports = [(0, True, "lost contact with another node: reset", 2.0), (1, False, "data file not found", 3.0)]
        for rank, lost, message, at in reports:
            (errors / f"rank-{rank}.json").write_text(json.dumps(
                {"rank": rank, "node": 0, "host": "h", "lost_contact": lost, "message": message, "time": at}))
        return 1

    monkeypatch.setattr("subprocess.call", ranks_fail)
    run = ResolvedRun(RunOptions(), LaunchOptions(num_gpus=2), {"output_dir": str(tmp_path)})
    with pytest.raises(LaunchError, match="^data file not found$"):
        run_launcher(run, decide(LaunchOptions(num_gpus=2), []))
    assert list(tmp_path.iterdir()) == []  # the resolved run, its hostfile and error folder are gone
    monkeypatch.setattr("subprocess.call", lambda argv, env: 137)
    with pytest.raises(LaunchError, match="stopped with exit code 137 without an error of their own"):
        run_launcher(run, decide(LaunchOptions(num_gpus=2), []))


# --- two hosts ------------------------------------------------------------------------------------------------


def _why_no_namespaces() -> str | None:
    if sys.platform != "linux":
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "making network namespaces needs root"
    if not shutil.which("ip") or not shutil.which("unshare"):
        return "no `ip` (iproute2) or `unshare` (util-linux) to make the hosts"
    return None


class TwoHosts:
    """Two network namespaces joined by a veth pair: host-0 at 10.77.0.1, host-1 at 10.77.0.2."""

    def __init__(self):
        tag = os.getpid() % 100000
        self.namespaces = (f"mcpm{tag}a", f"mcpm{tag}b")
        self.interfaces = (f"mc{tag}a", f"mc{tag}b")
        self.processes: list[subprocess.Popen] = []

    def create(self) -> None:
        (a, b), (va, vb) = self.namespaces, self.interfaces
        commands = [["ip", "netns", "add", a], ["ip", "netns", "add", b],
                    ["ip", "link", "add", va, "type", "veth", "peer", "name", vb],
                    ["ip", "link", "set", va, "netns", a], ["ip", "link", "set", vb, "netns", b]]
        for namespace, interface, address in zip(self.namespaces, self.interfaces, ADDRESSES):
            commands += [["ip", "-n", namespace, "addr", "add", f"{address}/24", "dev", interface],
                         ["ip", "-n", namespace, "link", "set", interface, "up"],
                         ["ip", "-n", namespace, "link", "set", "lo", "up"]]
        for command in commands:
            subprocess.run(command, check=True, capture_output=True, text=True)

    def remove(self) -> None:
        for process in self.processes:
            self.kill(process)
        for namespace in self.namespaces:  # deleting a namespace deletes its end of the veth pair, and the pair
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)

    def start(self, node: int, argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
        """``argv`` on host ``node`` (its own host name too), in a session of its own, output into ``log``."""
        on_host = ["ip", "netns", "exec", self.namespaces[node], "unshare", "--uts", "sh", "-c",
                   'hostname "$0" && exec "$@"', f"host-{node}", *argv]
        environment = {**os.environ, "GLOO_SOCKET_IFNAME": self.interfaces[node], "OMP_NUM_THREADS": "1",
                       "PYTHONUNBUFFERED": "1", **(env or {})}
        with log.open("w") as output:
            process = subprocess.Popen(on_host, stdout=output, stderr=subprocess.STDOUT, env=environment,
                                       start_new_session=True)
        self.processes.append(process)
        return process

    def link(self, up: bool) -> None:
        subprocess.run(["ip", "-n", self.namespaces[1], "link", "set", self.interfaces[1], "up" if up else "down"],
                       check=True)

    @staticmethod
    def kill(process: subprocess.Popen) -> None:
        """The process and everything it started (its session), even what outlived it."""
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()


@pytest.fixture(scope="module")
def hosts():
    reason = _why_no_namespaces()
    if reason:
        pytest.skip(reason)
    pair = TwoHosts()
    try:
        pair.create()
    except subprocess.CalledProcessError as error:
        pair.remove()
        pytest.skip(f"cannot make network namespaces here: {' '.join(error.cmd)}: {error.stderr.strip()}")
    yield pair
    pair.remove()


@pytest.fixture
def probe(tmp_path) -> tuple[dict[str, str], Path]:
    """The environment that makes every rank log its renders and a digest of its rows (test_train_launcher's
    probe), and the log."""
    from test_train_launcher import _RANK_PROBE

    folder = tmp_path / "probe"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(_RANK_PROBE)
    log = tmp_path / "ranks.log"
    env = {"PYTHONPATH": os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")]), "RANK_PROBE_LOG": str(log)}
    return env, log


def _node_argv(model: Path, output: Path, cache: Path, node: int, port: int, *extra: str, steps: int) -> list[str]:
    return [CLI, "run", *task_argv(model, output, cache, steps=steps), "--save_steps", "4", "--eval_steps", "4",
            "--num_nodes", "2", "--node_rank", str(node), "--master_addr", ADDRESSES[0], "--master_port", str(port),
            "--ddp_timeout", str(FAULT_TIMEOUT_S), *extra]


def _one_process_reference(model: Path, output: Path, cache: Path, *extra: str, steps: int) -> list[dict]:
    """The same run in this process, one rank with the 2-node run's global batch; its log history."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    argv = [*task_argv(model, output, cache, steps=steps), "--eval_steps", "4", "--save_strategy", "no", *extra]
    for flag, value in (("--per_device_train_batch_size", "16"), ("--per_device_eval_batch_size", "32")):
        argv[argv.index(flag) + 1] = value
    try:
        return run_in_process(argv).log_history
    finally:
        unset_hf_deepspeed_config()  # a ZeRO-3 run leaves transformers loading every later model as ZeRO-3


def _wait(processes: list[subprocess.Popen], logs: list[Path], timeout: float = 600) -> list[int]:
    deadline = time.monotonic() + timeout
    for process in processes:
        try:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for other in processes:
                TwoHosts.kill(other)
            pytest.fail("the nodes did not finish:\n" + "\n".join(log.read_text()[-3000:] for log in logs))
    return [process.returncode for process in processes]


def _losses(history: list[dict]) -> list[tuple[int, str, float]]:
    return [(entry["step"], key, entry[key]) for entry in history for key in ("loss", "eval_loss") if key in entry]


def _assert_equal_losses(run: list[dict], reference: list[dict]) -> float:
    """The logged losses match step for step within 1e-5 relative; returns the largest relative difference."""
    ours, theirs = _losses(run), _losses(reference)
    assert [(step, key) for step, key, _ in ours] == [(step, key) for step, key, _ in theirs]
    worst = max(abs(a - b) / abs(b) for (_, _, a), (_, _, b) in zip(ours, theirs))
    assert worst <= 1e-5, (ours, theirs)
    return worst


def _assert_complete_checkpoints(output: Path, steps: list[int], *, shards: str) -> None:
    """Every checkpoint holds what each of the 2 ranks saved, and DeepSpeed's shards of both."""
    for step in steps:
        folder = output / f"checkpoint-{step}"
        assert (folder / "trainer_state.json").is_file(), sorted(p.name for p in folder.iterdir())
        assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in folder.iterdir()}
        shard_names = {p.name for p in (folder / f"global_step{step}").iterdir()}
        assert {shards.format(rank=rank) for rank in (0, 1)} <= shard_names, shard_names
        assert json.loads((folder / "trainer_state.json").read_text())["global_step"] == step
    assert latest_checkpoint(output) == output / f"checkpoint-{steps[-1]}"


def _errors(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if line.startswith("error:")]


def _renders(probe_log: Path) -> list[str]:
    return [line.split()[0] for line in probe_log.read_text().splitlines() if line.endswith(" render")]


def _start_nodes(hosts, tmp_path: Path, name: str, argv_of, env: dict) -> tuple[list[subprocess.Popen], list[Path]]:
    """Node 0 and node 1 of a run (``argv_of(node)``), with their logs ``NAME0.log`` and ``NAME1.log``."""
    logs = [tmp_path / f"{name}{node}.log" for node in (0, 1)]
    return [hosts.start(node, argv_of(node), logs[node], env) for node in (0, 1)], logs


def _until_checkpoint(output: Path, step: int, nodes: list[subprocess.Popen], logs: list[Path]) -> None:
    """Wait until rank 0 marked ``checkpoint-STEP`` complete (every rank has written its part by then)."""
    state = output / f"checkpoint-{step}" / "trainer_state.json"
    deadline = time.monotonic() + 600
    while not state.is_file() and all(n.poll() is None for n in nodes) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert state.is_file(), "".join(log.read_text()[-3000:] for log in logs)


def _assert_nothing_looks_finished(output: Path, steps: int) -> None:
    assert not (output / "metrics.json").exists() and not (output / "model.safetensors").exists()
    assert not (output / "adapter_model.safetensors").exists()
    assert latest_checkpoint(output).name != f"checkpoint-{steps}"  # killed mid-run; half-written is not complete


def _resumed(hosts, tmp_path: Path, output: Path, argv_of, env: dict, reference: list[dict]) -> list[Path]:
    """Both nodes started again with ``--resume_from_checkpoint auto``: they finish from the latest complete
    checkpoint, with the reference's losses; returns their logs."""
    latest = latest_checkpoint(output)
    nodes, logs = _start_nodes(hosts, tmp_path, "resume", lambda node: [*argv_of(node), "--resume_from_checkpoint",
                                                                         "auto"], env)
    assert _wait(nodes, logs) == [0, 0], "".join(log.read_text()[-3000:] for log in logs)
    assert f"resume: {latest}" in logs[0].read_text() and "done: node 1 of 2 finished" in logs[1].read_text()
    history = json.loads((output / "metrics.json").read_text())["log_history"]
    print(f"resumed from {latest.name}: largest relative loss difference to one process "
          f"{_assert_equal_losses(history, reference):.1e}")
    return logs


@pytest.mark.slow
def test_zero3_full_node_lost_then_both_resumed_equals_one_process(tmp_path, hosts, probe, tiny_llama):
    env, probe_log = probe
    output, cache, steps = tmp_path / "out", tmp_path / "shared-cache", 8
    reference = _one_process_reference(tiny_llama, tmp_path / "reference", tmp_path / "reference-cache",
                                       "--deepspeed", "zero3", steps=steps)
    argv_of = {name: (lambda node, port=port: _node_argv(tiny_llama, output, cache, node, port, "--deepspeed", "zero3",
                                                       steps=steps)) for name, port in (("node", 30400), ("resume", 30401))}
    nodes, logs = _start_nodes(hosts, tmp_path, "node", argv_of["node"], env)
    _until_checkpoint(output, 4, nodes, logs)
    hosts.kill(nodes[1])  # node 1 dies: its launcher and ranks at once
    killed = time.monotonic()
    assert _wait(nodes[:1], logs)[0] != 0
    exit_s = time.monotonic() - killed
    assert exit_s < FAULT_TIMEOUT_S
    errors = _errors(logs[0])
    assert len(errors) == 1 and errors[0].startswith("error: lost contact with another node"), logs[0].read_text()
    assert "--resume_from_checkpoint auto (latest complete checkpoint:" in errors[0]
    _assert_nothing_looks_finished(output, steps)
    print(f"\nnode 0 exited {exit_s:.1f} s after node 1 was killed (--ddp_timeout {FAULT_TIMEOUT_S})")

    _resumed(hosts, tmp_path, output, argv_of["resume"], env, reference)
    _assert_complete_checkpoints(output, [4, 8], shards="zero_pp_rank_{rank}_mp_rank_00_model_states.pt")
    assert (output / "model.safetensors").is_file() and (output / "config.json").is_file()
    assert len(_renders(probe_log)) == 2  # one shared cache: train and dev rendered once in all, by either node


@pytest.mark.slow
def test_zero2_lora_both_nodes_killed_then_resumed_equals_one_process(tmp_path, hosts, probe, tiny_llama):
    env, probe_log = probe
    output, steps = tmp_path / "out", 8
    # No LoRA dropout: its masks are drawn per rank, so two ranks of 8 samples draw other masks than one of 16.
    lora = ("--deepspeed", "zero2", "--use_lora", "--lora_dropout", "0")
    reference = _one_process_reference(tiny_llama, tmp_path / "reference", tmp_path / "reference-cache", *lora,
                                       steps=steps)
    argv_of = {name: (lambda node, port=port: _node_argv(tiny_llama, output, tmp_path / f"cache-{node}", node, port,
                                                       *lora, steps=steps)) for name, port in (("node", 30410),
                                                                                               ("resume", 30411))}
    nodes, logs = _start_nodes(hosts, tmp_path, "node", argv_of["node"], env)
    _until_checkpoint(output, 4, nodes, logs)
    for node in nodes:  # both nodes die at once (a preempted job)
        hosts.kill(node)
    _assert_nothing_looks_finished(output, steps)

    _resumed(hosts, tmp_path, output, argv_of["resume"], env, reference)
    _assert_complete_checkpoints(output, [4, 8], shards="zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    assert (output / "adapter_model.safetensors").is_file()
    assert sorted(_renders(probe_log)) == ["0", "0", "1", "1"]  # node-local caches: each node renders its own once
    ranks = json.loads((output / "data_summary.json").read_text())["ranks"]
    assert [(r["rank"], r["node"], r["host"]) for r in ranks] == [(0, 0, "host-0"), (1, 1, "host-1")]
    assert ranks[0]["rows"] == ranks[1]["rows"] and not any(r["rendered"] for r in ranks)  # resumed: all cached


@pytest.mark.slow
def test_four_ranks_through_torchrun_render_once_per_node_and_hold_the_same_rows(tmp_path, hosts, probe, tiny_llama):
    env, probe_log = probe
    output = tmp_path / "out"
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    nodes = [hosts.start(node, [*_node_argv(tiny_llama, output, tmp_path / f"cache-{node}", node, 30420,
                                            "--use_lora", "--num_gpus", "2", "--save_strategy", "no", steps=2)],
                         logs[node], env) for node in (0, 1)]
    assert _wait(nodes, logs) == [0, 0], logs[0].read_text()[-3000:] + logs[1].read_text()[-3000:]
    assert "run: launcher on node 0 of 2, 2 CPU processes here, fp32, LoRA" in logs[0].read_text()
    lines = probe_log.read_text().splitlines()
    by_node = [int(rank) // 2 for rank in _renders(probe_log)]
    assert sorted(by_node) == [0, 0, 1, 1]  # node-local caches: each node renders train and dev once
    digests = {line.split()[0]: line.split()[2:] for line in lines if " data train.json " in line}
    assert sorted(digests) == ["0", "1", "2", "3"] and len({tuple(d) for d in digests.values()}) == 1
    ranks = json.loads((output / "data_summary.json").read_text())["ranks"]
    assert [(r["rank"], r["node"]) for r in ranks] == [(0, 0), (1, 0), (2, 1), (3, 1)]
    assert len({json.dumps(r["rows"]) for r in ranks}) == 1
    assert sorted(r["rank"] // 2 for r in ranks if r["rendered"]) == [0, 1]  # one renderer per node
    assert "data rows: the same on all 4 ranks of 2 nodes" in logs[0].read_text()


_BARE_NODE = """
import os, sys, time
from pathlib import Path
from minicpm_train import nodes

node, output = int(sys.argv[1]), Path(sys.argv[2])
os.environ.update(RANK=str(node), LOCAL_RANK="0", WORLD_SIZE="2", CROSS_RANK=str(node), MASTER_ADDR="{master}",
                  MASTER_PORT=sys.argv[3])
nodes.join({{"ddp_timeout": {timeout}}})
checkpoint = output / "checkpoint-4"
resume = str(checkpoint) if checkpoint.is_dir() else None
try:
    nodes.agree({{}}, rendered=[], resume=resume, requested="auto", output_dir=output, report=print)
    print("agreed", flush=True)
    import torch, torch.distributed as dist
    while True:
        dist.all_reduce(torch.ones(4))
        time.sleep(0.05)
except Exception as error:
    cause = nodes.lost_contact(error)
    message = str(error) if cause is None else nodes.lost_contact_message(cause, {{"ddp_timeout": {timeout}}}, None)
    nodes.stop(message, None, lost=cause is not None)
"""


@pytest.mark.slow
def test_a_node_without_the_checkpoint_and_a_node_cut_off_each_end_the_run_with_one_line(tmp_path, hosts):
    """Bare ranks (the process group, the agreement, a collective; no training): node 1 lacks node 0's checkpoint,
    then, with agreeing nodes, node 1's link goes down mid-collective."""
    timeout = 4
    script = tmp_path / "node.py"
    script.write_text(_BARE_NODE.format(master=ADDRESSES[0], timeout=timeout))
    (tmp_path / "out-0" / "checkpoint-4").mkdir(parents=True)
    (tmp_path / "out-0" / "checkpoint-4" / "trainer_state.json").write_text('{"global_step": 4}')
    (tmp_path / "out-1").mkdir()
    logs = [tmp_path / f"lacking{node}.log" for node in (0, 1)]
    ranks = [hosts.start(node, [sys.executable, str(script), str(node), str(tmp_path / f"out-{node}"), "30430"],
                         logs[node]) for node in (0, 1)]
    assert _wait(ranks, logs, timeout=120) == [1, 1]
    for log in logs:
        errors = _errors(log)
        assert len(errors) == 1 and "node 1 (host-1) in " in errors[0] and "lacks the checkpoint of step 4" in errors[0]

    logs = [tmp_path / f"cut{node}.log" for node in (0, 1)]
    ranks = [hosts.start(node, [sys.executable, str(script), str(node), str(tmp_path / "out-1"), "30431"],
                         logs[node]) for node in (0, 1)]
    deadline = time.monotonic() + 120
    while not all("agreed" in log.read_text() for log in logs) and time.monotonic() < deadline:
        time.sleep(0.05)
    hosts.link(up=False)
    cut = time.monotonic()
    try:
        codes = _wait(ranks, logs, timeout=120)
    finally:
        hosts.link(up=True)
    waited = time.monotonic() - cut
    assert codes == [1, 1] and timeout <= waited + 0.5 < timeout + 60
    print(f"\nboth nodes exited {waited:.1f} s after the link went down (--ddp_timeout {timeout})")
    for log in logs:
        errors = _errors(log)
        assert len(errors) == 1 and errors[0].startswith(f"error: no answer from another node within --ddp_timeout "
                                                         f"{timeout} s"), log.read_text()
