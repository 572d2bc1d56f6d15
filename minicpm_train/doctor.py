"""What a training run depends on, checked: ``gather()`` describes this machine, ``check()`` judges it.

``check`` is a pure function of an :class:`Environment`, so tests feed it simulated GPUs. The
hardware rules (bf16 support, RTX 40-series NCCL settings) are ``minicpm_train.launch``'s, the same
the run applies.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from minicpm_train.launch import NCCL_CONSUMER_ENV, Device

# Lowest versions the toolkit is written against (transformers 5 APIs: dtype=, processing_class=,
# eval_strategy; MiniCPM3 native since 5.13; the built-in MiniCPM class follows 5.24's Llama). None: only reported.
MINIMUM_VERSIONS = {"transformers": "5.24", "peft": "0.14", "deepspeed": "0.15", "bitsandbytes": "0.45",
                    "accelerate": "1.0", "torch": "2.4"}
OPTIONAL = {"deepspeed": "--deepspeed", "bitsandbytes": "--qlora"}
GUIDE_MIN_CAPABILITY = (7, 5)  # the guide: RTX 20 series or newer
LORA_GIB, QLORA_GIB = 12, 6  # the guide's minimum GPU memory for LoRA and for QLoRA


@dataclass
class Environment:
    """A description of the machine, gathered by :func:`gather` or written by a test."""

    python: str
    platform: str
    torch: str | None
    torch_cuda: str | None  # the CUDA version torch was built with; None for a CPU build
    cuda_available: bool
    gpus: list[Device]
    packages: dict[str, str | None]
    env: dict[str, str] = field(default_factory=dict)
    deepspeed_ops: dict[str, bool] = field(default_factory=dict)  # op -> can it build here
    deepspeed_accelerator: str | None = None
    ninja: bool = False
    compiler: str | None = None
    nvcc: str | None = None
    bnb_backend: str | None = None
    bnb_error: str | None = None
    # Several nodes (None: not gathered): interface -> IPv4 addresses, the host name and what it resolves to.
    interfaces: dict[str, list[str]] | None = None
    hostname: str | None = None
    hostname_address: str | None = None
    launchers: dict[str, bool] = field(default_factory=dict)  # pdsh, ssh: what --hostfile needs


@dataclass
class Check:
    item: str
    value: str
    verdict: str  # ok | warn | fail | info
    advice: str = ""


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def gather() -> Environment:
    """Describe this machine: Python, torch/CUDA, GPUs, libraries, DeepSpeed ops, bitsandbytes."""
    import logging

    from minicpm_train.launch import detect_devices

    packages = {name: _version(name) for name in ("transformers", "peft", "deepspeed", "bitsandbytes",
                                                  "accelerate", "torch")}
    environment = Environment(
        python=platform.python_version(), platform=f"{platform.system()} {platform.machine()}",
        torch=packages.pop("torch"), torch_cuda=None, cuda_available=False, gpus=[], packages=packages,
        env={k: v for k, v in os.environ.items()
             if k.startswith(("NCCL_", "GLOO_", "SLURM_")) or k in ("CUDA_VISIBLE_DEVICES", "MASTER_ADDR")},
        compiler=shutil.which("c++") or shutil.which("g++") or shutil.which("gcc"), nvcc=shutil.which("nvcc"),
        launchers={name: bool(shutil.which(name)) for name in ("pdsh", "ssh")}, **_network())
    if environment.torch is None:
        return environment
    import torch

    environment.torch_cuda = torch.version.cuda
    environment.cuda_available = torch.cuda.is_available()
    environment.gpus = detect_devices()
    from torch.utils.cpp_extension import is_ninja_available

    environment.ninja = is_ninja_available()
    if packages["deepspeed"]:
        try:
            logging.disable(logging.WARNING)  # its import warns "Setting accelerator to CPU": ours to say
            try:
                from deepspeed.accelerator import get_accelerator
            finally:
                logging.disable(logging.NOTSET)
            accelerator = get_accelerator()
            environment.deepspeed_accelerator = accelerator._name
            for op, builder in (("cpu_adam", "CPUAdamBuilder"), ("fused_adam", "FusedAdamBuilder")):
                op_builder = accelerator.create_op_builder(builder)
                environment.deepspeed_ops[op] = bool(op_builder and op_builder.is_compatible(False))
        except Exception as error:  # a broken install must not stop the report
            environment.deepspeed_ops["import"] = False
            environment.deepspeed_accelerator = f"error: {error}"
    if packages["bitsandbytes"]:
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        try:
            from bitsandbytes import cextension

            environment.bnb_backend = cextension.BNB_BACKEND
            if type(cextension.lib).__name__.startswith("ErrorHandler"):
                environment.bnb_error = "no native library for this platform"
        except Exception as error:
            environment.bnb_error = str(error).splitlines()[0]
    return environment


def _network() -> dict:
    """This machine's IPv4 interfaces and the address its host name resolves to (what gloo binds to by default)."""
    import socket

    import psutil

    interfaces = {name: [a.address for a in addresses if a.family == socket.AF_INET]
                  for name, addresses in psutil.net_if_addrs().items()}
    hostname = socket.gethostname()
    try:
        address = socket.gethostbyname(hostname)
    except OSError:
        address = None
    return {"interfaces": interfaces, "hostname": hostname, "hostname_address": address}


