"""Will a run fit? Per-GPU memory for full, LoRA and QLoRA training, with or without DeepSpeed.

The figure is what ``nvidia-smi`` shows for one training process at its peak: the tensors, DeepSpeed's
working buffers, the PyTorch caching allocator's reserve, the CUDA context and NCCL's buffers. The
formulas, their sources and the calibration are in ``docs/memory.md``; in short (bytes per GPU):

Notation: P parameters, T trainable, N data-parallel GPUs, L layers, h hidden size, i intermediate size,
V vocabulary, n = micro batch x model_max_length tokens, c = bytes of the compute dtype (2 for bf16/fp16,
4 for fp32), a = bytes of Adam state per parameter (8; 2 with an 8-bit optimizer), LL = the largest weight.

Model states (weights, gradients, optimizer):
  no DeepSpeed  full: 4P fp32 masters + cP autocast copies, gradients 4P, optimizer aP; LoRA: frozen
                base c(P-T), adapters (4+c)T, gradients 4T, optimizer aT; QLoRA: nf4 layer weights with
                double quantisation (4.127 bits), embedding/lm_head/norms in fp32 after k-bit preparation
  ZeRO-1/2/3    the trainable part is DeepSpeed's own ``estimate_zero2/3_model_states_mem_needs``
                (mixed precision with Adam; our formula where it does not apply: fp32, 8-bit optimizers,
                ZeRO-0/1), frozen weights added as cP (ZeRO-3: cP/N, nothing with offload_param)
ZeRO-3 working memory, from the DeepSpeed config with "auto" resolved as the HF integration does
(reduce bucket h^2, prefetch bucket 0.9 h^2, persistence threshold 10 h):
  live parameters  gathered weights held at once: min(P, max(LL, min(stage3_max_live_parameters,
                   stage3_max_reuse_distance / 2 + LL + prefetch bucket))) + persisted small weights, in c;
                   nothing on one GPU without offload_param (DeepSpeed then uses the weights in place)
  buffers          ZeRO-3: 2 x reduce bucket (the contiguous gradient bucket and its reduce-scatter copy);
                   ZeRO-1/2: c x (reduce + allgather bucket, each capped at T), x4.5 with overlap_comm
Activations (micro batch, not gradient accumulation; SDPA attention, no s^2 matrix): per layer and token
  4h + attention outputs + 4i (+ each LoRA linear's input and rank-r product) elements, in c; plus the logits:
  reference trainer (``pad_to_max``)   n V (c + 12): logits, fp32 upcast, shifted fp32 copy, fp32 log-softmax
  ``full``                             n V (c + 8): logits, fp32 upcast and fp32 log-softmax (or its gradient)
  ``chunked`` / ``fused`` / ``auto``   min(n, loss.CHUNK_SIZE) V (c + 8): one chunk at a time
  with gradient checkpointing only the layer inputs are kept, plus the larger of one layer and the logits.
Outside the tensors:
  CUDA context     CUDA_CONTEXT_BYTES per process; NCCL_BUFFER_BYTES more with several ranks
  allocator reserve  ALLOCATOR_RESERVE_FRACTION (0.1, assumed) x (activations + live parameters + buffers),
                   + ZERO3_GATHER_RESERVE_FRACTION (1.3, fitted to OpenBMB's figures) x cP when ZeRO-3 gathers
                   weights: what the caching allocator holds beyond the tensors alive at the peak
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from minicpm_data.errors import MinicpmError
from minicpm_train.args import LOSS_IMPLS, QLORA_ZERO3
from minicpm_train.model_sizes import Architecture

MIB = 2**20
GIB = 2**30
# CUDA context, kernel images (lazily loaded) and cuBLAS/cuDNN workspaces of one training process.
CUDA_CONTEXT_BYTES = 1 * GIB
# NCCL's per-peer buffers with several ranks: about 9 MiB (Simple 4 MiB + LL128 ~4.6 MiB + LL 0.25 MiB)
# per channel and peer, up to 32 channels, ring and tree peers.
NCCL_BUFFER_BYTES = GIB // 2
# The caching allocator's reserve: what it holds beyond the tensors alive at the peak.
# - Block rounding and splitting over what is allocated and freed every step (activations, gathered weights,
#   buckets): the same shapes come back every step, so most blocks are reused; an assumed 10%.
# - ZeRO-3 gathering weights (several GPUs, or offload_param): every weight of the model is gathered into a fresh
#   block between activations that stay alive until backward, then freed; the holes it leaves do not fit the
#   next, differently shaped weight. Counted as a share of the model's weights in the compute dtype, fitted to
#   OpenBMB's two fully specified figures (docs/memory.md); not measured by us.
ALLOCATOR_RESERVE_FRACTION = 0.1
ZERO3_GATHER_RESERVE_FRACTION = 1.3
NF4_DOUBLE_QUANT_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # 4-bit weights, 8-bit absmax per 64, fp32 per 256 absmax
OVERLAP_COMM_FACTOR = 4.5
TIGHT_FRACTION = 0.9  # above this share of the GPU, a run is "tight": fragmentation may still tip it over


class PlanError(MinicpmError):
    """The plan's inputs are inconsistent."""


