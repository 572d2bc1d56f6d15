"""Will a run fit? Per-GPU memory for full, LoRA and QLoRA training, with or without DeepSpeed.

Notation: P parameters, T trainable parameters, N data-parallel GPUs, L layers, h hidden size,
i intermediate size, V vocabulary, n = micro batch x model_max_length tokens, c = bytes of the compute
dtype (2 for bf16/fp16, 4 for fp32), a = bytes of Adam state per parameter (8: fp32 m and v; 2 with
an 8-bit optimizer), LL = the largest single weight. All terms are bytes per GPU.

Without DeepSpeed (the Trainer with torch autocast; DDP replicates everything on every GPU):
  full   weights 4P (fp32 masters) + cP (autocast's low-precision copies, kept for backward);
         gradients 4P; optimizer aP
  LoRA   frozen base cP; adapters 4T (+cT autocast copies); gradients 4T; optimizer aT
  QLoRA  base: layer linears in nf4 with double quantisation (4.127 bits each), the rest (embedding,
         lm_head, norms) upcast to fp32 by peft's k-bit preparation; adapters, gradients, optimizer as LoRA
With DeepSpeed (the engine casts the model to c; the optimizer keeps fp32 masters and gradients:
s = a + 8 bytes per trainable parameter when c is 2, a + 4 when fp32), following DeepSpeed's own
``estimate_zero2/3_model_states_mem_needs``:
  ZeRO-0      weights cP; gradients cT; optimizer sT
  ZeRO-1/2    weights cP; gradients cT/N; optimizer sT/N; offload_optimizer moves gradients and
              optimizer to CPU (sT there)
  ZeRO-3      weights cP/N + c*LL (the gathered working set); gradients c*min(T, LL); optimizer sT/N;
              offload_optimizer moves the optimizer (sT), offload_param the weights (cP) to CPU
  buffers     ZeRO-1/2: c x (reduce + allgather bucket, each capped at T), x4.5 with overlap_comm
              (DeepSpeed's documented footprint); ZeRO-3: c x (reduce bucket + prefetch bucket)
Activations (scaled by the micro batch, not by gradient accumulation; samples are padded to the
batch's longest, so model_max_length is the worst case; attention is SDPA, no s^2 score matrix):
  per layer and token, elements saved for backward: 4h (two norms' inputs and outputs) + the attention
  projections' outputs (q, k, v and the attention output; MLA: its latent vectors, normed latents,
  q, k, v and output) + 4i (gate, up, activation, product) + for each LoRA-adapted linear its input
  after dropout and the rank-r product
  logits: n x V x (c + 4 + 4) (the logits, their fp32 upcast for the loss, fp32 log-softmax); n x V x 8 in fp32
  without gradient checkpointing: n x (L x per_layer + 2h) x c + logits  (2h: the final norm)
  with it: n x (L x h + 2h) x c + max(n x per_layer x c, logits)  (the layer inputs are kept; one layer
  is recomputed at a time during backward, after the logits' tensors are gone)
Context: a fixed 1 GiB for the CUDA context, kernels' workspaces and allocator slack.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from minicpm_data.errors import MinicpmError
from minicpm_train.args import QLORA_ZERO3
from minicpm_train.model_sizes import Architecture

MIB = 2**20
GIB = 2**30
CUDA_CONTEXT_BYTES = 1 * GIB
NF4_DOUBLE_QUANT_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # 4-bit weights, 8-bit absmax per 64, fp32 per 256 absmax
OVERLAP_COMM_FACTOR = 4.5
TIGHT_FRACTION = 0.9  # above this share of the GPU, a run is "tight": fragmentation may still tip it over


class PlanError(MinicpmError):
    """The plan's inputs are inconsistent."""


@dataclass(frozen=True)
class DeepSpeedSetup:
    """The parts of a DeepSpeed config that memory depends on."""

    name: str
    stage: int
    offload_optimizer: bool = False
    offload_param: bool = False
    overlap_comm: bool = False
    reduce_bucket_size: float | None = None  # None: "auto"
    allgather_bucket_size: float = 5e8

    @classmethod
    def from_config(cls, config: dict, name: str) -> "DeepSpeedSetup":
        zero = config.get("zero_optimization", {})

        def offloaded(key: str) -> bool:
            return (zero.get(key) or {}).get("device", "none") in ("cpu", "nvme")

        def size(key: str, default):
            value = zero.get(key, default)
            return None if value == "auto" else float(value)

        return cls(name, int(zero.get("stage", 0)), offloaded("offload_optimizer"), offloaded("offload_param"),
                   bool(zero.get("overlap_comm", False)), size("reduce_bucket_size", 5e8),
                   size("allgather_bucket_size", 5e8) or 5e8)