def _at_least(version: str, minimum: str) -> bool:
    from packaging.version import Version

    return Version(version.split("+")[0]) >= Version(minimum)


def _gpu_checks(env: Environment) -> list[Check]:
    from minicpm_train.launch import LaunchOptions, decide

    checks: list[Check] = []
    if not env.gpus:
        if env.torch_cuda:
            advice = "no GPU visible: check the driver (nvidia-smi) and CUDA_VISIBLE_DEVICES"
        else:
            advice = "CPU only: fine for the tiny test models; a MiniCPM run needs a CUDA GPU and a CUDA build of torch"
        return [Check("GPU", "none", "warn", advice),
                Check("bf16", "CPU", "info", "no GPU: runs train in float32 (--bf16 is ignored, --fp16 refused)"),
                Check("NCCL", "not used", "info", "CPU runs use the gloo backend")]
    if env.torch_cuda is None or not env.cuda_available:
        checks.append(Check("torch CUDA", "CPU build" if env.torch_cuda is None else "not available", "fail",
                            "GPUs are present but torch cannot use them: install a CUDA build of torch matching "
                            "the driver"))
    for index, gpu in enumerate(env.gpus):
        major, minor = gpu.compute_capability
        value = f"{gpu.name}, {gpu.memory_gib:.1f} GiB, compute {major}.{minor}"
        if gpu.compute_capability < GUIDE_MIN_CAPABILITY:
            verdict, advice = "warn", "older than the guide's minimum (RTX 20 series, compute 7.5)"
        elif gpu.memory_gib < QLORA_GIB:
            verdict, advice = "warn", f"under {QLORA_GIB} GiB: even QLoRA of MiniCPM-2B may not fit (check with plan)"
        elif gpu.memory_gib < LORA_GIB:
            verdict, advice = "warn", f"under {LORA_GIB} GiB: use --qlora (check with `minicpm-train plan`)"
        else:
            verdict, advice = "ok", ""
        checks.append(Check(f"GPU {index}", value, verdict, advice))
    no_bf16 = [gpu.name for gpu in env.gpus if not gpu.supports_bf16]
    checks.append(Check("bf16", "no" if no_bf16 else "yes", "warn" if no_bf16 else "ok",
                        f"{no_bf16[0]} has no bf16: use --fp16 or --precision auto" if no_bf16 else "use --bf16"))
    if len(env.gpus) > 1:
        needed = decide(LaunchOptions(), env.gpus).env
        nccl = {k: v for k, v in needed.items() if k in NCCL_CONSUMER_ENV}
        if not nccl:
            checks.append(Check("NCCL", "defaults", "ok", ""))
        else:
            wanted = " ".join(f"{k}={v}" for k, v in nccl.items())
            unset = [k for k, v in nccl.items() if env.env.get(k) != v]
            checks.append(Check("NCCL", wanted if not unset else f"{', '.join(unset)} not set",
                                "ok" if not unset else "info",
                                "" if not unset else f"RTX 40-series: `minicpm-train run` sets {wanted} itself; "
                                                     f"export them for other launchers"))
    else:
        checks.append(Check("NCCL", "not needed", "info", "one GPU: no inter-GPU communication"))
    return checks


def _package_checks(env: Environment) -> list[Check]:
    checks = []
    for name in ("transformers", "peft", "accelerate", "deepspeed", "bitsandbytes"):
        version, minimum = env.packages.get(name), MINIMUM_VERSIONS[name]
        if version is None:
            needed_for = OPTIONAL.get(name)
            checks.append(Check(name, "missing", "warn" if needed_for else "fail",
                                f"pip install '{name}>={minimum}'" + (f" (needed for {needed_for})" if needed_for else "")))
        elif not _at_least(version, minimum):
            checks.append(Check(name, version, "fail", f"needs {name}>={minimum}"))
        else:
            checks.append(Check(name, version, "ok"))
    return checks