@dataclass(frozen=True)
class ZeroSizes:
    """A DeepSpeed config's memory-relevant sizes with ``"auto"`` and absent keys resolved (in elements)."""

    reduce_bucket: int
    allgather_bucket: int
    prefetch_bucket: int
    persistence_threshold: int
    max_live_parameters: int
    max_reuse_distance: int
    overlap_comm: bool


@dataclass(frozen=True)
class DeepSpeedSetup:
    """The parts of a DeepSpeed config that memory depends on (None: ``"auto"``)."""

    name: str
    stage: int
    offload_optimizer: bool = False
    offload_param: bool = False
    overlap_comm: bool | None = None  # None: DeepSpeed's default, on for ZeRO-3 only
    reduce_bucket_size: float | None = None
    allgather_bucket_size: float = 5e8
    prefetch_bucket_size: float | None = None
    param_persistence_threshold: float | None = None
    max_live_parameters: float = 1e9
    max_reuse_distance: float = 1e9

    @classmethod
    def from_config(cls, config: dict, name: str) -> "DeepSpeedSetup":
        """Read a DeepSpeed config mapping; absent keys take DeepSpeed's defaults."""
        zero = config.get("zero_optimization", {})

        def offloaded(key: str) -> bool:
            return (zero.get(key) or {}).get("device", "none") in ("cpu", "nvme")

        def size(key: str, default: float) -> float | None:
            value = zero.get(key, default)
            return None if value == "auto" else float(value)

        overlap = zero.get("overlap_comm")
        return cls(name, int(zero.get("stage", 0)), offloaded("offload_optimizer"), offloaded("offload_param"),
                   None if overlap is None else bool(overlap), size("reduce_bucket_size", 5e8),
                   size("allgather_bucket_size", 5e8) or 5e8, size("stage3_prefetch_bucket_size", 5e7),
                   size("stage3_param_persistence_threshold", 1e5), size("stage3_max_live_parameters", 1e9) or 0,
                   size("stage3_max_reuse_distance", 1e9) or 0)

    def sizes(self, hidden_size: int) -> ZeroSizes:
        """Concrete sizes, ``"auto"`` resolved as transformers' DeepSpeed integration does from hidden_size."""

        def resolved(value: float | None, auto: float) -> int:
            return int(auto if value is None else value)

        return ZeroSizes(
            reduce_bucket=resolved(self.reduce_bucket_size, hidden_size * hidden_size),
            allgather_bucket=int(self.allgather_bucket_size),
            prefetch_bucket=resolved(self.prefetch_bucket_size, int(0.9 * hidden_size * hidden_size)),
            persistence_threshold=resolved(self.param_persistence_threshold, 10 * hidden_size),
            max_live_parameters=int(self.max_live_parameters),
            max_reuse_distance=int(self.max_reuse_distance),
            overlap_comm=self.stage == 3 if self.overlap_comm is None else self.overlap_comm,
        )


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
    num_gpus: int = 1  # data-parallel ranks in all: GPUs per node x nodes
    num_nodes: int = 1
    lora_r: int = 64
    lora_targets: tuple[str, ...] | str = ("q_proj", "v_proj")
    optimizer: str = "adamw_torch"
    loss_impl: str = "auto"  # auto | chunked | fused | full
    pad_to_max: bool = False  # OpenBMB's reference trainer: every sample padded to model_max_length
    stage: str = "sft"  # sft | dpo | kto (minicpm_train.preference)

    @property
    def sequences(self) -> int:
        """Sequences in one forward with gradients: a DPO micro batch of pairs holds both sides of each."""
        return self.micro_batch * (2 if self.stage == "dpo" else 1)

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
        if self.stage != "sft":
            flags += ["--stage", self.stage]
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
    live_parameters: int  # ZeRO-3's gathered weights
    buffers: int
    context: int  # CUDA context (+ NCCL buffers with several ranks)
    reserve: int  # the caching allocator's reserve
    cpu_offload: int
    zero: ZeroSizes | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def allocated(self) -> int:
        """Tensors alive at the peak: what ``torch.cuda.max_memory_allocated`` measures."""
        return (self.weights + self.trainable_weights + self.gradients + self.optimizer + self.activations
                + self.live_parameters + self.buffers)

    @property
    def reserved(self) -> int:
        """What the caching allocator holds at the peak: ``torch.cuda.max_memory_reserved``."""
        return self.allocated + self.reserve

    @property
    def total(self) -> int:
        """What ``nvidia-smi`` shows for the process."""
        return self.reserved + self.context


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


