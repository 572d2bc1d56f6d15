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
from typing import Any, ClassVar

from minicpm_data.conversation import Conversation, LabeledConversation, Message, PreferencePair

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
    """What ``minicpm-data stats`` reports for one file of conversations (or KTO rows: ``labels`` counts them)."""

    unit: ClassVar[str] = "sample"
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
    labels: Counter = field(default_factory=Counter)  # KTO rows: how many are desirable / undesirable

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
            **({"labels": dict(self.labels)} if self.labels else {}),
        }


def read_all(path: str | Path, kind: str = "messages") -> list[Any]:
    """Every record of a target-format file of ``kind`` (conversations, pairs or KTO rows), read with the
    garbage collector paused (much faster)."""
    from minicpm_data.io import read_examples
    from minicpm_data.render import gc_paused

    with gc_paused():
        return [item for _, item in read_examples(path, kind)]


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


def compute_kto_stats(file: str, rows: Sequence[LabeledConversation], tokenizer: Any, **options: Any) -> FileStats:
    """:func:`compute_stats` of KTO rows (only the final, labelled answer is trained), with their labels counted."""
    stats = compute_stats(file, rows, tokenizer, train_on="last", **options)
    stats.labels = Counter("desirable" if row.label else "undesirable" for row in rows)
    return stats


@dataclass
class PairStats:
    """What ``minicpm-data stats`` reports for one file of preference pairs, from :func:`render_pairs`.

    ``tokens``/``lengths``: each pair's longer side (the full rendering); ``context``: the prompt tokens both
    sides share; ``chosen``/``rejected``: each answer's trained tokens (the answer and what closes it).
    ``problems`` counts the pairs training skips, by :data:`~minicpm_data.render.PAIR_PROBLEMS` reason; of
    those, ``answer truncated away`` and ``no difference left`` are truncation's doing. ``merged_boundary``:
    pairs whose answer's first token the tokenizer merged with the prompt's last (trained from the shared prefix).
    """

    unit: ClassVar[str] = "pair"
    file: str
    records: int
    model_max_length: int
    truncation: str
    batch_size: int
    context: Distribution = Distribution()
    chosen: Distribution = Distribution()
    rejected: Distribution = Distribution()
    tokens: Distribution = Distribution()
    over_max_length: int = 0                # pairs with a side longer than model_max_length
    answers_cut: int = 0                    # still trained, but with answer tokens cut
    problems: Counter = field(default_factory=Counter)
    merged_boundary: int = 0
    trainable_pairs: int = 0
    total_tokens: int = 0                   # both sides, after truncation, trainable pairs only
    trained_tokens: int = 0
    padding_to_longest: int = 0             # each batch's 2 x batch_size sequences padded to its longest
    suggested_max_length: int = 0
    lengths: Any = None

    @property
    def cut_by_truncation(self) -> int:
        """Pairs truncation drops or leaves without a differing token."""
        return self.problems["answer truncated away"] + self.problems["no difference left"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file, "kind": "pairs", "records": self.records, "model_max_length": self.model_max_length,
            "truncation": self.truncation, "context_tokens": self.context.to_dict(),
            "chosen_tokens": self.chosen.to_dict(), "rejected_tokens": self.rejected.to_dict(),
            "tokens_longer_side": self.tokens.to_dict(), "over_max_length": self.over_max_length,
            "answers_cut": self.answers_cut, "cut_by_truncation": self.cut_by_truncation,
            "problems": dict(self.problems), "merged_boundary": self.merged_boundary,
            "trainable_pairs": self.trainable_pairs,
            "total_tokens": self.total_tokens, "trained_tokens": self.trained_tokens,
            "padding": {"batch_size": self.batch_size, "to_longest_in_batch": self.padding_to_longest},
            "suggested_model_max_length": self.suggested_max_length,
        }


def compute_pair_stats(file: str, pairs: Sequence[PreferencePair], tokenizer: Any, *, model_max_length: int,
                       template: str | None = None, truncation: str = "right", batch_size: int = 8,
                       on_progress: Callable[[int], None] | None = None) -> PairStats:
    """Render every pair once (:func:`~minicpm_data.render.render_pairs`) and reduce them to :class:`PairStats`."""
    import numpy as np

    from minicpm_data.render import gc_paused, render_pairs

    columns: dict[str, list[int]] = {name: [] for name in ("context", "chosen", "rejected", "full_c", "full_r",
                                                           "kept_c", "kept_r", "trained", "lost", "ok", "merged")}
    problems: Counter = Counter()
    with gc_paused():
        for pair in render_pairs(pairs, tokenizer, template=template, max_length=model_max_length,
                                 truncation=truncation, on_progress=on_progress):
            chosen, rejected = pair.chosen, pair.rejected
            for name, value in (("context", pair.prompt_tokens), ("chosen", chosen.trained_tokens),
                                ("rejected", rejected.trained_tokens), ("full_c", chosen.num_tokens),
                                ("full_r", rejected.num_tokens), ("kept_c", len(chosen.input_ids)),
                                ("kept_r", len(rejected.input_ids)),
                                ("trained", chosen.trained_tokens + rejected.trained_tokens
                                 - chosen.trained_tokens_lost - rejected.trained_tokens_lost),
                                ("lost", chosen.trained_tokens_lost + rejected.trained_tokens_lost),
                                ("ok", pair.problem is None), ("merged", pair.merged_boundary)):
                columns[name].append(value)
            if pair.problem:
                problems[pair.problem] += 1
    data = {name: np.array(values, dtype=np.int64) for name, values in columns.items()}
    ok = data["ok"].astype(bool)
    longer = np.maximum(data["full_c"], data["full_r"])
    sides = np.stack([data["kept_c"], data["kept_r"]], axis=1)[ok].reshape(-1)  # c0, r0, c1, r1, ...
    return PairStats(
        file=file, records=len(pairs), model_max_length=model_max_length, truncation=truncation,
        batch_size=batch_size, context=Distribution.of(data["context"]), chosen=Distribution.of(data["chosen"]),
        rejected=Distribution.of(data["rejected"]), tokens=Distribution.of(longer),
        over_max_length=int((longer > model_max_length).sum()), answers_cut=int(((data["lost"] > 0) & ok).sum()),
        problems=problems, merged_boundary=int(data["merged"].sum()), trainable_pairs=int(ok.sum()),
        total_tokens=int(sides.sum()),
        trained_tokens=int(data["trained"][ok].sum()), padding_to_longest=padding_to_longest(sides, 2 * batch_size),
        suggested_max_length=suggest_max_length(longer), lengths=longer,
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
