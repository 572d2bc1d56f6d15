"""Evaluate a model on a dev file: loss and perplexity on the assistant tokens training would learn
(render()'s labels), and, for answers from a small label set (OCNLI: entailment / neutral /
contradiction), exact-match accuracy of greedy answers per label with a confusion table.

Every trained token of every sample weighs the same: ``loss = sum of token losses / trained tokens``,
``perplexity = exp(loss)`` (the Trainer's eval_loss averages per-batch means instead, so it differs
slightly when batches hold different numbers of trained tokens).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from minicpm_data.conversation import Conversation
from minicpm_data.errors import MinicpmError

MAX_LABELS = 20  # a label set has at most this many distinct answers ...
MAX_LABEL_CHARS = 40  # ... each this short ...
OTHER = "(other)"  # a generated answer outside the label set


class EvaluationError(MinicpmError):
    """The dev data cannot be evaluated as asked."""


@dataclass
class SamplePrediction:
    index: int
    reference: str
    loss: float | None  # mean loss over its trained tokens; None when no trained token is left
    trained_tokens: int
    prediction: str | None = None

    @property
    def correct(self) -> bool | None:
        return None if self.prediction is None else self.prediction.strip() == self.reference.strip()

    def to_dict(self) -> dict:
        record = {"index": self.index, "reference": self.reference, "loss": self.loss,
                  "trained_tokens": self.trained_tokens}
        if self.prediction is not None:
            record.update(prediction=self.prediction, correct=self.correct)
        return record


@dataclass
class EvalResult:
    samples: int
    scored: int  # samples with trained tokens left after truncation
    trained_tokens: int
    loss: float
    labels: list[str] = field(default_factory=list)  # the label set; empty for free-form answers
    predictions: list[SamplePrediction] = field(default_factory=list)

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else math.inf

    @property
    def generated(self) -> list[SamplePrediction]:
        return [p for p in self.predictions if p.prediction is not None]

    @property
    def accuracy(self) -> float | None:
        generated = self.generated
        return sum(bool(p.correct) for p in generated) / len(generated) if generated else None

    def per_label(self) -> dict[str, tuple[int, int]]:
        """Label -> (correct, total) by the reference label."""
        out: dict[str, tuple[int, int]] = {}
        for p in self.generated:
            correct, total = out.get(p.reference, (0, 0))
            out[p.reference] = (correct + bool(p.correct), total + 1)
        return out

    def confusion(self) -> dict[str, dict[str, int]]:
        """Reference label -> predicted label (or ``(other)``) -> count."""
        table: dict[str, dict[str, int]] = {gold: {} for gold in self.labels}
        for p in self.generated:
            predicted = p.prediction.strip() if p.prediction.strip() in self.labels else OTHER
            row = table.setdefault(p.reference, {})
            row[predicted] = row.get(predicted, 0) + 1
        return table

    def metrics(self) -> dict:
        metrics = {"samples": self.samples, "scored": self.scored, "trained_tokens": self.trained_tokens,
                   "loss": self.loss, "perplexity": self.perplexity}
        if self.generated:
            metrics.update(accuracy=self.accuracy, labels=self.labels,
                           per_label={k: {"correct": c, "total": t, "accuracy": c / t}
                                      for k, (c, t) in self.per_label().items()},
                           confusion=self.confusion())
        return metrics


def detect_label_set(references: list[str]) -> list[str]:
    """The distinct final answers if they form a small label set, else [] (free-form answers)."""
    counts = Counter(r.strip() for r in references)
    small = len(counts) <= min(MAX_LABELS, len(references) / 2)
    if not references or not small or any(len(label) > MAX_LABEL_CHARS for label in counts):
        return []
    return sorted(counts)


def _split_answer(conversation: Conversation, index: int) -> tuple[Conversation, str]:
    if not conversation.messages or conversation.messages[-1].role != "assistant":
        raise EvaluationError(f"record {index}: the last message must be the assistant's answer to evaluate")
    return Conversation(conversation.messages[:-1]), conversation.messages[-1].content


def _batch_losses(model, batch: list, pad_id: int, device) -> list[tuple[float, int]]:
    """(summed token loss, trained tokens) per rendered sample of one right-padded batch, from its labels."""
    import torch

    width = max(len(r.input_ids) for r in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, r in enumerate(batch):
        ids[row, :len(r.input_ids)] = torch.tensor(r.input_ids)
        labels[row, :len(r.labels)] = torch.tensor(r.labels)
        mask[row, :len(r.input_ids)] = 1
    from minicpm_train.loss import capture_head_input, head_problem, per_sample_losses

    ids, mask = ids.to(device), mask.to(device)
    with torch.no_grad():
        if head_problem(model) is None:  # chunk by chunk through lm_head: never [batch, length, vocab] logits
            with capture_head_input(model) as captured:
                model(input_ids=ids, attention_mask=mask)
            sums, counts = per_sample_losses(captured.hidden, model.get_output_embeddings(), labels)
        else:
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            targets = labels[:, 1:].to(device)  # the token at t is predicted from positions < t
            token_loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets,
                                                           ignore_index=-100, reduction="none")
            sums, counts = token_loss.sum(dim=1), (targets != -100).sum(dim=1)
    return [(float(s), int(n)) for s, n in zip(sums.tolist(), counts.tolist())]


def _greedy_answers(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, device) -> list[str]:
    """Greedy answers for one left-padded batch of prompts."""
    import torch

    from minicpm_data.tokenizer import pad_token_id
    from minicpm_train.inference import stop_token_ids

    pad_id = pad_token_id(tokenizer)
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    with torch.no_grad():
        output = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                                eos_token_id=stop_token_ids(model, tokenizer), pad_token_id=pad_id)
    return [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in output]


def evaluate(model, tokenizer, records: Iterable[tuple[int, Conversation]], *, template: str | None = None,
             max_length: int | None = None, batch_size: int = 8, labels: str | list[str] = "auto",
             generate: bool | None = None, max_new_tokens: int = 256, train_on: str = "all",
             progress: Callable[[str, int, int], None] | None = None) -> EvalResult:
    """Loss / perplexity on trained tokens; greedy exact-match accuracy when answers form a label set.

    ``labels``: "auto" (detect), "none", or the label list. ``generate``: None generates exactly when
    there is a label set; True also for free-form answers (predictions only, no accuracy). ``train_on``:
    which assistant turns the loss covers (as the run trained: all, or last).
    """
    from minicpm_data.render import render, render_prompt
    from minicpm_data.tokenizer import pad_token_id

    records = list(records)
    if not records:
        raise EvaluationError("the dev file has no records")
    pairs = [_split_answer(conversation, index) for index, conversation in records]
    references = [answer for _, answer in pairs]
    label_set = detect_label_set(references) if labels == "auto" else [] if labels == "none" else list(labels)
    generate = bool(label_set) if generate is None else generate
    device = next(model.parameters()).device
    report = progress or (lambda stage, done, total: None)

    rendered = [render(conversation, tokenizer, template=template, max_length=max_length, train_on=train_on)
                for _, conversation in records]
    scored = [i for i, r in enumerate(rendered) if r.trainable]
    pad_id = pad_token_id(tokenizer)
    losses: dict[int, tuple[float, int]] = {}
    for start in range(0, len(scored), batch_size):
        chunk = scored[start:start + batch_size]
        losses.update(zip(chunk, _batch_losses(model, [rendered[i] for i in chunk], pad_id, device)))
        report("loss", min(start + batch_size, len(scored)), len(scored))
    total_loss = sum(s for s, _ in losses.values())
    total_tokens = sum(n for _, n in losses.values())
    if total_tokens == 0:
        raise EvaluationError("no sample has a trained token left (answers truncated away by --model_max_length?)")

    predictions = [SamplePrediction(index, answer, losses[i][0] / losses[i][1] if i in losses else None,
                                    losses[i][1] if i in losses else 0)
                   for i, ((index, _), (_, answer)) in enumerate(zip(records, pairs))]
    if generate:
        if label_set:
            longest = max(len(tokenizer(label, add_special_tokens=False)["input_ids"]) for label in label_set)
            max_new_tokens = longest + 4  # room for the end-of-turn token and a stray space
        prompts = [render_prompt(prompt, tokenizer, template=template) for prompt, _ in pairs]
        answers: list[str] = []
        for start in range(0, len(prompts), batch_size):
            answers += _greedy_answers(model, tokenizer, prompts[start:start + batch_size], max_new_tokens, device)
            report("generate", len(answers), len(prompts))
        for prediction, answer in zip(predictions, answers):
            prediction.prediction = answer
    return EvalResult(len(records), len(scored), total_tokens, total_loss / total_tokens, label_set, predictions)


def check_predictions_path(path: str | Path) -> None:
    """Refuse a predictions path that cannot become a file (a folder, or under a file), before evaluating."""
    path = Path(path)
    if path.is_dir():
        raise EvaluationError(f"-o {path} is a folder: name the predictions file, e.g. {path / 'predictions.jsonl'}")
    blocking = next((parent for parent in path.parents if parent.exists() and not parent.is_dir()), None)
    if blocking is not None:
        raise EvaluationError(f"-o {path}: {blocking} is a file, not a folder")


def write_predictions(result: EvalResult, path: str | Path) -> Path:
    """One JSON object per sample (index, reference, loss, prediction, correct), and the metrics beside it."""
    from minicpm_data.io import write_records

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_records(path, (prediction.to_dict() for prediction in result.predictions), fmt="jsonl")
    path.with_suffix(".metrics.json").write_text(json.dumps(result.metrics(), indent=2, ensure_ascii=False) + "\n",
                                                 encoding="utf-8")
    return path


# --- preference pairs -------------------------------------------------------------------------------------


@dataclass
class PairPrediction:
    """One held-out pair: summed log-probabilities of each answer's trained tokens under the model and the
    reference, and the rewards ``beta * (model - reference)``."""

    index: int
    chosen_logp: float
    rejected_logp: float
    reference_chosen_logp: float
    reference_rejected_logp: float
    beta: float

    @property
    def chosen_reward(self) -> float:
        return self.beta * (self.chosen_logp - self.reference_chosen_logp)

    @property
    def rejected_reward(self) -> float:
        return self.beta * (self.rejected_logp - self.reference_rejected_logp)

    def to_dict(self) -> dict:
        return {"index": self.index, "chosen_logp": self.chosen_logp, "rejected_logp": self.rejected_logp,
                "reference_chosen_logp": self.reference_chosen_logp,
                "reference_rejected_logp": self.reference_rejected_logp, "chosen_reward": self.chosen_reward,
                "rejected_reward": self.rejected_reward, "correct": self.chosen_reward > self.rejected_reward}


@dataclass
class PairEvalResult:
    """Preference metrics of a model on a file of pairs (see docs/preference-training.md):

    - ``accuracy``: pairs whose chosen answer gets the higher reward (DPO's reward accuracy; a model equal to
      its reference scores 0, not 0.5: both rewards are 0);
    - ``margin``: the mean reward margin, chosen minus rejected;
    - ``logp_accuracy``: pairs whose chosen answer the model alone finds more likely (summed log-probability;
      no reference), and ``reference_logp_accuracy`` the same for the reference: the model's own ranking,
      which training can raise or lower and which can be compared with chance (0.5).
    """

    pairs: int
    dropped: dict[str, int]
    reference: str
    merged_boundary: int = 0  # scored from the shared prefix: an answer merged with the prompt's end
    predictions: list[PairPrediction] = field(default_factory=list)

    def metrics(self) -> dict:
        p = self.predictions
        count = max(len(p), 1)
        return {"pairs": self.pairs, "scored": len(p), "dropped": self.dropped, "merged_boundary": self.merged_boundary,
                "reference": self.reference,
                "accuracy": sum(x.chosen_reward > x.rejected_reward for x in p) / count,
                "margin": sum(x.chosen_reward - x.rejected_reward for x in p) / count,
                "chosen_reward": sum(x.chosen_reward for x in p) / count,
                "rejected_reward": sum(x.rejected_reward for x in p) / count,
                "logp_accuracy": sum(x.chosen_logp > x.rejected_logp for x in p) / count,
                "reference_logp_accuracy": sum(x.reference_chosen_logp > x.reference_rejected_logp for x in p) / count}


def evaluate_pairs(model, tokenizer, pairs: Iterable[tuple[int, object]], *, reference=None, reference_name: str,
                   beta: float = 0.1, template: str | None = None, max_length: int | None = None, batch_size: int = 8,
                   progress: Callable[[str, int, int], None] | None = None) -> PairEvalResult:
    """Score held-out pairs: the model's and the reference's log-probabilities of both answers.

    ``reference``: a model, or None for ``model`` with its LoRA adapter disabled (or ``model`` itself when it
    has none: every reward is then 0). Pairs the renderer cannot train (``RenderedPair.problem``) are counted
    by reason and not scored; those scored from the shared prefix (``RenderedPair.merged_boundary``) are counted.
    """
    import contextlib

    import torch

    from minicpm_data.render import render_pairs
    from minicpm_data.tokenizer import pad_token_id
    from minicpm_train.preference import PreferenceCollator, log_probs

    indexed = list(pairs)
    if not indexed:
        raise EvaluationError("the dev file has no pairs")
    rendered = list(render_pairs((pair for _, pair in indexed), tokenizer, template=template, max_length=max_length))
    dropped: dict[str, int] = {}
    for pair in rendered:
        if pair.problem:
            dropped[pair.problem] = dropped.get(pair.problem, 0) + 1
    scored = [(index, pair) for (index, _), pair in zip(indexed, rendered) if pair.problem is None]
    if not scored:
        raise EvaluationError(f"no pair of the dev file can be scored ({dropped})")
    collator = PreferenceCollator(pad_token_id(tokenizer))
    device = next(model.parameters()).device
    report = progress or (lambda stage, done, total: None)

    def scores(scoring_model, batch) -> list[float]:
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        return log_probs(scoring_model, batch).logps.tolist()

    result = PairEvalResult(len(indexed), dropped, reference_name, sum(p.merged_boundary for _, p in scored))
    for start in range(0, len(scored), batch_size):
        chunk = scored[start:start + batch_size]
        batch = collator([{"chosen_input_ids": p.chosen.input_ids, "chosen_labels": p.chosen.labels,
                           "rejected_input_ids": p.rejected.input_ids, "rejected_labels": p.rejected.labels}
                          for _, p in chunk])
        with torch.no_grad():
            own = scores(model, batch)
            if reference is not None:
                theirs = scores(reference, batch)
            else:
                disabled = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
                with disabled:
                    theirs = scores(model, batch)
        n = len(chunk)
        for row, (index, _) in enumerate(chunk):
            result.predictions.append(PairPrediction(index, own[row], own[n + row], theirs[row], theirs[n + row], beta))
        report("pairs", min(start + batch_size, len(scored)), len(scored))
    return result
