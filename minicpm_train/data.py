"""Training data: validated conversations rendered by the one renderer, cached, batched with little padding.

- :func:`load_supervised` validates the file, renders every conversation with
  ``minicpm_data.render.render_many`` (the same ids, labels and truncation that ``minicpm-data stats``
  shows), drops samples with no trained token left (counted), and caches the result keyed by the data
  file's content, the tokenizer, the template, the truncation policy and ``model_max_length``.
- :class:`PaddingCollator` pads a batch to its longest sample, not to ``model_max_length``.
- :func:`pack` + :class:`PackingCollator`: several samples per row; each sample's ``position_ids``
  restart at 0 and there is no 2D attention mask, so transformers builds a block-diagonal causal mask
  (``masking_utils.find_packed_sequence_indices``, only when no cache is in use) and packed samples
  never attend to each other.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from minicpm_data.errors import MinicpmError

IGNORE_INDEX = -100
CACHE_VERSION = 1


class DataError(MinicpmError):
    """The training data cannot be used (invalid records, nothing left to train on)."""


@dataclass
class DataSummary:
    """What became of a data file on its way to the trainer."""

    path: str
    records: int
    used: int
    dropped_no_trained_tokens: int
    truncated: int
    tokens: int
    trained_tokens: int
    max_length: int
    from_cache: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SupervisedDataset:
    """Rendered samples as a map-style dataset of ``{"input_ids", "labels"}`` lists."""

    def __init__(self, input_ids: list[list[int]], labels: list[list[int]]):
        self.input_ids = input_ids
        self.labels = labels

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return {"input_ids": self.input_ids[index], "labels": self.labels[index]}

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]


# --- loading and caching ----------------------------------------------------------------------------


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything in a tokenizer that changes ids: vocabulary, normalisation, template."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(str(getattr(tokenizer, "chat_template", None)).encode())
    digest.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _renderer_fingerprint() -> str:
    from minicpm_data import render

    return hashlib.sha256(inspect.getsource(render).encode()).hexdigest()


def cache_key(path: Path, tokenizer, *, template: str, max_length: int, truncation: str, train_on: str = "all") -> str:
    parts = [str(CACHE_VERSION), _sha256_file(path), tokenizer_fingerprint(tokenizer), template,
             str(max_length), truncation, train_on, _renderer_fingerprint()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "minicpm-finetune" / "tokenized"


def _save_cache(target: Path, dataset: SupervisedDataset, summary: DataSummary) -> None:
    import numpy as np

    target.parent.mkdir(parents=True, exist_ok=True)
    offsets = np.cumsum([0] + dataset.lengths, dtype=np.int64)
    flat_ids = np.fromiter((t for ids in dataset.input_ids for t in ids), dtype=np.int64, count=int(offsets[-1]))
    flat_labels = np.fromiter((t for ls in dataset.labels for t in ls), dtype=np.int64, count=int(offsets[-1]))
    partial = target.with_name(target.name + f".{os.getpid()}.tmp.npz")
    np.savez(partial, input_ids=flat_ids, labels=flat_labels, offsets=offsets,
             summary=np.array(json.dumps(summary.to_dict())))
    partial.replace(target)  # atomic: a reader never sees half a cache file


def _load_cache(target: Path) -> tuple[SupervisedDataset, DataSummary]:
    import numpy as np

    with np.load(target) as data:
        offsets = data["offsets"].tolist()
        ids, labels = data["input_ids"].tolist(), data["labels"].tolist()
        summary = DataSummary(**json.loads(str(data["summary"])))
    spans = list(zip(offsets[:-1], offsets[1:]))
    summary.from_cache = True
    return SupervisedDataset([ids[a:b] for a, b in spans], [labels[a:b] for a, b in spans]), summary


def load_supervised(path: str | Path, tokenizer, *, template: str | None = None, max_length: int,
                    truncation: str = "right", train_on: str = "all",
                    cache_dir: str | Path | None = None) -> tuple[SupervisedDataset, DataSummary]:
    """Validate, render (or read the cache) and filter one data file."""
    from minicpm_data.render import detect_template, render_many

    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    template = template or detect_template(tokenizer)
    target = Path(cache_dir or default_cache_dir()) / (
        cache_key(path, tokenizer, template=template, max_length=max_length, truncation=truncation,
                  train_on=train_on) + ".npz")
    if target.is_file():
        return _load_cache(target)

    from minicpm_data.io import read_conversations
    from minicpm_data.validate import require_valid

    require_valid(path)

    conversations = [conversation for _, conversation in read_conversations(path)]
    samples = render_many(conversations, tokenizer, template=template, max_length=max_length, truncation=truncation,
                          train_on=train_on)
    kept = [s for s in samples if s.trainable]
    dataset = SupervisedDataset([list(s.input_ids) for s in kept], [list(s.labels) for s in kept])
    summary = DataSummary(
        path=str(path), records=len(samples), used=len(kept), dropped_no_trained_tokens=len(samples) - len(kept),
        truncated=sum(1 for s in samples if s.truncated), tokens=sum(dataset.lengths),
        trained_tokens=sum(sum(1 for t in ls if t != IGNORE_INDEX) for ls in dataset.labels),
        max_length=max_length)
    if not kept:
        raise DataError(f"{path}: none of {len(samples)} samples has a trained token left at model_max_length "
                        f"{max_length}; raise --model_max_length (see: minicpm-data stats {path})")
    _save_cache(target, dataset, summary)
    return dataset, summary


# --- batching -----------------------------------------------------------------------------------------


def _pad_right(features: list[dict[str, list[int]]], key: str, value: int, longest: int):
    """One field of a batch as a ``(batch, longest)`` tensor, right-padded with ``value``."""
    import torch

    rows = [feature[key] + [value] * (longest - len(feature[key])) for feature in features]
    return torch.tensor(rows, dtype=torch.long)


@dataclass
class PaddingCollator:
    """Pads a batch to its longest sample (right side): pad id in inputs, -100 in labels, 0 in the mask."""

    pad_token_id: int

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, Any]:
        longest = max(len(f["input_ids"]) for f in features)
        masks = [{"mask": [1] * len(f["input_ids"])} for f in features]
        return {"input_ids": _pad_right(features, "input_ids", self.pad_token_id, longest),
                "labels": _pad_right(features, "labels", IGNORE_INDEX, longest),
                "attention_mask": _pad_right(masks, "mask", 0, longest)}


def pack(dataset: SupervisedDataset, max_length: int) -> SupervisedDataset:
    """First-fit-decreasing packing of samples into rows of at most ``max_length`` tokens.

    Each row keeps its samples' boundaries in ``position_ids``; the first label of every sample is
    masked, since in a row it would be the target of the previous sample's last token.
    """
    order = sorted(range(len(dataset)), key=lambda i: -len(dataset.input_ids[i]))
    rows: list[list[int]] = []
    room: list[int] = []
    for index in order:
        length = len(dataset.input_ids[index])
        slot = next((r for r, free in enumerate(room) if free >= length), None)
        if slot is None:
            rows.append([index])
            room.append(max_length - length)
        else:
            rows[slot].append(index)
            room[slot] -= length
    return PackedDataset(dataset, rows)


class PackedDataset(SupervisedDataset):
    """Rows of packed samples: ``input_ids``, ``labels`` and per-sample ``position_ids``."""

    def __init__(self, source: SupervisedDataset, rows: list[list[int]]):
        ids, labels, positions = [], [], []
        for row in rows:
            ids.append([t for i in row for t in source.input_ids[i]])
            labels.append([t for i in row for t in [IGNORE_INDEX] + source.labels[i][1:]])
            positions.append([p for i in row for p in range(len(source.input_ids[i]))])
        super().__init__(ids, labels)
        self.position_ids = positions

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return {**super().__getitem__(index), "position_ids": self.position_ids[index]}


@dataclass
class PackingCollator:
    """Pads packed rows to the longest; padding becomes its own position run; no 2D mask, no cache."""

    pad_token_id: int

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, Any]:
        longest = max(len(f["input_ids"]) for f in features)
        positions = [{"position_ids": f["position_ids"] + list(range(longest - len(f["position_ids"])))}
                     for f in features]
        # use_cache=False: with a cache, transformers skips packed-sequence detection (samples would mix).
        return {"input_ids": _pad_right(features, "input_ids", self.pad_token_id, longest),
                "labels": _pad_right(features, "labels", IGNORE_INDEX, longest),
                "position_ids": _pad_right(positions, "position_ids", 0, longest), "use_cache": False}
