"""Preference training (``--stage dpo`` and ``--stage kto``): datasets over the tokenized cache, the collator,
the losses, the reference model, and the trainer that puts them together.

Every sequence's log-probability is the sum of ``log p`` over its trained tokens (the answer and what the
layout trains with it), taken chunk by chunk through lm_head by :func:`minicpm_train.loss.sequence_log_probs`:
never ``[batch, length, vocab]`` logits. A DPO batch is ``[chosen..., rejected...]`` in one forward.

DPO (``r = beta * (log pi(y|x) - log pi_ref(y|x))``, ``d = (log-ratio of chosen) - (log-ratio of rejected)``):
- ``sigmoid``: ``-log sigmoid(beta * d)`` (the DPO paper);
- ``hinge``: ``max(0, 1 - beta * d)`` (SLiC);
- ``ipo``: ``(d' - 1 / (2 beta))^2`` with ``d'`` the difference of log-ratios each divided by its answer's
  trained tokens (IPO, length-normalised as TRL does);
- plus ``sft_weight`` times the mean negative log-likelihood of the chosen answers' tokens in the batch
  (OpenBMB's ``sft_dpo_trainer``: ``loss = dpo_loss + sft_loss_weight * sft_loss``; TRL's ``["sigmoid", "sft"]``).

KTO: ``z = clamp(mean over the batch of (log pi - log pi_ref) of mismatched prompt/answer pairs, min 0)``
(detached); a desirable answer's loss ``desirable_weight * (1 - sigmoid(beta * (log-ratio - z)))``, an
undesirable one's ``undesirable_weight * (1 - sigmoid(beta * (z - log-ratio)))``; the batch mean. Each row's
mismatched pair is its prompt with the previous row's answer in the file (the last row's for the first).

The reference: with LoRA / QLoRA the same model with its adapter disabled, each step; for full fine-tuning
(or ``--ref_model``) the reference log-probabilities are computed once before training and stored in the data
file's cache folder, under a name keyed by the reference's files and the precision.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minicpm_data.errors import MinicpmError
from minicpm_train.data import IGNORE_INDEX, PackingCollator, PaddingCollator
from minicpm_train.loss import SequenceLogProbs, capture_head_input, per_sequence, sequence_log_probs, trained_positions

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")


class PreferenceError(MinicpmError):
    """A preference run cannot go as asked."""


@dataclass(frozen=True)
class PreferenceSettings:
    """The loss of a preference stage, from the run's options."""

    stage: str  # "dpo" or "kto"
    beta: float = 0.1
    loss: str = "sigmoid"  # DPO: sigmoid, ipo or hinge
    sft_weight: float = 0.0  # DPO: weight of the chosen answers' NLL
    desirable_weight: float = 1.0  # KTO
    undesirable_weight: float = 1.0  # KTO

    @classmethod
    def of(cls, options) -> "PreferenceSettings":
        return cls(options.stage, options.beta, options.pref_loss, options.sft_weight, options.desirable_weight,
                   options.undesirable_weight)


# --- datasets over the cache ------------------------------------------------------------------------------


def base_datasets(loaded: list[tuple[Any, Any]]) -> list:
    """The pair / KTO datasets under :func:`minicpm_train.data.load_data`'s (weighted) files."""
    return [part for dataset, _ in loaded for part in getattr(dataset, "parts", [dataset])]


# --- batches --------------------------------------------------------------------------------------------


