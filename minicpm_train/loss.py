"""The causal-LM loss without ``[batch, length, vocab]`` logits: ``lm_head`` + cross entropy chunk by chunk.

The model runs as usual up to its output embeddings (``lm_head``); a forward pre-hook takes exactly the
tensor that enters it (after any pre-head step of the architecture, such as MiniCPM's division by
``hidden_size / dim_model_base``) and hands ``lm_head`` an empty slice instead, so the model never builds
the logits. The loss then goes through ``lm_head``'s weight over the trained positions only, at most
:data:`CHUNK_SIZE` of them at a time, and each chunk's gradients are computed right there (the logits'
gradient is ``softmax - one_hot``), so backward recomputes nothing and holds no logits either. A trainable
``lm_head`` gets its gradient back through a call of the module itself (see :func:`_through_head`), so
DeepSpeed ZeRO-3 manages its partitioned weight as usual. On CUDA, a fused kernel (Liger Kernel,
cut-cross-entropy) does the same when one is installed.

The loss equals the one the model's own forward computes from ``labels`` (shifted by one, ``-100``
ignored, the sum divided by ``num_items_in_batch`` under gradient accumulation or else a mean).
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from minicpm_data.errors import MinicpmError
from minicpm_train.args import LOSS_IMPLS

CHUNK_SIZE = 2048  # positions per chunk through lm_head: a chunk's float32 logits are CHUNK_SIZE x vocab x 4 bytes
IGNORE_INDEX = -100
FUSED_KERNELS = ("liger_kernel", "cut_cross_entropy")  # import names, in order of preference


class LossError(MinicpmError):
    """The loss cannot be computed the way --loss_impl asks."""


@dataclass(frozen=True)
class LossChoice:
    """How a run computes its loss: ``impl`` is chunked, fused or full; ``kernel`` the fused package."""

    impl: str
    kernel: str | None
    notice: str


def installed_fused_kernels() -> set[str]:
    """The fused linear-cross-entropy packages importable here (see :data:`FUSED_KERNELS`)."""
    return {name for name in FUSED_KERNELS if importlib.util.find_spec(name) is not None}


def choose_loss_impl(requested: str, *, device_type: str, installed: set[str], zero_stage: int = 0,
                     half_precision: bool = True) -> LossChoice:
    """Pick the loss implementation for ``--loss_impl requested`` on this device (pure: no imports, no probing).

    Fused kernels are CUDA-only, and not for ZeRO-3: they take ``lm_head``'s weight as a plain tensor and
    return its gradient, which a partitioned parameter cannot take. cut-cross-entropy also needs
    half-precision weights. ``auto``: a usable fused kernel, else chunked.
    """
    if requested not in LOSS_IMPLS:
        raise LossError(f"--loss_impl must be one of {', '.join(LOSS_IMPLS)}, not {requested!r}")
    if requested == "full":
        return LossChoice("full", None, "loss: full logits ([batch, length, vocab], as the model's own forward)")
    usable = []
    if device_type == "cuda" and requested != "chunked" and zero_stage != 3:
        if "liger_kernel" in installed:
            usable.append("liger_kernel")
        if "cut_cross_entropy" in installed and half_precision:
            usable.append("cut_cross_entropy")
    if usable:
        return LossChoice("fused", usable[0], f"loss: fused linear cross entropy ({usable[0]})")
    if requested == "fused":
        why = ("fused kernels need a CUDA GPU" if device_type != "cuda"
               else "fused kernels cannot update a ZeRO-3 partitioned lm_head" if zero_stage == 3
               else "no usable fused kernel is installed (pip install liger-kernel)")
        raise LossError(f"--loss_impl fused: {why}; use --loss_impl chunked")
    where = " (install liger-kernel for the fused kernel)" if device_type == "cuda" and zero_stage != 3 else ""
    return LossChoice("chunked", None, f"loss: chunked, {CHUNK_SIZE:,} positions at a time through lm_head{where}")


def head_problem(model) -> str | None:
    """Why the chunked loss cannot go through this model's output embeddings, or None when it can."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or not head.weight.dtype.is_floating_point:
        return f"its output layer is a {type(head).__name__}, not a plain floating-point Linear"
    if getattr(model.config, "final_logit_softcapping", None):
        return "it soft-caps its logits after lm_head"
    return None