@dataclass(frozen=True)
class PlanSettings:
    """What a run's memory depends on (``plan`` builds it from ``run``'s flags)."""

    method: str = "full"  # full | lora | qlora
    micro_batch: int = 8
    max_length: int = 512
    gradient_accumulation: int = 1
    gradient_checkpointing: bool = False
    precision: str = "bf16"  # bf16 | fp16 | fp32
    deepspeed: DeepSpeedSetup | None = None
    num_gpus: int = 1
    lora_r: int = 64
    lora_targets: tuple[str, ...] | str = ("q_proj", "v_proj")
    optimizer: str = "adamw_torch"

    def flags(self) -> list[str]:
        """The ``run`` flags that reproduce these settings (for suggestions)."""
        flags = ["--per_device_train_batch_size", str(self.micro_batch),
                 "--gradient_accumulation_steps", str(self.gradient_accumulation)]
        if self.gradient_checkpointing:
            flags += ["--activation_checkpointing", "true"]
        if self.method in ("lora", "qlora"):
            flags.append("--use_lora")
        if self.method == "qlora":
            flags.append("--qlora")
        if self.deepspeed:
            flags += ["--deepspeed", self.deepspeed.name]
        return flags


@dataclass
class MemoryEstimate:
    """Bytes per GPU by part, bytes moved to CPU memory, and the parameter counts used."""

    parameters: int
    trainable: int
    weights: int  # frozen (or, for full training, none)
    trainable_weights: int
    gradients: int
    optimizer: int
    activations: int
    buffers: int
    context: int
    cpu_offload: int
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return (self.weights + self.trainable_weights + self.gradients + self.optimizer + self.activations
                + self.buffers + self.context)


def _lora_targets(arch: Architecture, settings: PlanSettings) -> list[str]:
    linears = arch.layer_linears()
    if settings.lora_targets == "all-linear":
        return list(linears)
    missing = [t for t in settings.lora_targets if t not in linears]
    if missing:
        raise PlanError(f"LoRA target {', '.join(missing)} not in this {arch.model_type} model; its layers have "
                        f"{', '.join(linears)} (or use --lora_target all-linear)")
    return list(settings.lora_targets)


def activation_elements_per_token(arch: Architecture, lora_targets: list[str], lora_r: int) -> int:
    """Elements one layer saves for backward per token (see the module docstring)."""
    h, a = arch.hidden_size, arch.num_heads
    if arch.latent_attention:
        qk = arch.qk_nope_head_dim + arch.qk_rope_head_dim
        attention = (2 * (arch.q_lora_rank or 0) + a * qk  # q latent, normed latent, q
                     + (arch.kv_lora_rank + arch.qk_rope_head_dim) + arch.kv_lora_rank  # kv latent, normed
                     + a * (arch.qk_nope_head_dim + arch.v_head_dim)  # kv_b output
                     + a * qk + a * arch.v_head_dim + a * arch.v_head_dim)  # k, v, attention output
    else:
        kv = arch.num_kv_heads * arch.head_dim
        attention = 2 * a * arch.head_dim + 2 * kv  # q and output; k and v
    linears = arch.layer_linears()
    lora = sum(linears[t][0] + lora_r for t in lora_targets)
    return 4 * h + attention + 4 * arch.intermediate_size + lora