@dataclass
class PreferenceCollator:
    """A DPO batch holds ``[chosen..., rejected...]`` (``sequences`` of them), a KTO batch its rows and, under
    ``kl``, their mismatched sequences. Padded to the longest, or with ``packing`` all in one row without
    padding (``sequence_ids`` tells each position's sequence; samples never attend to each other)."""

    pad_token_id: int
    packing: bool = False

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        if "chosen_input_ids" in features[0]:
            batch = self.collate([(f[f"{side}_input_ids"], f[f"{side}_labels"])
                                  for side in ("chosen", "rejected") for f in features])
            if "ref_logps" in features[0]:
                batch["ref_logps"] = torch.tensor(np.stack([f["ref_logps"] for f in features]).T.reshape(-1))
            return batch
        batch = self.collate([(f["input_ids"], f["labels"]) for f in features])
        batch["desirable"] = torch.tensor([f["desirable"] for f in features])
        batch["kl"] = self.collate([(f["kl_input_ids"], f["kl_labels"]) for f in features])
        if "ref_logps" in features[0]:
            reference = torch.tensor(np.stack([f["ref_logps"] for f in features]))
            batch["ref_logps"], batch["kl"]["ref_logps"] = reference[:, 0], reference[:, 1]
        return batch

    def collate(self, sequences: list[tuple[Any, Any]]) -> dict[str, Any]:
        if not self.packing:
            batch = PaddingCollator(self.pad_token_id)([{"input_ids": ids, "labels": labels} for ids, labels in sequences])
            return {**batch, "sequences": len(sequences)}
        labels = [np.array(labels, copy=True) for _, labels in sequences]
        for row in labels:  # in one row, a sequence's first label would be the previous one's last target
            row[0] = IGNORE_INDEX
        row = {"input_ids": np.concatenate([ids for ids, _ in sequences]), "labels": np.concatenate(labels),
               "position_ids": np.concatenate([np.arange(len(ids)) for ids, _ in sequences])}
        batch = PackingCollator(self.pad_token_id)([row])
        batch["sequence_ids"] = torch.repeat_interleave(torch.arange(len(sequences)),
                                                        torch.tensor([len(ids) for ids, _ in sequences]))[None]
        return {**batch, "sequences": len(sequences)}


def log_probs(model, batch: dict[str, Any], *, full_logits: bool = False, owner=None) -> SequenceLogProbs:
    """Each sequence's summed log-probability of its trained tokens, for a batch of :class:`PreferenceCollator`.

    ``owner``: the module whose lm_head ``model`` calls, when ``model`` wraps it (a DeepSpeed engine)."""
    inputs = {k: v for k, v in batch.items()
              if k not in ("labels", "sequence_ids", "sequences", "ref_logps", "desirable", "kl")}
    labels, sequence_ids, sequences = batch["labels"], batch.get("sequence_ids"), batch["sequences"]
    unwrapped = owner if owner is not None else model
    if full_logits:  # a head the chunked path cannot take (soft-capped logits, ...): the model's own logits
        logits = model(**inputs).logits
        selected, targets, where = trained_positions(logits, labels)
        losses = torch.nn.functional.cross_entropy(selected.float(), targets, reduction="none")
        owners = (where // labels.shape[-1] if sequence_ids is None
                  else torch.nn.functional.pad(sequence_ids, (0, 1), value=-1)[..., 1:].reshape(-1)[where.cpu()])
        return per_sequence(losses, owners.to(losses.device), sequences)
    with capture_head_input(unwrapped) as captured:
        model(**inputs)
    return sequence_log_probs(captured.hidden, unwrapped.get_output_embeddings(), labels, sequence_ids,
                              sequences=sequences)


# --- losses ---------------------------------------------------------------------------------------------


def dpo_loss(policy: SequenceLogProbs, reference: torch.Tensor, settings: PreferenceSettings) -> tuple[torch.Tensor, dict]:
    """The DPO loss of a ``[chosen..., rejected...]`` batch, and its metrics (module docstring)."""
    chosen, rejected = policy.logps.chunk(2)
    reference_chosen, reference_rejected = reference.to(policy.logps.device, torch.float32).chunk(2)
    chosen_ratio, rejected_ratio = chosen - reference_chosen, rejected - reference_rejected
    beta = settings.beta
    if settings.loss == "sigmoid":
        losses = -torch.nn.functional.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    elif settings.loss == "hinge":
        losses = torch.relu(1 - beta * (chosen_ratio - rejected_ratio))
    elif settings.loss == "ipo":
        chosen_tokens, rejected_tokens = policy.counts.clamp(min=1).chunk(2)
        losses = (chosen_ratio / chosen_tokens - rejected_ratio / rejected_tokens - 1 / (2 * beta)) ** 2
    else:
        raise PreferenceError(f"--pref_loss must be one of sigmoid, ipo, hinge, not {settings.loss!r}")
    loss = losses.mean()
    chosen_rewards, rejected_rewards = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
    metrics = {"rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
               "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
               "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
               "logps/chosen": chosen.detach().mean(), "logps/rejected": rejected.detach().mean(),
               "logps/accuracies": (chosen > rejected).float().mean()}
    if settings.sft_weight:
        sft = -chosen.sum() / policy.counts.chunk(2)[0].sum().clamp(min=1)
        metrics["dpo_loss"], metrics["sft_loss"] = loss.detach(), sft.detach()
        loss = loss + settings.sft_weight * sft
    return loss, metrics