def logits_bytes(arch: Architecture, settings: PlanSettings) -> tuple[int, str]:
    """Peak bytes of the logits and the loss over them, and what that assumes."""
    c = 4 if settings.precision == "fp32" else 2
    tokens = settings.sequences * settings.max_length
    if settings.pad_to_max:
        return tokens * arch.vocab_size * (c + 12), "the reference trainer's loss: logits, their fp32 upcast, a " \
                                                    "shifted fp32 copy and the fp32 log-softmax"
    if settings.loss_impl == "full":
        return tokens * arch.vocab_size * (c + 8), "--loss_impl full: logits, their fp32 upcast and log-softmax"
    from minicpm_train.loss import CHUNK_SIZE

    chunk = min(tokens, CHUNK_SIZE)
    fits = f"; this batch's {tokens:,} are one chunk" if tokens < CHUNK_SIZE else ""
    return chunk * arch.vocab_size * (c + 8), f"--loss_impl {settings.loss_impl}: chunks of {CHUNK_SIZE:,} positions " \
                                              f"through lm_head, one at a time{fits}"


def _deepspeed_model_states(stage: int, trainable: int, largest_trainable: int, gpus: int,
                            ds: DeepSpeedSetup) -> int:
    """DeepSpeed's own estimate of the trainable parameters' GPU bytes (mixed precision with Adam)."""
    if stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        return estimate_zero3_model_states_mem_needs(trainable, largest_trainable, gpus,
                                                     cpu_offload=ds.offload_optimizer,
                                                     cpu_offload_params=ds.offload_param)[1]
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    return estimate_zero2_model_states_mem_needs(trainable, gpus, cpu_offload=ds.offload_optimizer)[1]