class _HeadInput:
    """What entered ``lm_head`` during one forward (None until it ran)."""

    hidden: torch.Tensor | None = None


@contextlib.contextmanager
def capture_head_input(model) -> Iterator[_HeadInput]:
    """While active, ``lm_head`` gets an empty slice of positions and the real input is kept in the yielded object.

    The model's forward then returns ``[batch, 0, vocab]`` logits, and no loss (call it without labels).
    """
    captured = _HeadInput()

    def keep_and_skip(module, args):
        captured.hidden = args[0]
        return (args[0].narrow(-2, 0, 0), *args[1:])

    # First of lm_head's pre-hooks: DeepSpeed ZeRO-3's own then wrap only the empty slice, whose backward never runs.
    handle = model.get_output_embeddings().register_forward_pre_hook(keep_and_skip, prepend=True)
    try:
        yield captured
    finally:
        handle.remove()


def _chunk_loss_and_gradients(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                              targets: torch.Tensor, want_gradients: bool) -> tuple:
    """Per-position losses of one chunk and, if wanted, the logits' gradient (softmax - one_hot) in their dtype.

    Works in place on one float32 logits buffer: no other [chunk, vocab] tensor is alive at the same time.
    """
    logits = torch.nn.functional.linear(hidden, weight, bias)  # under autocast, in its dtype, as the model's head
    compute_dtype = logits.dtype
    logits = logits.float()  # the model's loss upcasts the same way
    rows = torch.arange(len(targets), device=targets.device)
    target_logits = logits[rows, targets]
    row_max = logits.amax(dim=-1, keepdim=True)
    probabilities = logits.sub_(row_max).exp_()
    sums = probabilities.sum(dim=-1, keepdim=True)
    losses = (row_max + sums.log()).squeeze(-1) - target_logits
    if not want_gradients:
        return losses, None
    probabilities.div_(sums)
    probabilities[rows, targets] -= 1
    return losses, probabilities.to(compute_dtype)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Per-position cross entropy of ``hidden @ weight.T + bias`` against ``targets``, chunk by chunk.

    Differentiable in ``hidden`` only: every position's gradient is computed in forward (one chunk of logits
    alive at a time) and kept for backward, which scales each row by its loss's incoming gradient (all
    equal for a summed loss; per sequence for a preference loss). ``weight`` / ``bias`` are constants here
    and their gradients, for the sum of the losses (each times its ``row_weights`` entry, when given), come
    out as two more (non-differentiable) outputs when ``head_gradients`` is set.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, head_gradients, row_weights=None):
        need_hidden = ctx.needs_input_grad[0]
        want_gradients = need_hidden or head_gradients
        losses = torch.empty(len(targets), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if head_gradients else weight.new_empty(0)
        grad_bias = (torch.zeros_like(bias, dtype=torch.float32) if head_gradients and bias is not None
                     else weight.new_empty(0))
        for start in range(0, len(targets), chunk_size):
            part = slice(start, start + chunk_size)
            losses[part], grad_logits = _chunk_loss_and_gradients(hidden[part], weight, bias, targets[part],
                                                                  want_gradients)
            if need_hidden:
                grad_hidden[part] = grad_logits @ weight.to(grad_logits.dtype)
            if head_gradients:
                if row_weights is not None:
                    grad_logits *= row_weights[part, None].to(grad_logits.dtype)
                grad_weight += (grad_logits.t() @ hidden[part].to(grad_logits.dtype)).float()
                if bias is not None:
                    grad_bias += grad_logits.float().sum(dim=0)
        ctx.save_for_backward(grad_hidden)
        ctx.mark_non_differentiable(grad_weight, grad_bias)
        return losses, grad_weight, grad_bias

    @staticmethod
    def backward(ctx, grad_losses, _grad_weight, _grad_bias):
        (grad_hidden,) = ctx.saved_tensors
        return (grad_hidden * grad_losses[:, None]).to(grad_hidden.dtype), None, None, None, None, None, None


class _GradientInjection(torch.autograd.Function):
    """A zero whose gradient for ``output`` is ``gradient`` (times whatever multiplies the zero)."""

    @staticmethod
    def forward(ctx, output, gradient):
        ctx.save_for_backward(gradient)
        return output.new_zeros((), dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad_zero):
        (gradient,) = ctx.saved_tensors
        return gradient * grad_zero, None


def _through_head(head: torch.nn.Linear, grad_weight: torch.Tensor, grad_bias: torch.Tensor) -> torch.Tensor:
    """A zero whose gradients for ``head``'s weight and bias are ``grad_weight`` / ``grad_bias``, by calling ``head``.

    Through the module itself, so whatever manages its parameters (DeepSpeed ZeRO-3 gathering them for
    backward and reducing their partitioned gradients) sees an ordinary use of the layer. ``head`` applied to
    the identity rows (plus a zero row when it has a bias) gives ``weight.T`` (+ bias) at the cost of a chunk of
    ``hidden_size`` positions; the injected output gradient makes ``linear``'s own backward yield exactly
    ``grad_weight`` and ``grad_bias``.
    """
    basis = torch.eye(head.in_features + (head.bias is not None), head.in_features,
                      dtype=head.weight.dtype, device=grad_weight.device)
    rows = grad_weight.t()
    if head.bias is not None:  # the identity rows also add the bias once each; the zero row corrects that
        rows = torch.cat([rows, (grad_bias - rows.sum(dim=0))[None]])
    output = head(basis)
    return _GradientInjection.apply(output, rows.to(output.dtype))


@contextlib.contextmanager
def _gathered(head: torch.nn.Module):
    """``head``'s parameters whole for the duration, when DeepSpeed ZeRO-3 has partitioned them."""
    if any(hasattr(p, "ds_id") for p in head.parameters()):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(head.parameters()), modifier_rank=None):
            yield
    else:
        yield