def _deepspeed_checks(env: Environment) -> list[Check]:
    """The Adam kernel each kind of preset compiles on first use, for this machine's accelerator.

    ``cpu_adam`` (offload presets) always runs on the CPU. ``fused_adam`` (presets without offload) is
    the accelerator's kernel: CUDA, compiled with nvcc, on GPUs; DeepSpeed's C++ build of it on CPU.
    """
    if not env.packages.get("deepspeed"):
        return []
    checks = []
    if "import" in env.deepspeed_ops:
        return [Check("DeepSpeed ops", "cannot import", "fail", env.deepspeed_accelerator or "")]
    accelerator = env.deepspeed_accelerator or "cpu"
    if env.gpus and accelerator == "cpu":
        checks.append(Check("DeepSpeed accelerator", "cpu", "fail", "DeepSpeed does not see the GPUs (CUDA build "
                                                                    "of torch? DS_ACCELERATOR set?)"))
    for op, kernel, purpose in (("cpu_adam", "cpu", "offload presets (zero2_offload, zero3_offload)"),
                                ("fused_adam", accelerator, "presets without offload (zero2, zero3)")):
        if op not in env.deepspeed_ops:
            continue
        tools = [("ninja", env.ninja), ("a C++ compiler", env.compiler)]
        if kernel == "cuda":
            version = f" {env.torch_cuda}" if env.torch_cuda else ""
            tools.append((f"nvcc (the CUDA{version} toolkit torch was built with)", env.nvcc))
        missing = [name for name, present in tools if not present]
        if env.deepspeed_ops[op] and not missing:
            checks.append(Check(f"DeepSpeed {op}", f"can build ({kernel.upper()} kernel)", "ok",
                                f"compiled on first use, for the {purpose}"))
        else:
            reason = f"missing {' and '.join(missing)}" if missing else f"not compatible with {kernel.upper()}"
            checks.append(Check(f"DeepSpeed {op}", "cannot build", "fail" if op == "cpu_adam" else "warn",
                                f"{reason}: needed for the {purpose}"))
    return checks


def _bnb_check(env: Environment) -> list[Check]:
    if not env.packages.get("bitsandbytes"):
        return []
    if env.bnb_error:
        return [Check("bitsandbytes backend", env.bnb_backend or "none", "fail", env.bnb_error)]
    if env.bnb_backend == "CPU" and env.gpus:
        return [Check("bitsandbytes backend", "CPU", "fail", "GPUs present but bitsandbytes uses its CPU backend: "
                                                             "install a CUDA build of torch")]
    advice = "QLoRA runs on CPU (slowly; for tests)" if env.bnb_backend == "CPU" else ""
    return [Check("bitsandbytes backend", env.bnb_backend or "unknown", "ok" if env.bnb_backend else "warn", advice)]


def _interface_matches(spec: str, names: list[str]) -> list[str]:
    """The interfaces an ``NCCL_SOCKET_IFNAME`` / ``GLOO_SOCKET_IFNAME`` value picks: NCCL's ``eth`` (prefix),
    ``=eth0`` (exact) and ``^docker`` (all but) forms; gloo's names are exact."""
    exclude = spec.startswith("^")
    parts = [part for part in spec.lstrip("^").split(",") if part]
    picked = [n for n in names if any(n == part[1:] if part.startswith("=") else n.startswith(part) for part in parts)]
    return [n for n in names if n not in picked and n != "lo"] if exclude else picked