def _zero3_live_elements(arch: Architecture, zero: ZeroSizes) -> int:
    """Weights ZeRO-3 holds gathered at once: those whose reuse lies within stage3_max_reuse_distance (at the
    turn from forward to backward, about half of that distance is behind), the largest weight and the prefetch
    bucket, limited by stage3_max_live_parameters; plus the small weights it never partitions."""
    counts = arch.parameters()
    held = min(zero.max_live_parameters, zero.max_reuse_distance // 2 + counts.largest_layer + zero.prefetch_bucket)
    persisted = counts.norms if arch.hidden_size <= zero.persistence_threshold else 0
    return min(counts.total, max(counts.largest_layer, held) + persisted)


def estimate(arch: Architecture, settings: PlanSettings) -> MemoryEstimate:
    """Per-GPU memory of one training run (formulas in the module docstring and docs/memory.md)."""
    if settings.method not in ("full", "lora", "qlora"):
        raise PlanError(f"method must be full, lora or qlora, not {settings.method!r}")
    if settings.precision not in ("bf16", "fp16", "fp32"):
        raise PlanError(f"precision must be bf16, fp16 or fp32, not {settings.precision!r}")
    if settings.loss_impl not in LOSS_IMPLS:
        raise PlanError(f"--loss_impl must be {', '.join(LOSS_IMPLS)}, not {settings.loss_impl!r}")
    ds = settings.deepspeed
    if settings.method == "qlora" and ds and ds.stage == 3:
        raise PlanError(QLORA_ZERO3)
    counts = arch.parameters()
    params = counts.total
    targets = _lora_targets(arch, settings) if settings.method != "full" else []
    trainable = params if settings.method == "full" else arch.lora_parameters(settings.lora_r, targets)
    frozen = params - trainable if settings.method != "full" else 0
    largest_trainable = counts.largest_layer if settings.method == "full" else arch.largest_lora_matrix(
        settings.lora_r, targets)
    c = 4 if settings.precision == "fp32" else 2
    mixed = c == 2
    adam = 2 if "8bit" in settings.optimizer else 8
    gpus = settings.num_gpus
    notes: list[str] = []

    quantized = int(counts.linear * NF4_DOUBLE_QUANT_BITS / 8)
    qlora_base = quantized + 4 * (frozen - counts.linear)  # the rest upcast to fp32 by k-bit preparation
    cpu = buffers = live = gathered = 0
    zero = ds.sizes(arch.hidden_size) if ds else None
    if ds is None:
        base = {"full": 0, "lora": c * frozen, "qlora": qlora_base}[settings.method]
        weights, trainable_weights = base, 4 * trainable + (c * trainable if mixed else 0)
        gradients, optimizer = 4 * trainable, adam * trainable
    else:
        state = adam + (8 if mixed else 4)  # + fp32 master and fp32 gradient copy (fp32: the gradient copy)
        weights = qlora_base if settings.method == "qlora" else c * frozen
        if ds.stage == 3:
            if ds.offload_param:
                cpu += weights + c * trainable
                weights = trainable_weights = 0
            else:
                weights, trainable_weights = weights // gpus, c * trainable // gpus
            gradients = c * largest_trainable  # a weight's full gradient before it is reduce-scattered
            optimizer = 0 if ds.offload_optimizer else state * trainable // gpus
            if gpus > 1 or ds.offload_param:
                live, gathered = c * _zero3_live_elements(arch, zero), c * params
            buffers = 2 * c * zero.reduce_bucket
        else:
            trainable_weights = c * trainable
            gradients = 0 if ds.offload_optimizer else c * trainable // (gpus if ds.stage == 2 else 1)
            optimizer = 0 if ds.offload_optimizer else state * trainable // (gpus if ds.stage >= 1 else 1)
            buckets = min(zero.reduce_bucket, trainable) + min(zero.allgather_bucket, trainable)
            buffers = int(c * buckets * (OVERLAP_COMM_FACTOR if zero.overlap_comm else 1))
        if mixed and adam == 8 and ds.stage in (2, 3) and (ds.offload_optimizer or not ds.offload_param):
            # DeepSpeed's estimator is the reference; its gathered-weight share (c x LL) is in live_parameters.
            states = _deepspeed_model_states(ds.stage, trainable, largest_trainable, gpus, ds)
            optimizer = states - trainable_weights - gradients - (c * largest_trainable if ds.stage == 3 else 0)
        if ds.offload_optimizer:
            cpu += state * trainable
    cpu //= settings.num_nodes  # DeepSpeed partitions what it offloads over the ranks: each node holds its share
    if settings.method == "qlora":
        notes.append(f"nf4 with double quantisation: {NF4_DOUBLE_QUANT_BITS:.3f} bits per layer weight; "
                     "embedding, lm_head and norms stay in fp32 after k-bit preparation")

    tokens = settings.sequences * settings.max_length
    per_layer = activation_elements_per_token(arch, targets, settings.lora_r)
    if settings.stage != "sft":
        notes.append(_preference_note(settings))
    logits, loss_layout = logits_bytes(arch, settings)
    kept = tokens * (arch.num_layers * (arch.hidden_size if settings.gradient_checkpointing else per_layer)
                     + 2 * arch.hidden_size) * c
    # With checkpointing a layer is recomputed during backward, after the logits' tensors are freed.
    activations = kept + (max(tokens * per_layer * c, logits) if settings.gradient_checkpointing else logits)
    padding = ("every sample padded to model_max_length (OpenBMB's reference trainer)" if settings.pad_to_max else
               "a batch whose longest sample reaches model_max_length (batches are padded to their longest, so "
               "most use less)")
    notes.append(f"activations assume {padding}; they include {logits / GIB:.2f} GiB for the loss ({loss_layout})")
    context = CUDA_CONTEXT_BYTES + (NCCL_BUFFER_BYTES if gpus > 1 else 0)
    reserve = int(ALLOCATOR_RESERVE_FRACTION * (activations + live + buffers)
                  + ZERO3_GATHER_RESERVE_FRACTION * gathered)
    return MemoryEstimate(params, trainable, weights, trainable_weights, gradients, optimizer, activations, live,
                          buffers, context, reserve, cpu, zero, notes)


def _preference_note(settings: PlanSettings) -> str:
    """What a preference run adds: both sides of a pair per forward, and where the reference comes from."""
    sides = (f"DPO: each of the {settings.micro_batch} pairs of a micro batch is two sequences (chosen and rejected) "
             "in one forward" if settings.stage == "dpo" else
             "KTO: each row's mismatched sequence (its KL term) goes through a forward without gradients")
    reference = ("the reference is this model with its adapter disabled: a forward without gradients each step, "
                 "no stored activations and no second copy" if settings.method != "full" else
                 "the reference log-probabilities are computed once before training (a pass over the data, "
                 "no second copy kept)")
    return f"{sides}; {reference}"


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
        settings = dataclasses.asdict(self.settings)
        return {
            "model": self.model, "source": self.source, "settings": settings,
            "deepspeed_resolved": dataclasses.asdict(e.zero) if e.zero else None,
            "parameters": e.parameters, "trainable_parameters": e.trainable,
            "per_gpu_mib": {t.key: round(t.bytes / MIB) for t in memory_terms(e, self.settings)},
            "terms": [{"term": t.key, "mib": round(t.bytes / MIB), "what": t.what}
                      for t in memory_terms(e, self.settings)],
            "per_gpu_allocated_mib": round(e.allocated / MIB), "per_gpu_reserved_mib": round(e.reserved / MIB),
            "per_gpu_total_mib": round(e.total / MIB),
            "cpu_offload_mib": round(e.cpu_offload / MIB),
            "gpu_memory_mib": round(self.gpu_memory / MIB) if self.gpu_memory else None, "gpu": self.gpu_name,
            "verdict": self.verdict, "notes": e.notes,
            "suggestions": [{"change": s.change, "flags": s.settings.flags(), "per_gpu_total_mib": round(s.total / MIB),
                             "cpu_offload_mib": round(s.cpu_offload / MIB), "fits": s.fits} for s in self.suggestions],
        }


@dataclass(frozen=True)
class Term:
    """One line of the plan: a part of the per-GPU memory and the settings it depends on."""

    key: str
    label: str
    bytes: int
    what: str


def gpus_text(s: PlanSettings) -> str:
    """``4 GPU(s)``, or ``8 GPU(s) (2 nodes x 4)`` on several nodes."""
    nodes = f" ({s.num_nodes} nodes x {s.num_gpus // s.num_nodes})" if s.num_nodes > 1 else ""
    return f"{s.num_gpus} GPU(s){nodes}"


def _elements(value: int) -> str:
    return f"{value / 1e6:,.1f}M" if value < 1e9 else f"{value / 1e9:,.2f}G"


def memory_terms(e: MemoryEstimate, s: PlanSettings) -> list[Term]:
    """Every part of the estimate, with what it is and which setting changes it."""
    ds = s.deepspeed
    share = f"{e.trainable:,} of {e.parameters:,} ({100 * e.trainable / e.parameters:.2f}%)"
    where = ""
    if ds and ds.stage == 3:
        where = "; offloaded to CPU (offload_param)" if ds.offload_param else f"; partitioned over {gpus_text(s)}"
    optimizer = f"{s.optimizer}: m, v"
    if ds:
        optimizer += " + fp32 masters and gradients" + (" (in CPU memory: offload_optimizer)" if ds.offload_optimizer
                                                        else f" / {gpus_text(s)}" if ds.stage >= 1 else "")
    gradients = ("full gradient of the largest trained weight before reduce-scatter" if ds and ds.stage == 3
                 else "of the trainable parameters")
    live, buffers = "no ZeRO-3", "no DeepSpeed"
    if e.zero and ds.stage == 3:
        z = e.zero
        prefetch = "auto = 0.9 h^2" if ds.prefetch_bucket_size is None else "set"
        live = (f"gathered weights: stage3_max_live_parameters {_elements(z.max_live_parameters)}, "
                f"stage3_max_reuse_distance {_elements(z.max_reuse_distance)}, prefetch bucket "
                f"{_elements(z.prefetch_bucket)} ({prefetch})" if e.live_parameters else
                "none: one GPU without offload_param uses the weights in place")
        reduce = "auto = h^2" if ds.reduce_bucket_size is None else "set"
        buffers = f"2 x reduce_bucket_size {_elements(z.reduce_bucket)} ({reduce})"
    elif e.zero:
        z = e.zero
        buffers = (f"reduce {_elements(z.reduce_bucket)} + allgather {_elements(z.allgather_bucket)} buckets"
                   + (f" x{OVERLAP_COMM_FACTOR} (overlap_comm)" if z.overlap_comm else ""))
    context = "CUDA context, kernels, workspaces" + (" + NCCL buffers" if s.num_gpus > 1 else "")
    return [
        Term("weights", "weights (frozen)", e.weights, "base model weights that are not trained" + where),
        Term("trainable_weights", "trainable parameters", e.trainable_weights, share + where),
        Term("gradients", "gradients", e.gradients, gradients),
        Term("optimizer", "optimizer states", e.optimizer, optimizer),
        Term("activations", "activations", e.activations, f"saved for backward at micro batch {s.micro_batch}"
                                                          f"{' pairs (2 sequences each)' if s.stage == 'dpo' else ''} x "
                                                          f"{s.max_length} tokens, incl. the loss's logits"),
        Term("live_parameters", "ZeRO-3 live parameters", e.live_parameters, live),
        Term("buffers", "DeepSpeed buffers", e.buffers, buffers),
        Term("reserve", "allocator reserve", e.reserve,
             f"PyTorch caching allocator: {ALLOCATOR_RESERVE_FRACTION} x (activations + live parameters + buffers)"
             + (f" + {ZERO3_GATHER_RESERVE_FRACTION} x the weights ZeRO-3 gathers each step (fitted)"
                if e.live_parameters else "")),
        Term("context", "CUDA context", e.context, context),
    ]


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


def settings_from_run(run, arch: Architecture, *, gpus: int, pad_to_max: bool = False, nodes: int = 1) -> PlanSettings:
    """PlanSettings from a ``ResolvedRun`` (the same flags and ``--config`` as ``run``) on ``gpus`` GPUs per node.

    ``pad_to_max``: reproduce OpenBMB's reference trainer (every sample padded to model_max_length, full logits).
    """
    options, training = run.options, run.training
    deepspeed = None
    if training.get("deepspeed"):
        value = training["deepspeed"]
        try:
            config = json.loads(value if value.lstrip().startswith("{") else Path(value).read_text())
        except OSError as error:
            raise PlanError(f"--deepspeed {value}: {error.strerror}") from error
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
        num_gpus=gpus * nodes,
        num_nodes=nodes,
        lora_r=options.lora_r,
        lora_targets=targets,
        optimizer=str(training.get("optim", "adamw_torch")),
        loss_impl=options.loss_impl,
        pad_to_max=pad_to_max,
        stage=options.stage,
    )