def kto_loss(policy: SequenceLogProbs, reference: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor,
             settings: PreferenceSettings) -> tuple[torch.Tensor, dict]:
    """The KTO loss of a batch of rows (``desirable``: their labels; ``kl``: the detached KL estimate z)."""
    ratios = policy.logps - reference.to(policy.logps.device, torch.float32)
    desirable = desirable.to(ratios.device).bool()
    beta = settings.beta
    losses = torch.where(desirable, settings.desirable_weight * (1 - torch.sigmoid(beta * (ratios - kl))),
                         settings.undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratios))))
    rewards = beta * ratios.detach()
    metrics = {"kl": kl.item()}
    for name, chosen in (("chosen", desirable), ("rejected", ~desirable)):
        if chosen.any():
            metrics[f"rewards/{name}"] = rewards[chosen].mean().item()
            metrics[f"logps/{name}"] = policy.logps.detach()[chosen].mean().item()
    if desirable.any() and (~desirable).any():  # the difference of the means, in double precision
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return losses.mean(), metrics


def kto_kl(policy_logps: torch.Tensor, reference_logps: torch.Tensor) -> torch.Tensor:
    """KTO's z: the mean log-ratio of the mismatched sequences over every rank's batch, at least 0, detached."""
    kl = (policy_logps.detach() - reference_logps.to(policy_logps.device, torch.float32)).mean()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(kl)
        kl = kl / torch.distributed.get_world_size()
    return kl.clamp(min=0)


# --- the trainer ----------------------------------------------------------------------------------------


class PreferenceTrainerMixin:
    """For a ``transformers.Trainer`` subclass: the DPO or KTO loss of :class:`PreferenceCollator` batches,
    their rewards, accuracies and margins logged with the loss (``eval_`` ones at evaluation)."""

    preference: PreferenceSettings
    full_logits: bool = False

    def _reference(self, batch: dict[str, Any]) -> torch.Tensor:
        """Precomputed with the batch, or this model with its LoRA adapter disabled."""
        if "ref_logps" in batch:
            return batch["ref_logps"]
        unwrapped = self.accelerator.unwrap_model(self.model)
        if not hasattr(unwrapped, "disable_adapter"):
            raise PreferenceError("no reference log-probabilities for this batch: a full fine-tuning computes them "
                                  "before training (see the run's 'reference:' line)")
        with torch.no_grad(), unwrapped.disable_adapter():
            return log_probs(self.model, batch, full_logits=self.full_logits).logps

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        policy = log_probs(model, inputs, full_logits=self.full_logits, owner=self.model)
        reference = self._reference(inputs)
        if self.preference.stage == "dpo":
            loss, metrics = dpo_loss(policy, reference, self.preference)
        else:
            with torch.no_grad():
                mismatched = log_probs(model, inputs["kl"], full_logits=self.full_logits, owner=self.model).logps
            kl = kto_kl(mismatched, self._reference(inputs["kl"]))
            loss, metrics = kto_loss(policy, reference, inputs["desirable"], kl, self.preference)
        loss = policy.with_head_gradients(loss)
        mode = "train" if self.model.training else "eval"
        for name, value in metrics.items():
            self._preference_metrics[mode].setdefault(name, []).append(float(value))
        return (loss, {"loss": loss}) if return_outputs else loss

    def _get_eval_sampler(self, eval_dataset):
        return torch.utils.data.SequentialSampler(eval_dataset)  # rows are pairs: the Trainer's grouping reads input_ids

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Every rank calls this at the same step: each metric is its mean over all ranks' batches since the
        last log, as the Trainer's loss is (rank 0 alone writes it)."""
        mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        gathered = self._preference_metrics[mode]
        accelerator = self.accelerator
        reduce = None if accelerator.num_processes == 1 else \
            lambda totals: accelerator.reduce(totals.to(accelerator.device), reduction="sum").cpu()
        logs.update({f"{prefix}{name}": value for name, value in mean_over_ranks(gathered, reduce).items()})
        gathered.clear()
        super().log(logs, *args, **kwargs)


METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected", "logps/accuracies", "dpo_loss", "sft_loss", "kl")


def mean_over_ranks(values: dict[str, list[float]], reduce=None) -> dict[str, float]:
    """Each of :data:`METRICS` averaged over its values on every rank; ``reduce`` sums a tensor over the ranks
    (None: one process). A metric no rank has (KTO's rewards of a side no batch held) is left out; the names
    are fixed so that every rank reduces the same tensor whatever its batches held."""
    unknown = set(values) - set(METRICS)
    if unknown:
        raise PreferenceError(f"preference metrics {sorted(unknown)} are not in preference.METRICS")
    totals = torch.tensor([[sum(values.get(name, ())), len(values.get(name, ()))] for name in METRICS],
                          dtype=torch.float64)
    if reduce is not None:
        totals = reduce(totals)
    return {name: total / count for name, (total, count) in zip(METRICS, totals.tolist()) if count}


def make_preference_trainer(settings: PreferenceSettings, base: type, *, full_logits: bool, **trainer_kwargs):
    """A trainer of class ``base`` (a ``transformers.Trainer``) computing the loss of ``settings``."""
    trainer = type("PreferenceTrainer", (PreferenceTrainerMixin, base), {})(**trainer_kwargs)
    trainer.preference, trainer.full_logits = settings, full_logits
    trainer._preference_metrics = {"train": {}, "eval": {}}
    trainer.model_accepts_loss_kwargs = False  # per-pair means: the Trainer divides by accumulation steps
    return trainer


# --- the reference, computed once ---------------------------------------------------------------------


def reference_fingerprint(folder: str | Path, precision: str) -> str:
    """A key for a reference model's log-probabilities: its files (names, sizes, modification times) and the
    precision they are computed in."""
    digest = hashlib.sha256(f"reference v1 {precision}".encode())
    for path in sorted(Path(folder).iterdir()):
        if path.is_file() and path.suffix in (".safetensors", ".bin", ".json", ".py", ".model"):
            stat = path.stat()
            digest.update(f"{path.name} {stat.st_size} {stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def compute_reference(model, dataset, collator: PreferenceCollator, *, batch_size: int, device,
                      autocast_dtype: torch.dtype | None, full_logits: bool = False,
                      on_progress=None) -> np.ndarray:
    """``[rows, 2]`` reference log-probabilities of a pair dataset (chosen, rejected) or a KTO dataset
    (its sequence, its mismatched one), in order."""
    was_training = model.training
    model.eval()
    out = np.zeros((len(dataset), 2), dtype=np.float32)
    try:
        for start in range(0, len(dataset), batch_size):
            rows = range(start, min(start + batch_size, len(dataset)))
            batch = _to(collator([dataset[i] for i in rows]), device)
            with torch.no_grad(), torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                                                 enabled=autocast_dtype is not None):
                if "kl" in batch:
                    first = log_probs(model, batch, full_logits=full_logits).logps
                    second = log_probs(model, batch["kl"], full_logits=full_logits).logps
                else:
                    first, second = log_probs(model, batch, full_logits=full_logits).logps.chunk(2)
            out[start:start + len(rows)] = torch.stack([first, second], dim=1).float().cpu().numpy()
            if on_progress is not None:
                on_progress(start + len(rows), len(dataset))
    finally:
        model.train(was_training)
    return out


def _to(batch: dict[str, Any], device) -> dict[str, Any]:
    return {k: _to(v, device) if isinstance(v, dict) else v.to(device) if torch.is_tensor(v) else v
            for k, v in batch.items()}