def _node_checks(env: Environment) -> list[Check]:
    """What a run on several nodes needs from this machine: an interface the nodes share, the NCCL / gloo
    interface settings naming it, a host name others can reach, and pdsh/ssh for --hostfile; SLURM, if inside."""
    if env.interfaces is None:
        return []
    shared = {name: addresses for name, addresses in env.interfaces.items()
              if addresses and not all(a.startswith("127.") for a in addresses)}
    checks = [Check("network", ", ".join(f"{n} {' '.join(a)}" for n, a in shared.items()) or "loopback only",
                    "info" if shared else "warn",
                    "several nodes talk over one of these; name it in NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME when "
                    "there are several" if shared else "no interface besides loopback: one node only")]
    for variable, library in (("NCCL_SOCKET_IFNAME", "NCCL"), ("GLOO_SOCKET_IFNAME", "gloo (CPU runs)")):
        value = env.env.get(variable)
        if value is None:
            continue
        picked = _interface_matches(value, list(env.interfaces))
        checks.append(Check(variable, f"{value} -> {', '.join(picked) or 'no interface'}", "ok" if picked else "fail",
                            "" if picked else f"{library} will find no interface of that name here: every run of "
                                              f"several processes fails to connect; set it to one of "
                                              f"{', '.join(shared) or 'lo'}"))
    address = env.hostname_address
    if address is None or address.startswith("127."):
        checks.append(Check("host name", f"{env.hostname} -> {address or 'unresolved'}", "info",
                            "other nodes cannot reach this one by its name: give --master_addr as an IP address, and "
                            "set GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME to the interface the nodes share"))
    else:
        checks.append(Check("host name", f"{env.hostname} -> {address}", "ok"))
    if env.env.get("NCCL_IB_DISABLE") == "1" and any(name.startswith("ib") for name in env.interfaces):
        checks.append(Check("NCCL_IB_DISABLE", "1", "warn", "this machine has InfiniBand, which NCCL now ignores "
                                                             "(slow between nodes): the guide's setting is only for "
                                                             "RTX 40-series cards in one machine"))
    missing = [name for name, present in env.launchers.items() if not present]
    checks.append(Check("--hostfile launch", "pdsh and ssh" if not missing else f"no {' or '.join(missing)}",
                        "ok" if not missing else "info",
                        "" if not missing else "--hostfile needs passwordless ssh and pdsh; a start on each node "
                                               "(--node_rank) or srun needs neither"))
    if env.env.get("SLURM_JOB_ID"):
        from minicpm_train.nodes import SlurmStep, expand_hostlist

        step = SlurmStep.from_env(env.env)
        hosts = expand_hostlist(env.env.get("SLURM_JOB_NODELIST", ""))
        if step is not None:
            checks.append(Check("SLURM", f"job {step.job_id}, step on {', '.join(step.hosts)}: node {step.node_rank}, "
                                         f"rank {step.rank}", "info", ""))
        else:
            checks.append(Check("SLURM", f"job {env.env['SLURM_JOB_ID']} on {', '.join(hosts) or '?'}",
                                "warn" if len(hosts) > 1 else "info",
                                "not under srun: a run started here uses this node only; start it with `srun "
                                "--ntasks-per-node=1 minicpm-train run ...`" if len(hosts) > 1 else ""))
    return checks


def check(env: Environment) -> list[Check]:
    """One verdict per thing a run depends on."""
    python_ok = tuple(map(int, env.python.split(".")[:2])) >= (3, 10)
    checks = [Check("Python", f"{env.python} ({env.platform})", "ok" if python_ok else "fail",
                    "" if python_ok else "needs Python 3.10 or newer")]
    if env.torch is None:
        return checks + [Check("torch", "missing", "fail", "pip install torch (a CUDA build for GPUs)")]
    torch_ok = _at_least(env.torch, MINIMUM_VERSIONS["torch"])
    checks.append(Check("torch", env.torch, "ok" if torch_ok else "fail",
                        "" if torch_ok else f"needs torch>={MINIMUM_VERSIONS['torch']}"))
    checks.append(Check("CUDA (torch build)", env.torch_cuda or "none (CPU build)",
                        "ok" if env.torch_cuda else "info"))
    return (checks + _gpu_checks(env) + _package_checks(env) + _deepspeed_checks(env) + _bnb_check(env)
            + _node_checks(env))


def model_checks(folder: str, *, trust_remote_code: bool = False) -> list[Check]:
    """A model folder: every finding of the folder check at once (config.json, tokenizer files, weights), else
    the tokenizer it loads and the class it loads with (the built-in MiniCPM class, transformers' own, or its
    remote code)."""
    from minicpm_data.errors import MinicpmError
    from minicpm_data.tokenizer import load_tokenizer
    from minicpm_train.model import check_model_folder, loading_notices, model_class

    try:
        config, findings = check_model_folder(Path(folder), trust_remote_code=trust_remote_code)
    except MinicpmError as error:
        return [Check("model class", folder, "fail", str(error))]
    if findings:
        return [Check("model files", str(f.path), "fail", f"{f.problem}; {f.fix}") for f in findings]
    checks = [Check("model files", folder, "ok", "config.json, tokenizer files and weights whole and consistent")]
    try:
        tokenizer = load_tokenizer(folder, trust_remote_code=trust_remote_code)
        vocab_size = config.get("vocab_size")
        checks.append(Check("tokenizer", f"{len(tokenizer):,} tokens", "ok",
                            f"config.json's vocab_size: {vocab_size:,}" if isinstance(vocab_size, int) else ""))
    except MinicpmError as error:
        checks.append(Check("tokenizer", folder, "fail", str(error)))
    loads_with = model_class(config, trust_remote_code=trust_remote_code)
    advice = "; ".join(loading_notices(config, trust_remote_code=trust_remote_code))
    if loads_with.source == "remote code":
        advice = advice or "runs the folder's own Python code, written for the transformers version it names"
    return checks + [Check("model class", str(loads_with), "warn" if loads_with.source == "remote code" else "ok",
                           advice)]


def overall(checks: list[Check]) -> str:
    """``fail`` if any check fails, else ``warn`` if any warns, else ``ok``."""
    verdicts = {c.verdict for c in checks}
    return "fail" if "fail" in verdicts else "warn" if "warn" in verdicts else "ok"