def estimate(arch: Architecture, settings: PlanSettings) -> MemoryEstimate:
    """Per-GPU memory of one training run (formulas in the module docstring)."""
    if settings.method not in ("full", "lora", "qlora"):
        raise PlanError(f"method must be full, lora or qlora, not {settings.method!r}")
    if settings.precision not in ("bf16", "fp16", "fp32"):
        raise PlanError(f"precision must be bf16, fp16 or fp32, not {settings.precision!r}")
    ds = settings.deepspeed
    if settings.method == "qlora" and ds and ds.stage == 3:
        raise PlanError(QLORA_ZERO3)
    counts = arch.parameters()
    params = counts.total
    targets = _lora_targets(arch, settings) if settings.method != "full" else []
    trainable = params if settings.method == "full" else arch.lora_parameters(settings.lora_r, targets)
    frozen = params - trainable if settings.method != "full" else 0
    c = 4 if settings.precision == "fp32" else 2
    mixed = c == 2
    adam = 2 if "8bit" in settings.optimizer else 8
    gpus = settings.num_gpus
    notes: list[str] = []

    quantized = int(counts.linear * NF4_DOUBLE_QUANT_BITS / 8)
    qlora_base = quantized + 4 * (frozen - counts.linear)  # the rest upcast to fp32 by k-bit preparation
    cpu = buffers = 0
    if ds is None:
        base = {"full": 0, "lora": c * frozen, "qlora": qlora_base}[settings.method]
        weights, trainable_weights = base, 4 * trainable + (c * trainable if mixed else 0)
        gradients, optimizer = 4 * trainable, adam * trainable
    else:
        state = adam + (8 if mixed else 4)  # + fp32 master and fp32 gradient copy (fp32: the gradient copy)
        weights = qlora_base if settings.method == "qlora" else c * frozen
        trainable_weights = c * trainable
        if ds.stage == 3:
            gathered = c * counts.largest_layer
            if ds.offload_param:
                cpu += weights + trainable_weights
                weights, trainable_weights = gathered, 0
            else:
                weights, trainable_weights = weights // gpus + gathered, trainable_weights // gpus
            gradients = c * min(trainable, counts.largest_layer)
            optimizer = state * trainable // gpus
            reduce = ds.reduce_bucket_size or arch.hidden_size**2
            buffers = int(c * (reduce + 0.9 * arch.hidden_size**2))  # "auto" prefetch bucket: 0.9 h^2
        else:
            partitions = gpus if ds.stage >= 1 else 1
            gradients = c * trainable // (gpus if ds.stage == 2 else 1)
            optimizer = state * trainable // partitions
            buckets = min(ds.reduce_bucket_size or arch.hidden_size**2, trainable) + min(ds.allgather_bucket_size,
                                                                                        trainable)
            buffers = int(c * buckets * (OVERLAP_COMM_FACTOR if ds.overlap_comm else 1))
            if ds.offload_optimizer:
                gradients = 0
        if ds.offload_optimizer:
            cpu += state * trainable
            optimizer = 0
    if settings.method == "qlora":
        notes.append(f"nf4 with double quantisation: {NF4_DOUBLE_QUANT_BITS:.3f} bits per layer weight; "
                     "embedding, lm_head and norms stay in fp32 after k-bit preparation")

    tokens = settings.micro_batch * settings.max_length
    per_layer = activation_elements_per_token(arch, targets, settings.lora_r)
    logits = tokens * arch.vocab_size * ((c + 8) if mixed else 8)
    kept = tokens * (arch.num_layers * (arch.hidden_size if settings.gradient_checkpointing else per_layer)
                     + 2 * arch.hidden_size) * c
    # With checkpointing a layer is recomputed during backward, after the logits' tensors are freed.
    activations = kept + (max(tokens * per_layer * c, logits) if settings.gradient_checkpointing else logits)
    notes.append(f"activations include {logits / GIB:.2f} GiB of logits (micro batch x length x vocab "
                 f"{arch.vocab_size:,})")
    return MemoryEstimate(params, trainable, weights, trainable_weights, gradients, optimizer, activations, buffers,
                          CUDA_CONTEXT_BYTES, cpu, notes)


# --- verdict and suggestions -------------------------------------------------------------------------


@dataclass
class Suggestion:
    change: str
    settings: PlanSettings
    total: int
    fits: bool
    cpu_offload: int = 0