def attach_reference(datasets: list, fingerprint: str, compute, *, main_process_first) -> list[str]:
    """Give every dataset its reference log-probabilities: read from its cache folder, or computed by
    ``compute(dataset)`` there first (by the main process; the others wait and read). Returns what was done."""
    done = []
    for dataset in datasets:
        target = Path(dataset.folder) / f"reference-{fingerprint}.npy"
        with main_process_first():
            if not target.is_file():
                values = compute(dataset)
                partial = target.with_name(f"{target.stem}.tmp-{os.getpid()}.npy")
                np.save(partial, values)
                partial.replace(target)  # atomic: a reader sees all of them or none
                done.append(f"reference log-probabilities of {len(dataset)} rows computed into {target}")
            else:
                done.append(f"reference log-probabilities of {len(dataset)} rows read from {target}")
        dataset.reference = np.load(target, mmap_mode="r")
    return done


def disable_dropout(model) -> int:
    """Dropout off (as TRL's trainers do): the policy's and the reference's log-probabilities must differ by
    training only, not by a random mask. Returns how many dropout layers there were."""
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
    for layer in layers:
        layer.p = 0.0
    return len(layers)


def prepare_reference(run, model, collator: PreferenceCollator, loaded_files: list, args, *, precision: str,
                      full_logits: bool) -> list[str]:
    """Decide where a run's reference log-probabilities come from, computing and caching them when needed;
    returns the lines to report. LoRA / QLoRA without ``--ref_model``: the adapter disabled, each step."""
    options = run.options
    if options.use_lora and not options.ref_model:
        return ["reference: the base model, by disabling the LoRA adapter (no second copy)"]
    from dataclasses import replace

    from minicpm_train import model as models

    source = options.ref_model or options.model_name_or_path
    device = args.device
    autocast_dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 and device.type == "cuda" else None
    state: dict[str, Any] = {}

    def compute(dataset) -> np.ndarray:
        if "model" not in state:  # loaded only when something must be computed
            if options.ref_model:
                state["model"] = models.load_base_model(replace(options, model_name_or_path=options.ref_model,
                                                                use_lora=True), precision=precision, device=str(device))
            else:  # full fine-tuning, before the first step: the model is still the reference
                state["model"] = model
            state["model"].to(device)
        return compute_reference(state["model"], dataset, replace(collator, packing=False),
                                 batch_size=args.per_device_eval_batch_size, device=device,
                                 autocast_dtype=autocast_dtype, full_logits=full_logits)

    lines = attach_reference(base_datasets(loaded_files), reference_fingerprint(source, precision), compute,
                             main_process_first=lambda: args.main_process_first(local=True,
                                                                                  desc="reference log-probabilities"))
    state.clear()
    return [f"reference: {source}" + (" (before training)" if not options.ref_model else ""), *lines]


def plot_rewards(log_history: list[dict], axes) -> None:
    """Rewards of the chosen and rejected answers and their margin (left scale), reward accuracy (right)."""
    for prefix, style in (("", "-"), ("eval_", "o--")):
        for name, color in (("chosen", "C0"), ("rejected", "C1"), ("margins", "C2")):
            points = [(e["step"], e[f"{prefix}rewards/{name}"]) for e in log_history if f"{prefix}rewards/{name}" in e]
            if points:
                axes.plot(*zip(*points), style, color=color, label=f"{prefix}{name}".replace("_", " "))
    accuracy = axes.twinx()
    for prefix, style in (("", ":"), ("eval_", "s:")):
        points = [(e["step"], e[f"{prefix}rewards/accuracies"]) for e in log_history
                  if f"{prefix}rewards/accuracies" in e]
        if points:
            accuracy.plot(*zip(*points), style, color="black", label=f"{prefix}accuracy".replace("_", " "))
    accuracy.set_ylim(-0.05, 1.05)
    accuracy.set_ylabel("reward accuracy")
    axes.set_xlabel("step")
    axes.set_ylabel("reward (beta x log-ratio)")
    axes.set_title("rewards")
    handles = [h for a in (axes, accuracy) for h in a.get_legend_handles_labels()[0]]
    if handles:
        axes.legend(handles=handles, fontsize="small")
    axes.grid(alpha=0.3)