def _fused_sum(kernel: str, hidden, weight, bias, targets):
    if kernel == "liger_kernel":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        return liger_fused_linear_cross_entropy(hidden, weight, targets, bias, reduction="sum")
    from cut_cross_entropy import linear_cross_entropy

    return linear_cross_entropy(hidden, weight, targets, bias=bias, reduction="sum")


def linear_cross_entropy_sum(hidden: torch.Tensor, head: torch.nn.Linear, targets: torch.Tensor, *,
                             kernel: str | None = None, chunk_size: int = CHUNK_SIZE) -> torch.Tensor:
    """``cross_entropy(head(hidden).float(), targets, reduction="sum")`` without all the logits at once.

    ``hidden`` is ``[positions, hidden_size]``, every target a real token id; ``kernel`` a fused package
    name from :func:`choose_loss_impl`, or None for the chunked torch path.
    """
    with _gathered(head):
        if kernel is not None:
            return _fused_sum(kernel, hidden, head.weight, head.bias, targets).float()
        head_gradients = torch.is_grad_enabled() and head.weight.requires_grad
        weight, bias = head.weight.detach(), head.bias.detach() if head.bias is not None else None
        losses, grad_weight, grad_bias = _ChunkedLinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_size,
                                                                          head_gradients)
    total = losses.sum()
    return total + _through_head(head, grad_weight, grad_bias) if head_gradients else total


def linear_cross_entropy_per_position(hidden: torch.Tensor, head: torch.nn.Linear, targets: torch.Tensor, *,
                                      chunk_size: int = CHUNK_SIZE) -> torch.Tensor:
    """Each position's loss (no gradients), chunk by chunk: for evaluation."""
    with torch.no_grad(), _gathered(head):
        return torch.cat([_chunk_loss_and_gradients(hidden[start:start + chunk_size], head.weight, head.bias,
                                                    targets[start:start + chunk_size], False)[0]
                          for start in range(0, len(targets), chunk_size)] or [hidden.new_zeros(0)])