@dataclass
class PlanReport:
    model: str
    source: str
    settings: PlanSettings
    estimate: MemoryEstimate
    gpu_memory: int | None  # bytes per GPU, None when unknown
    gpu_name: str | None
    suggestions: list[Suggestion]

    @property
    def verdict(self) -> str:
        """``fits``, ``tight``, ``does not fit``, or ``unknown`` (no GPU size given or detected)."""
        if self.gpu_memory is None:
            return "unknown"
        total = self.estimate.total
        return "does not fit" if total > self.gpu_memory else "tight" if total > TIGHT_FRACTION * self.gpu_memory \
            else "fits"

    def to_dict(self) -> dict:
        e = self.estimate
        mib = {name: round(getattr(e, name) / MIB) for name in
               ("weights", "trainable_weights", "gradients", "optimizer", "activations", "buffers", "context")}
        settings = dataclasses.asdict(self.settings)
        return {
            "model": self.model, "source": self.source, "settings": settings,
            "parameters": e.parameters, "trainable_parameters": e.trainable,
            "per_gpu_mib": mib, "per_gpu_total_mib": round(e.total / MIB),
            "cpu_offload_mib": round(e.cpu_offload / MIB),
            "gpu_memory_mib": round(self.gpu_memory / MIB) if self.gpu_memory else None, "gpu": self.gpu_name,
            "verdict": self.verdict, "notes": e.notes,
            "suggestions": [{"change": s.change, "flags": s.settings.flags(), "per_gpu_total_mib": round(s.total / MIB),
                             "cpu_offload_mib": round(s.cpu_offload / MIB), "fits": s.fits} for s in self.suggestions],
        }


def _zero(name: str) -> DeepSpeedSetup:
    from minicpm_train.args import PRESET_DIR

    return DeepSpeedSetup.from_config(json.loads((PRESET_DIR / f"{name}.json").read_text()), name)