def plan_from_argv(argv: list[str], *, script: str | None = None, gpu_memory_gib: float | None = None,
                   devices=None, pad_to_max: bool = False) -> PlanReport:
    """A plan for the run ``argv`` (or a guide ``script`` with ``argv`` over it) describes, on ``devices``
    (default: this machine's GPUs); ``pad_to_max`` reproduces OpenBMB's reference trainer.

    With no GPU here, the GPUs ``--num_gpus`` / ``--include`` name are assumed (bf16-capable).
    """
    from minicpm_train.args import parse_run_args
    from minicpm_train.guide_script import resolve_script
    from minicpm_train.launch import Device, decide, detect_devices
    from minicpm_train.model_sizes import resolve_architecture
    from minicpm_train.nodes import node_count

    if gpu_memory_gib is not None and gpu_memory_gib <= 0:
        raise PlanError(f"--gpu_memory must be more than 0 GB, not {gpu_memory_gib:g}")
    run = resolve_script(script, argv)[1] if script else parse_run_args(argv, require_data=False)
    devices = detect_devices() if devices is None else devices
    detected = bool(devices)
    if not detected:
        count = 64 if run.launch.include else (run.launch.num_gpus or 1)
        devices = [Device("assumed GPU", (8, 0), gpu_memory_gib or 0.0)] * count
    # The GPUs of one node decide; --num_nodes / --hostfile multiply them (ZeRO partitions over all of them).
    one_node = dataclasses.replace(run.launch, num_nodes=None, node_rank=None, hostfile=None)
    hardware = decide(one_node, devices, precision=run.options.precision,
                      bf16=bool(run.training.get("bf16")), fp16=bool(run.training.get("fp16")))
    run.options.precision = hardware.precision
    arch, _ = resolve_architecture(run.options.model_name_or_path)
    settings = settings_from_run(run, arch, gpus=hardware.ranks, pad_to_max=pad_to_max,
                                 nodes=node_count(run.launch))
    gpu_name = None
    if detected and gpu_memory_gib is None:
        smallest = min(devices, key=lambda d: d.memory_gib)  # conservative when --include picks some
        gpu_memory_gib, gpu_name = smallest.memory_gib, smallest.name
    return make_plan(run.options.model_name_or_path, settings, gpu_memory_gib=gpu_memory_gib, gpu_name=gpu_name)