def trained_positions(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The hidden states that predict a trained token, their targets, and their flat indices in ``labels``.

    Position t predicts ``labels[t + 1]`` (the model's own shift); the last position predicts nothing.
    """
    shifted = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1).to(hidden.device)
    where = (shifted != IGNORE_INDEX).nonzero().squeeze(-1)
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, where), shifted.index_select(0, where), where


def causal_lm_loss(hidden: torch.Tensor, head: torch.nn.Linear, labels: torch.Tensor, *,
                   num_items_in_batch: torch.Tensor | int | None = None, kernel: str | None = None,
                   chunk_size: int = CHUNK_SIZE) -> torch.Tensor:
    """The loss the model's forward computes from ``labels``, from the tensor entering ``lm_head``.

    Summed over trained tokens, divided by ``num_items_in_batch`` when given (gradient accumulation),
    else by this batch's trained tokens (a mean; nan when there are none, as the model's loss).
    """
    selected, targets, _ = trained_positions(hidden, labels)
    total = linear_cross_entropy_sum(selected, head, targets, kernel=kernel, chunk_size=chunk_size)
    if num_items_in_batch is None:
        return total / len(targets)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def per_sample_losses(hidden: torch.Tensor, head: torch.nn.Linear, labels: torch.Tensor, *,
                      chunk_size: int = CHUNK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed token loss, trained tokens) per row of ``labels``, without gradients."""
    selected, targets, where = trained_positions(hidden, labels)
    losses = linear_cross_entropy_per_position(selected, head, targets, chunk_size=chunk_size)
    rows = where // labels.shape[-1]
    sums = torch.zeros(labels.shape[0], dtype=torch.float32, device=losses.device).index_add_(0, rows, losses)
    counts = torch.bincount(rows, minlength=labels.shape[0])
    return sums, counts


class SequenceLogProbs:
    """Each sequence's summed log-probability of its trained tokens (``logps``, differentiable in the hidden
    states) and how many trained tokens it has (``counts``): what preference losses are made of.

    lm_head's own gradient, when it is trained, cannot be computed before the loss over the sequences is
    known; :meth:`with_head_gradients` adds it (a second pass through lm_head, chunk by chunk).
    """

    def __init__(self, logps: torch.Tensor, counts: torch.Tensor, token_losses: torch.Tensor | None = None,
                 head_inputs: tuple | None = None):
        self.logps, self.counts = logps, counts
        self._token_losses, self._head_inputs = token_losses, head_inputs

    def with_head_gradients(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss``, plus a zero that carries lm_head's gradient of ``loss`` when lm_head is trained."""
        if self._head_inputs is None:
            return loss
        head, hidden, targets, chunk_size = self._head_inputs
        (row_weights,) = torch.autograd.grad(loss, self._token_losses, retain_graph=True)
        with _gathered(head):
            weight, bias = head.weight.detach(), head.bias.detach() if head.bias is not None else None
            _, grad_weight, grad_bias = _ChunkedLinearCrossEntropy.apply(hidden.detach(), weight, bias, targets,
                                                                         chunk_size, True, row_weights)
        return loss + _through_head(head, grad_weight, grad_bias)


def sequence_log_probs(hidden: torch.Tensor, head: torch.nn.Linear, labels: torch.Tensor,
                       sequence_ids: torch.Tensor | None = None, *, sequences: int | None = None,
                       chunk_size: int = CHUNK_SIZE) -> SequenceLogProbs:
    """``sum log p(label)`` over each sequence's trained tokens, from the tensor entering ``lm_head``.

    Every row of ``labels`` is one sequence, unless ``sequence_ids`` (same shape; packed rows hold several)
    numbers the sequence each position belongs to, with ``sequences`` of them. Gradients reach the hidden
    states per sequence (see :class:`_ChunkedLinearCrossEntropy`); lm_head's through
    :meth:`SequenceLogProbs.with_head_gradients`.
    """
    selected, targets, where = trained_positions(hidden, labels)
    if sequence_ids is None:
        owners, sequences = where // labels.shape[-1], labels.shape[0]
    else:
        shifted = torch.nn.functional.pad(sequence_ids, (0, 1), value=-1)[..., 1:].reshape(-1)
        owners = shifted.to(where.device).index_select(0, where)
    with _gathered(head):
        weight, bias = head.weight.detach(), head.bias.detach() if head.bias is not None else None
        token_losses, _, _ = _ChunkedLinearCrossEntropy.apply(selected, weight, bias, targets, chunk_size, False)
    head_trains = torch.is_grad_enabled() and head.weight.requires_grad and token_losses.requires_grad
    return per_sequence(token_losses, owners, sequences, head_inputs=(head, selected, targets, chunk_size)
                        if head_trains else None)


def per_sequence(token_losses: torch.Tensor, owners: torch.Tensor, sequences: int, *,
                 head_inputs: tuple | None = None) -> SequenceLogProbs:
    """:class:`SequenceLogProbs` from each trained token's loss (``-log p``) and the sequence it belongs to."""
    logps = -torch.zeros(sequences, dtype=torch.float32, device=token_losses.device).index_add(
        0, owners.to(token_losses.device), token_losses.float())
    counts = torch.bincount(owners, minlength=sequences).to(token_losses.device)
    return SequenceLogProbs(logps, counts, token_losses, head_inputs)


class ChunkedLossTrainerMixin:
    """For a ``transformers.Trainer`` subclass: the loss from the tensor entering ``lm_head``, never full logits.

    Same loss and gradients as the Trainer's default (the model's own loss from ``labels``), including its
    normalisation under gradient accumulation and across devices.
    """

    loss_kernel: str | None = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        if not self.model_accepts_loss_kwargs:  # the model would average per batch; so does the Trainer then
            num_items_in_batch = None
        with capture_head_input(self.model) as captured:
            outputs = model(**inputs)
        if captured.hidden is None:
            raise LossError("the model's forward did not call its output layer (lm_head); use --loss_impl full")
        head = self.model.get_output_embeddings()
        loss = causal_lm_loss(captured.hidden, head, labels, num_items_in_batch=num_items_in_batch,
                              kernel=self.loss_kernel)
        per_token = self.model_accepts_loss_kwargs and num_items_in_batch is not None
        if self.args.average_tokens_across_devices and per_token:
            loss_scale = self.accelerator.num_processes // self.get_tp_size()  # as Trainer.compute_loss
            loss = loss * (loss_scale if self.args.n_gpu <= 1 else self.args.n_gpu)
        outputs["loss"] = loss
        return (loss, outputs) if return_outputs else loss


def make_trainer(choice: LossChoice, base: type, **trainer_kwargs):
    """A trainer of class ``base`` (a ``transformers.Trainer``) computing its loss as ``choice`` says (full: the
    base class unchanged)."""
    if choice.impl == "full":
        return base(**trainer_kwargs)
    trainer = type("ChunkedLossTrainer", (ChunkedLossTrainerMixin, base), {})(**trainer_kwargs)
    trainer.loss_kernel = choice.kernel
    return trainer


def resolve_loss(requested: str, model, *, device_type: str, zero_stage: int = 0) -> LossChoice:
    """:func:`choose_loss_impl` for a loaded model: ``auto`` falls back to full logits when its head does not fit."""
    problem = head_problem(model)
    if problem is not None and requested != "full":
        if requested != "auto":
            raise LossError(f"--loss_impl {requested}: {problem}; use --loss_impl full")
        return LossChoice("full", None, f"loss: full logits ({problem})")
    half = model.get_output_embeddings().weight.dtype in (torch.float16, torch.bfloat16)
    return choose_loss_impl(requested, device_type=device_type, installed=installed_fused_kernels(),
                            zero_stage=zero_stage, half_precision=half)