def _candidates(settings: PlanSettings, arch: Architecture) -> list[tuple[str, PlanSettings]]:
    """Single changes that lower memory, the cheapest in speed and quality first."""
    replace = dataclasses.replace
    out: list[tuple[str, PlanSettings]] = []
    if not settings.gradient_checkpointing:
        out.append(("gradient checkpointing (recomputes activations, ~30% slower)",
                    replace(settings, gradient_checkpointing=True)))
    effective = settings.micro_batch * settings.gradient_accumulation
    batch = settings.micro_batch
    while batch > 1:
        batch //= 2
        accumulation = -(-effective // batch)
        out.append((f"micro batch {batch} x gradient accumulation {accumulation} (effective batch "
                    f"{batch * accumulation})", replace(settings, micro_batch=batch, gradient_accumulation=accumulation)))
    ds = settings.deepspeed
    if not (ds and ds.offload_optimizer):
        out.append(("DeepSpeed zero2_offload (optimizer states in CPU memory)",
                    replace(settings, deepspeed=_zero("zero2_offload"))))
    if settings.method != "qlora" and not (ds and ds.offload_param):
        out.append(("DeepSpeed zero3_offload (optimizer states and weights in CPU memory)",
                    replace(settings, deepspeed=_zero("zero3_offload"))))
    targets = settings.lora_targets if settings.method != "full" else _default_targets(arch)
    if settings.method == "full":
        out.append(("LoRA instead of full fine-tuning", replace(settings, method="lora", lora_targets=targets)))
    if settings.method != "qlora":
        kept = ds if ds and ds.stage < 3 else None  # QLoRA does not run under ZeRO-3
        out.append(("QLoRA (4-bit base model)", replace(settings, method="qlora", deepspeed=kept, lora_targets=targets)))
    return out


def _default_targets(arch: Architecture) -> tuple[str, ...]:
    from minicpm_train.model import DEFAULT_LORA_TARGETS, GUIDE_LORA_TARGETS

    return tuple(DEFAULT_LORA_TARGETS.get(arch.model_type, GUIDE_LORA_TARGETS))


def suggest(arch: Architecture, settings: PlanSettings, gpu_memory: int) -> list[Suggestion]:
    """Each single change that makes the run fit (of batch reductions, the largest batch that fits);
    when none does alone, changes combined greedily (lowest total first) until it fits."""
    singles = [Suggestion(name, s, e.total, e.total <= gpu_memory, e.cpu_offload)
               for name, s in _candidates(settings, arch) for e in [estimate(arch, s)]]
    fitting = [s for s in singles if s.fits]
    batches = [s for s in fitting if s.change.startswith("micro batch")]
    fitting = [s for s in fitting if s not in batches[1:]]
    if fitting:
        return fitting
    names: list[str] = []
    combined, best = settings, None
    for _ in range(8):
        options = [(name, estimate(arch, s), s) for name, s in _candidates(combined, arch)]
        if not options:
            break
        name, result, combined = min(options, key=lambda option: option[1].total)
        if name.startswith("DeepSpeed"):  # a preset replaces the one chosen before (QLoRA moves ZeRO-3 to 2)
            names = [earlier for earlier in names if not earlier.startswith("DeepSpeed")]
        names.append(name)
        best = Suggestion(" + ".join(names), combined, result.total, result.total <= gpu_memory, result.cpu_offload)
        if best.fits:
            break
    return [best] if best else []


def make_plan(model: str, settings: PlanSettings, *, gpu_memory_gib: float | None = None,
              gpu_name: str | None = None) -> PlanReport:
    """Estimate a run on ``model`` (a folder or a known MiniCPM name) and judge it against the GPU."""
    from minicpm_train.model_sizes import resolve_architecture

    arch, source = resolve_architecture(model)
    memory = int(gpu_memory_gib * GIB) if gpu_memory_gib else None
    result = estimate(arch, settings)
    suggestions = suggest(arch, settings, memory) if memory and result.total > memory else []
    return PlanReport(model, source, settings, result, memory, gpu_name, suggestions)


# --- from run's flags ----------------------------------------------------------------------------------


def settings_from_run(run, arch: Architecture, *, gpus: int) -> PlanSettings:
    """PlanSettings from a ``ResolvedRun`` (the same flags and ``--config`` as ``run``)."""
    options, training = run.options, run.training
    deepspeed = None
    if training.get("deepspeed"):
        value = training["deepspeed"]
        config = json.loads(value if value.lstrip().startswith("{") else Path(value).read_text())
        deepspeed = DeepSpeedSetup.from_config(config, Path(value).stem if not value.lstrip().startswith("{")
                                               else "inline")
    method = "qlora" if options.qlora else "lora" if options.use_lora else "full"
    if options.lora_target == "all-linear":
        targets: tuple[str, ...] | str = "all-linear"
    elif options.lora_target:
        targets = tuple(t.strip() for t in options.lora_target.split(",") if t.strip())
    else:
        targets = _default_targets(arch)
    precision = options.precision if options.precision in ("bf16", "fp16", "fp32") else (
        "bf16" if training.get("bf16") else "fp16" if training.get("fp16") else "fp32")
    return PlanSettings(
        method=method,
        micro_batch=int(training.get("per_device_train_batch_size", 8)),
        max_length=options.model_max_length,
        gradient_accumulation=int(training.get("gradient_accumulation_steps", 1)),
        gradient_checkpointing=bool(training.get("activation_checkpointing")),
        precision=precision,
        deepspeed=deepspeed,
        num_gpus=gpus,
        lora_r=options.lora_r,
        lora_targets=targets,
        optimizer=str(training.get("optim", "adamw_torch")),
    )


def plan_from_argv(argv: list[str], *, script: str | None = None, gpu_memory_gib: float | None = None,
                   devices=None) -> PlanReport:
    """A plan for the run ``argv`` (or a guide ``script`` with ``argv`` over it) describes, on ``devices``
    (default: this machine's GPUs).

    With no GPU here, the GPUs ``--num_gpus`` / ``--include`` name are assumed (bf16-capable).
    """
    from minicpm_train.args import parse_run_args
    from minicpm_train.guide_script import resolve_script
    from minicpm_train.launch import Device, decide, detect_devices
    from minicpm_train.model_sizes import resolve_architecture

    if gpu_memory_gib is not None and gpu_memory_gib <= 0:
        raise PlanError(f"--gpu-memory must be more than 0 GB, not {gpu_memory_gib:g}")
    run = resolve_script(script, argv)[1] if script else parse_run_args(argv, require_data=False)
    devices = detect_devices() if devices is None else devices
    detected = bool(devices)
    if not detected:
        count = 64 if run.launch.include else (run.launch.num_gpus or 1)
        devices = [Device("assumed GPU", (8, 0), gpu_memory_gib or 0.0)] * count
    hardware = decide(run.launch, devices, precision=run.options.precision,
                      bf16=bool(run.training.get("bf16")), fp16=bool(run.training.get("fp16")))
    run.options.precision = hardware.precision
    arch, _ = resolve_architecture(run.options.model_name_or_path)
    settings = settings_from_run(run, arch, gpus=hardware.ranks)
    gpu_name = None
    if detected and gpu_memory_gib is None:
        smallest = min(devices, key=lambda d: d.memory_gib)  # conservative when --include picks some
        gpu_memory_gib, gpu_name = smallest.memory_gib, smallest.name
    return make_plan(run.options.model_name_or_path, settings, gpu_memory_gib=gpu_memory_gib, gpu_name=gpu_name)
