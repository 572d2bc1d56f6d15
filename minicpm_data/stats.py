"""Numbers about a data file as training will see it, all from :func:`minicpm_data.render.render_many`.

Token counts are of the full rendering (before truncation) unless the name says otherwise;
``total_tokens`` / ``trained_tokens`` are per epoch after the truncation policy, over the samples
training keeps (a sample with no trained token left is never trained on).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minicpm_data.conversation import Conversation, Message

PERCENTILES = (50, 90, 95, 99)
LENGTH_MULTIPLE = 64


@dataclass(frozen=True)
class Distribution:
    """min, mean, p50, p90, p95, p99, max of one number per sample (zeros when there is no sample)."""

    min: int = 0
    mean: float = 0.0
    p50: float = 0.0
    p90: float = 0.0
    p95: float = 0.0
    p99: float = 0.0
    max: int = 0

    @classmethod
    def of(cls, values: Any) -> "Distribution":
        import numpy as np

        if len(values) == 0:
            return cls()
        p50, p90, p95, p99 = np.percentile(values, PERCENTILES)
        return cls(int(values.min()), float(values.mean()), float(p50), float(p90), float(p95), float(p99),
                   int(values.max()))

    def to_dict(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in ("min", "mean", "p50", "p90", "p95", "p99", "max")}


@dataclass
class FileStats:
    """What ``minicpm-data stats`` reports for one file."""

    file: str
    records: int
    model_max_length: int
    truncation: str
    batch_size: int
    train_on: str = "all"
    roles: Counter = field(default_factory=Counter)
    turns: Distribution = Distribution()
    tokens: Distribution = Distribution()
    trained: Distribution = Distribution()
    template_overhead: float = 0.0          # mean tokens per sample that the layout adds around contents
    over_max_length: int = 0
    labels_partly_truncated: int = 0        # lose some trained tokens, still trained on
    labels_fully_truncated: int = 0         # lose every trained token: never trained on
    no_trained_tokens: int = 0              # nothing trained even before truncation (no answer, or all train: false)
    trainable_samples: int = 0
    trained_tokens_lost: int = 0
    total_tokens: int = 0                   # per epoch, after truncation, trainable samples only
    trained_tokens: int = 0
    padding_to_max_length: int = 0          # pad tokens when every sample is padded to model_max_length
    padding_to_longest: int = 0             # pad tokens when each batch is padded to its longest sample
    suggested_max_length: int = 0
    lengths: Any = None                     # numpy array of full token counts, for histograms

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (``lengths`` left out)."""
        return {
            "file": self.file, "records": self.records, "model_max_length": self.model_max_length,
            "truncation": self.truncation, "train_on": self.train_on, "roles": dict(self.roles), "turns": self.turns.to_dict(),
            "tokens": self.tokens.to_dict(), "trained_tokens_per_sample": self.trained.to_dict(),
            "template_overhead": self.template_overhead, "over_max_length": self.over_max_length,
            "labels_partly_truncated": self.labels_partly_truncated,
            "labels_fully_truncated": self.labels_fully_truncated, "no_trained_tokens": self.no_trained_tokens,
            "trainable_samples": self.trainable_samples, "trained_tokens_lost": self.trained_tokens_lost,
            "total_tokens": self.total_tokens, "trained_tokens": self.trained_tokens,
            "padding": {"batch_size": self.batch_size, "to_max_length": self.padding_to_max_length,
                        "to_longest_in_batch": self.padding_to_longest},
            "suggested_model_max_length": self.suggested_max_length,
        }


def read_all(path: str | Path) -> list[Conversation]:
    """Every conversation of a target-format file, read with the garbage collector paused (much faster)."""
    from minicpm_data.io import read_conversations
    from minicpm_data.render import gc_paused

    with gc_paused():
        return [conversation for _, conversation in read_conversations(path)]


def compute_stats(file: str, conversations: Sequence[Conversation], tokenizer: Any, *, model_max_length: int,
                  template: str | None = None, truncation: str = "right", batch_size: int = 8,
                  train_on: str = "all", on_progress: Callable[[int], None] | None = None) -> FileStats:
    """Render every conversation once (batched) and reduce the samples to :class:`FileStats`; trained
    tokens count the assistant turns that ``train_on`` and the turns' own ``train`` flags select."""
    import numpy as np

    from minicpm_data.render import gc_paused, render_stream

    count = len(conversations)
    full, trained, lost = [], [], []
    with gc_paused():
        for sample in render_stream(conversations, tokenizer, template=template, max_length=model_max_length,
                                    truncation=truncation, train_on=train_on, on_progress=on_progress):
            full.append(sample.num_tokens)
            trained.append(sample.trained_tokens)
            lost.append(sample.trained_tokens_lost)
        shapes = Counter(tuple(m.role for m in conversation.messages) for conversation in conversations)
    full, trained, lost = (np.array(values, dtype=np.int64) for values in (full, trained, lost))
    roles: Counter = Counter()
    overhead = 0
    turn_counts = []
    for shape, times in shapes.items():
        roles.update({role: times * shape.count(role) for role in set(shape)})
        overhead += times * _layout_tokens(shape, tokenizer, template)
        turn_counts += [len(shape)] * times
    keep = trained > lost  # RenderedSample.trainable
    kept = np.minimum(full, model_max_length)  # both policies cut input_ids to model_max_length
    return FileStats(
        file=file, records=count, model_max_length=model_max_length, truncation=truncation,
        batch_size=batch_size, train_on=train_on, roles=roles, turns=Distribution.of(np.array(turn_counts, dtype=np.int64)),
        tokens=Distribution.of(full), trained=Distribution.of(trained),
        template_overhead=overhead / count if count else 0.0,
        over_max_length=int((full > model_max_length).sum()),
        labels_partly_truncated=int(((lost > 0) & keep).sum()),
        labels_fully_truncated=int(((trained > 0) & ~keep).sum()),
        no_trained_tokens=int((trained == 0).sum()), trainable_samples=int(keep.sum()),
        trained_tokens_lost=int(lost.sum()), total_tokens=int(kept[keep].sum()),
        trained_tokens=int((trained - lost)[keep].sum()),
        padding_to_max_length=int(model_max_length * keep.sum() - kept[keep].sum()),
        padding_to_longest=padding_to_longest(kept[keep], batch_size),
        suggested_max_length=suggest_max_length(full), lengths=full,
    )


def padding_to_longest(lengths: Any, batch_size: int) -> int:
    """Pad tokens when consecutive batches of ``batch_size`` are each padded to their longest sample."""
    whole = len(lengths) // batch_size * batch_size
    batches = lengths[:whole].reshape(-1, batch_size)
    padding = int((batches.max(axis=1, keepdims=True) - batches).sum()) if whole else 0
    rest = lengths[whole:]
    return padding + (int((rest.max() - rest).sum()) if len(rest) else 0)


def suggest_max_length(lengths: Any) -> int:
    """The smallest multiple of 64 that covers the 99th percentile of sample lengths (at least 64)."""
    import numpy as np

    if len(lengths) == 0:
        return LENGTH_MULTIPLE
    p99 = float(np.percentile(lengths, 99))
    return max(LENGTH_MULTIPLE, -(-int(np.ceil(p99)) // LENGTH_MULTIPLE) * LENGTH_MULTIPLE)


def _layout_tokens(roles: tuple[str, ...], tokenizer: Any, template: str | None) -> int:
    """Tokens the layout itself costs for a sequence of roles: the rendering with empty contents."""
    from minicpm_data.render import render

    return render(Conversation([Message(role, "") for role in roles]), tokenizer, template=template).num_tokens
