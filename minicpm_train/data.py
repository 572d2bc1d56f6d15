"""Training data: validated conversations rendered once by the one renderer into a memory-mapped cache.

- :func:`load_supervised` streams a data file in one pass that validates every record and renders the
  valid ones with ``minicpm_data.render.render_stream`` (the same ids, labels and truncation that
  ``minicpm-data stats`` shows), drops samples with no trained token left (counted), and writes the
  cache as it goes: token ids (the smallest integer type that holds the vocabulary), a one-byte
  trained-token mask (labels are the ids where trained, -100 elsewhere) and per-sample offsets, in a
  temporary folder renamed into place at the end, so a killed run leaves nothing a later run trusts.
  The key covers the file's content, the tokenizer, the template, the render options, ``model_max_length``
  and the cache format. A file lock makes one process render while the others (other ranks, other
  nodes on a shared filesystem) wait and then map the same files; the local main process goes first.
- :class:`SupervisedDataset` reads rows lazily from those arrays; lengths and the summary come from the
  offsets alone.
- :func:`load_data` takes ``a.json,b.jsonl``, folders and globs, with optional per-file weights
  (``a.json:2``: every sample of a.json twice per epoch; ``b.json:0.5``: a fixed random half).
- :class:`PaddingCollator` pads a batch to its longest sample, not to ``model_max_length``.
- :func:`pack` + :class:`PackingCollator`: several samples per row, first-fit decreasing in
  O(n log n); each sample's ``position_ids`` restart at 0 and there is no 2D attention mask, so
  transformers builds a block-diagonal causal mask (``masking_utils.find_packed_sequence_indices``,
  only when no cache is in use) and packed samples never attend to each other.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any

from minicpm_data.errors import MinicpmError
from minicpm_data.io import expand_data_path, only_rejects, rejects_note

if TYPE_CHECKING:
    import numpy as np

IGNORE_INDEX = -100
CACHE_FORMAT = 2  # the on-disk layout; part of the cache key, so another layout is never misread
LOCAL_MAIN_HEAD_START = 30.0  # seconds other local ranks leave the local main process to take the lock first
_WRITE_BATCH = 4096  # samples per write to the cache files
_PROGRESS_EVERY = 1024  # samples per progress report


class DataError(MinicpmError):
    """The training data cannot be used (invalid records, nothing left to train on)."""


class CacheDamaged(DataError):
    """A cache folder whose files no longer match its ``meta.json`` (truncated, emptied or removed after it was
    written); :func:`load_supervised` renders it again."""


@dataclass
class DataSummary:
    """What became of a data file (or of several, summed, with each in ``files``) on its way to the trainer."""

    path: str
    records: int
    used: int
    dropped_no_trained_tokens: int
    truncated: int
    tokens: int
    trained_tokens: int
    max_length: int
    from_cache: bool = False
    notes: list[str] = field(default_factory=list)  # what loading had to repair (a damaged cache rendered again)
    weight: float = 1.0  # how many times each used sample is seen per epoch
    epoch_samples: int = 0  # samples per epoch after weighting
    files: list[dict[str, Any]] = field(default_factory=list)
    kind: str = "messages"  # what a sample is: a conversation, a preference pair (both sides), a KTO row
    dropped: dict[str, int] = field(default_factory=dict)  # pairs: reason -> pairs not trained
    merged_boundary: int = 0  # pairs: trained from the shared prefix (an answer merged with the prompt's end)
    desirable: int | None = None  # KTO: rows labelled desirable among those used

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """The one-line report of the run's data section."""
        weighted = f", weight {self.weight:g} ({self.epoch_samples} per epoch)" if self.weight != 1 else ""
        if self.kind == "pairs":
            reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(self.dropped.items()))
            merged = (f", {self.merged_boundary} trained from an answer merged with the prompt's end"
                      if self.merged_boundary else "")
            used = (f"{self.used} pairs used, {sum(self.dropped.values())} dropped"
                    f"{f' ({reasons})' if reasons else ''}, {self.truncated} with a side truncated{merged}")
        else:
            labels = (f" ({self.desirable} desirable, {self.used - self.desirable} undesirable)"
                      if self.desirable is not None else "")
            used = (f"{self.used} samples used{labels}, {self.dropped_no_trained_tokens} dropped (no trained token "
                    f"left), {self.truncated} truncated")
        return (f"data {self.path}: {used}, {self.tokens} tokens ({self.trained_tokens} trained)"
                f"{weighted}{' [cached]' if self.from_cache else ''}")


@dataclass(frozen=True)
class RenderProgress:
    """Where rendering of one file stands: samples and tokens so far, ``total`` samples (estimated, or None)."""

    file: str
    samples: int
    tokens: int
    total: int | None
    finished: bool = False


Progress = Callable[[RenderProgress], None]


# --- datasets -----------------------------------------------------------------------------------------


def _row(index: int, length: int) -> int:
    """``index`` as a row number of a sequence of ``length`` rows (negative counts from the end)."""
    if not -length <= index < length:
        raise IndexError(index)
    return index % length


class SupervisedDataset:
    """Samples as flat token ids, a trained-token mask and ``len + 1`` offsets (numpy arrays, memory-mapped
    from the cache); a row becomes ``{"input_ids", "labels"}`` (int64 arrays) only when read."""

    def __init__(self, ids: "np.ndarray", trained: "np.ndarray", offsets: "np.ndarray"):
        self.ids, self.trained, self.offsets = ids, trained, offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> dict[str, Any]:
        import numpy as np

        index = _row(index, len(self))
        start, end = self.offsets[index], self.offsets[index + 1]
        ids = self.ids[start:end].astype(np.int64)
        return {"input_ids": ids, "labels": np.where(self.trained[start:end], ids, IGNORE_INDEX)}

    @property
    def lengths(self) -> "np.ndarray":
        import numpy as np

        return np.diff(self.offsets)

    @classmethod
    def from_samples(cls, input_ids: list[list[int]], labels: list[list[int]]) -> "SupervisedDataset":
        """An in-memory dataset of rendered samples (labels: the id where trained, -100 elsewhere)."""
        import numpy as np

        offsets = np.cumsum([0, *map(len, input_ids)], dtype=np.int64)
        flat_ids = np.fromiter(chain.from_iterable(input_ids), np.int64, int(offsets[-1]))
        flat_labels = np.fromiter(chain.from_iterable(labels), np.int64, int(offsets[-1]))
        return cls(flat_ids, flat_labels != IGNORE_INDEX, offsets)


class MixedDataset:
    """Rows of several datasets, picked by index: ``picks`` numbers the parts' rows one after another."""

    def __init__(self, parts: list, picks: "np.ndarray"):
        import numpy as np

        self.parts, self.picks = parts, picks
        self.starts = np.cumsum([0, *map(len, parts)], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.picks)

    def __getitem__(self, index: int) -> dict[str, Any]:
        import numpy as np

        row = int(self.picks[index])
        part = int(np.searchsorted(self.starts, row, side="right")) - 1
        return self.parts[part][row - int(self.starts[part])]

    @property
    def lengths(self) -> "np.ndarray":
        import numpy as np

        return np.concatenate([part.lengths for part in self.parts])[self.picks]


class PairDataset:
    """Preference pairs: the cache holds each pair's chosen side, then its rejected side. A row is
    ``chosen_input_ids`` / ``chosen_labels`` / ``rejected_input_ids`` / ``rejected_labels`` (+ ``ref_logps``:
    the reference's log-probabilities of both sides, once computed)."""

    def __init__(self, samples: SupervisedDataset, folder: Path | None = None):
        self.samples, self.folder = samples, folder
        self.reference: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.samples) // 2

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = _row(index, len(self))
        chosen, rejected = self.samples[2 * index], self.samples[2 * index + 1]
        row = {"chosen_input_ids": chosen["input_ids"], "chosen_labels": chosen["labels"],
               "rejected_input_ids": rejected["input_ids"], "rejected_labels": rejected["labels"]}
        if self.reference is not None:
            row["ref_logps"] = self.reference[index]
        return row

    @property
    def lengths(self) -> "np.ndarray":
        return self.samples.lengths.reshape(-1, 2).sum(axis=1)


class LabeledDataset:
    """KTO rows: ``input_ids`` / ``labels``, ``desirable``, and the mismatched sequence its KL term uses
    (``kl_input_ids`` / ``kl_labels``: this row's prompt with the previous row's answer, cut to ``max_length``)."""

    def __init__(self, samples: SupervisedDataset, desirable: "np.ndarray", max_length: int, folder: Path | None = None):
        self.samples, self.desirable, self.max_length, self.folder = samples, desirable, max_length, folder
        self.reference: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        import numpy as np

        index = _row(index, len(self))
        row, other = self.samples[index], self.samples[index - 1]
        prompt = _prompt_length(row["labels"])
        answer = _prompt_length(other["labels"])
        item = {"input_ids": row["input_ids"], "labels": row["labels"], "desirable": bool(self.desirable[index]),
                "kl_input_ids": np.concatenate([row["input_ids"][:prompt], other["input_ids"][answer:]])[:self.max_length],
                "kl_labels": np.concatenate([row["labels"][:prompt], other["labels"][answer:]])[:self.max_length]}
        if self.reference is not None:
            item["ref_logps"] = self.reference[index]
        return item

    @property
    def lengths(self) -> "np.ndarray":
        return self.samples.lengths


def _prompt_length(labels: "np.ndarray") -> int:
    """Tokens before the first trained one."""
    import numpy as np

    trained = np.flatnonzero(labels != IGNORE_INDEX)
    return int(trained[0]) if len(trained) else len(labels)


def preference_dataset(samples: SupervisedDataset, summary, folder: Path):
    """The dataset of a cache folder of pairs or KTO rows (``summary.kind``)."""
    import numpy as np

    if summary.kind == "pairs":
        return PairDataset(samples, folder)
    desirable = np.memmap(folder / "desirable.bin", dtype=bool, mode="r").view(np.ndarray)
    return LabeledDataset(samples, desirable, summary.max_length, folder)


# --- files, weights -----------------------------------------------------------------------------------


def data_files(spec: str) -> list[tuple[Path, float]]:
    """``(file, weight)`` for a ``--train_data_path`` / ``--eval_data_path`` value: comma-separated files,
    folders (their .json / .jsonl files) or globs, each with an optional ``:WEIGHT`` (default 1). Rejects files of
    ``minicpm-data convert`` are left out (:func:`left_out_rejects` names them)."""
    files = []
    for name, weight, matches, _ in _expanded(spec):
        if not all(match.is_file() for match in matches):
            raise DataError(f"data file not found: {name}")
        files += [(match, weight) for match in matches]
    if not files:
        skipped = left_out_rejects(spec)
        raise only_rejects(skipped) if skipped else DataError(f"no data file named in {spec!r}")
    return files


def left_out_rejects(spec: str) -> list[Path]:
    """The rejects files of ``minicpm-data convert`` that ``spec``'s names, folders or globs held: never data."""
    return [path for *_, rejects in _expanded(spec) for path in rejects]


def _expanded(spec: str) -> list[tuple[str, float, list[Path], list[Path]]]:
    """``(name, weight, files, rejects files)`` for each comma-separated item of ``spec``."""
    return [(name, weight, *expand_data_path(name))
            for name, weight in map(_split_weight, filter(None, (part.strip() for part in spec.split(","))))]


def _split_weight(item: str) -> tuple[str, float]:
    """``a.json:2`` -> ``("a.json", 2.0)``; a colon that is part of an existing path is left alone."""
    name, colon, weight = item.rpartition(":")
    if not colon or Path(item).exists():
        return item, 1.0
    try:
        value = float(weight)
    except ValueError:
        return item, 1.0
    if not value >= 0 or value == float("inf"):
        raise DataError(f"{item}: the weight after ':' must be a number >= 0")
    return name, value


def weighted_picks(size: int, weight: float, seed: int = 0) -> "np.ndarray":
    """Row indices for one epoch of a file of ``size`` samples: every row ``int(weight)`` times, plus a
    fixed (seeded) random share of the rows for the fraction, in file order."""
    import numpy as np

    whole = int(weight)
    extra = round((weight - whole) * size)
    sampled = np.sort(np.random.default_rng(seed).choice(size, extra, replace=False)) if extra else np.empty(0, np.int64)
    return np.concatenate([np.tile(np.arange(size, dtype=np.int64), whole), sampled.astype(np.int64)])


# --- loading ------------------------------------------------------------------------------------------


def load_data(spec: str, tokenizer, *, max_length: int, cache_dir: str | Path | None = None,
              **options: Any) -> tuple[list[tuple[Any, DataSummary]], DataSummary]:
    """Load every file of ``spec`` (see :func:`data_files`): per file its weighted dataset and summary,
    and the summary of them all (the single file's own when there is one). ``options``: as :func:`load_supervised`."""
    loaded = []
    skipped = left_out_rejects(spec)
    for path, weight in data_files(spec):
        dataset, summary = load_supervised(path, tokenizer, max_length=max_length, cache_dir=cache_dir, **options)
        if skipped and not loaded:  # said once, with the first file
            summary.notes.append(rejects_note(skipped))
        summary.weight = weight
        if weight != 1:
            dataset = MixedDataset([dataset], weighted_picks(len(dataset), weight))
        summary.epoch_samples = len(dataset)
        loaded.append((dataset, summary))
    if not any(len(dataset) for dataset, _ in loaded):
        raise DataError(f"{spec}: every weight is 0, which leaves no sample to use")
    if len(loaded) == 1:
        return loaded, loaded[0][1]
    summaries = [summary for _, summary in loaded]
    counted = ("records", "used", "dropped_no_trained_tokens", "truncated", "tokens", "trained_tokens", "epoch_samples",
               "merged_boundary")
    total = DataSummary(path=spec, max_length=max_length, from_cache=all(s.from_cache for s in summaries),
                        files=[s.to_dict() for s in summaries],
                        **{name: sum(getattr(s, name) for s in summaries) for name in counted})
    total.kind = summaries[0].kind
    total.dropped = dict(sum((Counter(s.dropped) for s in summaries), Counter()))
    if total.kind == "kto":
        total.desirable = sum(s.desirable or 0 for s in summaries)
    return loaded, total


def mix(loaded: list[tuple[Any, DataSummary]]):
    """One training set of :func:`load_data`'s files (each already weighted)."""
    import numpy as np

    if len(loaded) == 1:
        return loaded[0][0]
    parts = [dataset for dataset, _ in loaded]
    return MixedDataset(parts, np.arange(sum(map(len, parts)), dtype=np.int64))


def named_sets(loaded: list[tuple[Any, DataSummary]]) -> dict[str, Any]:
    """:func:`load_data`'s datasets by name (the file name without extension, made unique), for evaluation."""
    names: dict[str, Any] = {}
    for dataset, summary in loaded:
        stem = name = Path(summary.path).stem
        while name in names:
            name = f"{stem}_{len(names)}"
        names[name] = dataset
    return names


def load_supervised(path: str | Path, tokenizer, *, template: str | None = None, max_length: int,
                    truncation: str = "right", render_options: Mapping[str, Any] | None = None,
                    cache_dir: str | Path | None = None, local_main: bool = True,
                    on_progress: Progress | None = None, kind: str = "messages") -> tuple[SupervisedDataset, DataSummary]:
    """Validate and render one data file into the cache (or map the cache another process wrote).

    ``render_options``: further keyword options of the renderer (part of the cache key).
    ``kind``: what the file holds and the run trains on: "messages" (SFT), "pairs" (DPO) or "kto".
    ``local_main``: this is the node's local main process (it takes the lock first; others wait and map).
    ``on_progress``: called while rendering, after each batch.
    """
    from filelock import FileLock, Timeout

    from minicpm_data.render import detect_template

    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    template = template or detect_template(tokenizer)
    render_options = dict(render_options or {})
    folder = Path(cache_dir or default_cache_dir())
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / cache_key(path, tokenizer, template=template, max_length=max_length, truncation=truncation,
                                render_options=render_options, kind=kind)
    if target.is_dir():
        try:
            return _open_cache(target)
        except CacheDamaged:
            pass  # rendered again below, under the lock
    lock = FileLock(f"{target}.lock")
    if not local_main:  # let the local main process render (it shows the progress bar); map what it writes
        deadline = time.monotonic() + LOCAL_MAIN_HEAD_START
        while not target.is_dir() and time.monotonic() < deadline:
            try:
                lock.acquire(timeout=0)
            except Timeout:
                break  # someone renders: wait for them below
            lock.release()
            time.sleep(0.2)
    notes = []
    with lock:
        if target.is_dir():
            try:
                return _open_cache(target)
            except CacheDamaged as damage:
                notes.append(f"the tokenized cache of {path} in {target} was damaged ({damage}); rendered it again")
                target.rename(target.with_name(f"{target.name}.tmp-{uuid.uuid4().hex[:12]}"))  # removed below
        for stale in folder.glob(f"{target.name}.tmp-*"):  # left by a killed run, or damaged
            shutil.rmtree(stale, ignore_errors=True)
        _render_into(target, path, tokenizer, template=template, max_length=max_length, truncation=truncation,
                     render_options=render_options, on_progress=on_progress, kind=kind)
    dataset, summary = _open_cache(target)
    summary.from_cache, summary.notes = False, notes
    return dataset, summary


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's content, read once per version of the file (its size and modification time)."""
    stat = path.stat()
    return _sha256_file(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256_file(path: str, size: int, modified: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
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


def cache_key(path: Path, tokenizer, *, template: str, max_length: int, truncation: str,
              render_options: Mapping[str, Any] | None = None, kind: str = "messages") -> str:
    """The cache folder name of one file rendered one way."""
    parts = [f"format {CACHE_FORMAT}", file_sha256(path), tokenizer_fingerprint(tokenizer), template,
             str(max_length), truncation, json.dumps(dict(render_options or {}), sort_keys=True, default=str),
             _renderer_fingerprint()] + ([f"kind {kind}"] if kind != "messages" else [])
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "minicpm-finetune" / "tokenized"


def id_dtype(vocabulary_size: int) -> str:
    """The smallest unsigned integer type that holds every token id."""
    return "uint16" if vocabulary_size <= 1 << 16 else "uint32"


def count_records(path: Path) -> int | None:
    """How many records a target-format file holds, for a progress bar's ETA: its ``"messages"`` keys,
    counted in the bytes without parsing (a string value cannot hold the sequence unescaped); None
    when there is none to count (e.g. a UTF-16 file)."""
    count, tail, needle = 0, b"", b'"messages"'
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            chunk = tail + block
            count += chunk.count(needle)
            tail = chunk[-(len(needle) - 1):]
            count -= tail.count(needle)  # counted again with the next block
    return count or None


def _conversations(path: Path, problems: list, kind: str = "messages") -> Iterator:
    """The file's valid records (conversations, pairs or KTO rows, as ``kind`` says), validated as they
    stream; after the first problem, validation goes on (to report every problem) but nothing more is rendered."""
    from minicpm_data.conversation import RECORD_TYPES
    from minicpm_data.validate import valid_records

    record_type = RECORD_TYPES[kind]
    for raw in valid_records(path, problems, kind):
        if not problems:
            yield record_type.from_record(raw.data)


class _CacheWriter:
    """Appends rendered samples to the cache files of a folder, in batches; counts what it saw."""

    def __init__(self, folder: Path, dtype: str):
        self.folder, self.dtype = folder, dtype
        self.ids_file = (folder / "input_ids.bin").open("wb")
        self.trained_file = (folder / "trained.bin").open("wb")
        self.lengths_file = (folder / "lengths.bin").open("wb")
        self.pending: list = []
        self.records = self.used = self.truncated = self.tokens = self.trained_tokens = 0

    def add(self, sample) -> None:
        self.records += 1
        self.truncated += sample.truncated
        if sample.trainable:
            self.tokens += len(sample.input_ids)
            self.pending.append(sample)
            if len(self.pending) >= _WRITE_BATCH:
                self.flush()

    def flush(self) -> None:
        import numpy as np

        if not self.pending:
            return
        lengths = np.fromiter((len(s.input_ids) for s in self.pending), np.int64, len(self.pending))
        count = int(lengths.sum())
        ids = np.fromiter(chain.from_iterable(s.input_ids for s in self.pending), np.int64, count)
        labels = np.fromiter(chain.from_iterable(s.labels for s in self.pending), np.int64, count)
        trained = labels != IGNORE_INDEX
        if not np.array_equal(labels[trained], ids[trained]):
            raise DataError("the renderer gave labels that are not the input ids: the trained-token mask cannot hold them")
        ids.astype(self.dtype).tofile(self.ids_file)
        trained.tofile(self.trained_file)
        lengths.tofile(self.lengths_file)
        self.used += len(self.pending)
        self.trained_tokens += int(trained.sum())
        self.pending.clear()

    def close(self) -> None:
        for handle in (self.ids_file, self.trained_file, self.lengths_file):
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()

    def summary(self, path: Path, max_length: int) -> DataSummary:
        return DataSummary(path=str(path), records=self.records, used=self.used,
                           dropped_no_trained_tokens=self.records - self.used, truncated=self.truncated,
                           tokens=self.tokens, trained_tokens=self.trained_tokens, max_length=max_length)


class _PairWriter(_CacheWriter):
    """Writes each trainable pair as two samples, chosen then rejected; counts pairs, dropped ones by reason, and
    trained ones whose answer merged with the prompt's end."""

    def __init__(self, folder: Path, dtype: str):
        super().__init__(folder, dtype)
        self.dropped: Counter = Counter()
        self.merged_boundary = 0

    def add(self, pair) -> None:
        if pair.problem is not None:
            self.records += 1
            self.dropped[pair.problem] += 1
            return
        self.truncated -= pair.chosen.truncated and pair.rejected.truncated  # a pair counts once
        self.merged_boundary += pair.merged_boundary
        for side in (pair.chosen, pair.rejected):
            super().add(side)
        self.records -= 1

    def summary(self, path: Path, max_length: int) -> DataSummary:
        return DataSummary(path=str(path), records=self.records, used=self.used // 2, dropped_no_trained_tokens=0,
                           truncated=self.truncated, tokens=self.tokens, trained_tokens=self.trained_tokens,
                           max_length=max_length, kind="pairs", dropped=dict(self.dropped),
                           merged_boundary=self.merged_boundary)


class _LabeledWriter(_CacheWriter):
    """Also writes each used sample's label (KTO: desirable or not) to ``desirable.bin``."""

    def __init__(self, folder: Path, dtype: str):
        super().__init__(folder, dtype)
        self.flags_file = (folder / "desirable.bin").open("wb")
        self.flags: list[bool] = []
        self.desirable = 0

    def add(self, sample_and_label) -> None:
        sample, label = sample_and_label
        if sample.trainable:
            self.flags.append(label)
        super().add(sample)

    def flush(self) -> None:
        import numpy as np

        np.asarray(self.flags, dtype=bool).tofile(self.flags_file)
        self.desirable += sum(self.flags)
        self.flags.clear()
        super().flush()

    def close(self) -> None:
        self.flags_file.close()
        super().close()

    def summary(self, path: Path, max_length: int) -> DataSummary:
        summary = super().summary(path, max_length)
        summary.kind, summary.desirable = "kto", self.desirable
        return summary


def _render_stream(kind: str, path: Path, problems: list, tokenizer, **options) -> Iterator:
    """What the writer of ``kind`` takes, in file order: rendered samples, pairs, or (sample, label)."""
    from collections import deque

    from minicpm_data.render import render_pairs, render_stream

    records = _conversations(path, problems, kind)
    if kind == "pairs":
        options.pop("train_on", None)
        return render_pairs(records, tokenizer, **options)
    if kind == "messages":
        return render_stream(records, tokenizer, **options)
    labels: deque = deque()  # the renderer reads ahead in batches; labels come out in the same order

    def remembered():
        for row in records:
            labels.append(row.label)
            yield row

    return ((sample, labels.popleft()) for sample in render_stream(remembered(), tokenizer, **{**options, "train_on": "last"}))


_WRITERS = {"messages": _CacheWriter, "pairs": _PairWriter, "kto": _LabeledWriter}


def _render_into(target: Path, path: Path, tokenizer, *, template: str, max_length: int, truncation: str,
                 render_options: dict[str, Any], on_progress: Progress | None, kind: str = "messages") -> None:
    """Render ``path`` into a temporary folder beside ``target`` and rename it into place when complete."""
    from minicpm_data.render import gc_paused
    from minicpm_data.validate import raise_for_problems

    partial = target.with_name(f"{target.name}.tmp-{uuid.uuid4().hex[:12]}")
    partial.mkdir()
    try:
        writer = _WRITERS[kind](partial, id_dtype(len(tokenizer)))
        problems: list = []
        total = count_records(path) if on_progress else None
        with gc_paused():
            for sample in _render_stream(kind, path, problems, tokenizer, template=template, max_length=max_length,
                                         truncation=truncation, **render_options):
                writer.add(sample)
                if on_progress is not None and writer.records % _PROGRESS_EVERY == 0:
                    on_progress(RenderProgress(str(path), writer.records, writer.tokens, total))
            writer.flush()
        writer.close()
        if on_progress is not None:
            on_progress(RenderProgress(str(path), writer.records, writer.tokens, writer.records, finished=True))
        raise_for_problems(path, problems)
        summary = writer.summary(path, max_length)
        if not writer.used and summary.dropped:
            reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(summary.dropped.items()))
            raise DataError(f"{path}: none of {writer.records} pairs can be trained ({reasons}); see: "
                            f"minicpm-data stats {path}")
        if not writer.used:
            raise DataError(f"{path}: none of {writer.records} samples has a trained token left at model_max_length "
                            f"{max_length}; raise --model_max_length (see: minicpm-data stats {path})")
        meta = {"format": CACHE_FORMAT, "dtype": writer.dtype, "summary": summary.to_dict()}
        with (partial / "meta.json").open("w") as handle:  # written last: the marker of a complete cache
            handle.write(json.dumps(meta, indent=1) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        try:
            partial.rename(target)  # atomic: a reader sees the whole cache or none
        except OSError:
            if not target.is_dir():
                raise
            shutil.rmtree(partial)  # another process (without the lock, e.g. on another filesystem) won
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _open_cache(target: Path) -> tuple[SupervisedDataset, DataSummary]:
    """Map a complete cache folder: nothing is read into memory beyond the offsets.

    ``meta.json`` is written last, so it marks a complete cache; the files' sizes are checked against the counts
    it holds, and the lengths against the token count, before anything is mapped (:class:`CacheDamaged` if not).
    """
    import numpy as np

    try:
        meta = json.loads((target / "meta.json").read_text())
        summary = DataSummary(**meta["summary"])
        itemsize = np.dtype(meta["dtype"]).itemsize
    except FileNotFoundError:
        raise CacheDamaged("meta.json, written last when the cache is complete, is missing") from None
    except (ValueError, KeyError, TypeError) as error:
        raise CacheDamaged(f"meta.json is unreadable: {error}") from None
    rows = summary.used * (2 if summary.kind == "pairs" else 1)  # a pair is two rows, chosen then rejected
    sizes = [("input_ids.bin", summary.tokens * itemsize), ("trained.bin", summary.tokens), ("lengths.bin", rows * 8)]
    if summary.kind == "kto":
        sizes.append(("desirable.bin", summary.used))
    for name, size in sizes:
        held = (target / name).stat().st_size if (target / name).is_file() else None
        if held != size:
            raise CacheDamaged(f"{name} is {'missing' if held is None else f'{held:,} bytes'}, {size:,} expected")
    summary.from_cache = True

    def mapped(name: str, dtype: str) -> "np.ndarray":
        return np.memmap(target / name, dtype=dtype, mode="r").view(np.ndarray)

    offsets = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(mapped("lengths.bin", "int64"), out=offsets[1:])
    if offsets[-1] != summary.tokens:
        raise CacheDamaged(f"lengths.bin adds up to {int(offsets[-1]):,} tokens, {summary.tokens:,} expected")
    dataset = SupervisedDataset(mapped("input_ids.bin", meta["dtype"]), mapped("trained.bin", "bool"), offsets)
    if summary.kind != "messages":
        dataset = preference_dataset(dataset, summary, target)
    return dataset, summary


# --- batching -----------------------------------------------------------------------------------------


@functools.cache
def trainer_class() -> type:
    """transformers' ``Trainer``, with length grouping that takes sample lengths from the datasets' offsets
    (its own reads every row once, which costs seconds at millions of samples), and checkpoints marked complete
    only once every rank has written its part."""
    from transformers import Trainer
    from transformers.trainer_pt_utils import LengthGroupedSampler

    class MappedDataTrainer(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            dataset = self.train_dataset if train_dataset is None else train_dataset
            if self.args.train_sampling_strategy != "group_by_length" or not hasattr(dataset, "lengths"):
                return super()._get_train_sampler(train_dataset)
            return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                        lengths=dataset.lengths.tolist())

        def _save_rng_state(self, output_dir):
            # Each rank's RNG state is its last file of a checkpoint; rank 0 writes trainer_state.json (what makes a
            # checkpoint complete) right after its own: wait for every rank, so a node lost mid-save leaves an
            # incomplete checkpoint rather than one that resumes without its RNG states.
            super()._save_rng_state(output_dir)
            if self.args.world_size > 1:
                self.accelerator.wait_for_everyone()

    return MappedDataTrainer


def _pad_right(rows: list, value: int, longest: int):
    """Rows (int arrays or lists) as a ``(batch, longest)`` long tensor, right-padded with ``value``."""
    import torch

    batch = torch.full((len(rows), longest), value, dtype=torch.long)
    for index, row in enumerate(rows):
        batch[index, :len(row)] = torch.as_tensor(row)
    return batch


@dataclass
class PaddingCollator:
    """Pads a batch to its longest sample (right side): pad id in inputs, -100 in labels, 0 in the mask."""

    pad_token_id: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        longest = max(len(f["input_ids"]) for f in features)
        return {"input_ids": _pad_right([f["input_ids"] for f in features], self.pad_token_id, longest),
                "labels": _pad_right([f["labels"] for f in features], IGNORE_INDEX, longest),
                "attention_mask": _pad_right([[1] * len(f["input_ids"]) for f in features], 0, longest)}


def first_fit_decreasing(lengths: "np.ndarray", capacity: int) -> tuple["np.ndarray", "np.ndarray"]:
    """Rows of at most ``capacity`` tokens, filled first-fit in order of decreasing length (ties: index order).

    Returns ``(order, row_sizes)``: sample indices row after row, and how many samples each row holds; the
    same rows as placing samples one by one into the first row with room. Samples of one length are placed
    together (numpy over the rows that still have room), so the cost is the O(n log n) sort plus
    O(rows) vector work per distinct length, never a Python step per sample.
    """
    import numpy as np

    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and lengths.max() > capacity:
        raise DataError(f"a sample of {int(lengths.max())} tokens cannot be packed into rows of {capacity}")
    order = np.argsort(-lengths, kind="stable")
    ordered = lengths[order]
    room = np.zeros(len(lengths), dtype=np.int64)  # per row; at most one row per sample
    row_of = np.empty(len(lengths), dtype=np.int64)  # the row of each sample in ``order``
    rows = 0
    open_rows = np.empty(0, dtype=np.int64)  # rows whose room still fits the shortest sample, in order
    shortest = int(ordered[-1]) if len(ordered) else 0
    run_starts = np.flatnonzero(np.diff(ordered, prepend=-1, append=-1))
    for start, stop in zip(run_starts[:-1], run_starts[1:]):
        length, count = int(ordered[start]), int(stop - start)
        fits = open_rows[room[open_rows] >= length]
        takes = room[fits] // length
        filled = np.cumsum(takes)
        last = int(np.searchsorted(filled, count))  # the row where this run's samples run out
        if last < len(fits):
            targets, counts = fits[:last + 1], takes[:last + 1].copy()
            counts[-1] = count - (filled[last - 1] if last else 0)
        else:
            rest = count - (int(filled[-1]) if len(filled) else 0)
            per_row = capacity // length
            new = -(-rest // per_row)
            new_rows = np.arange(rows, rows + new)
            room[new_rows] = capacity
            rows += new
            open_rows = np.concatenate([open_rows, new_rows])
            targets = np.concatenate([fits, new_rows])
            counts = np.concatenate([takes, np.full(new, per_row, dtype=np.int64)])
            counts[-1] = rest - per_row * (new - 1)
        row_of[start:stop] = np.repeat(targets, counts)
        room[targets] -= counts * length
        open_rows = open_rows[room[open_rows] >= shortest]
    return order[np.argsort(row_of, kind="stable")], np.bincount(row_of, minlength=rows)


def pack(dataset, max_length: int) -> "PackedDataset":
    """Samples packed into rows of at most ``max_length`` tokens (:func:`first_fit_decreasing`).

    Each row keeps its samples' boundaries in ``position_ids``; the first label of every sample is
    masked, since in a row it would be the target of the previous sample's last token.
    """
    import numpy as np

    order, row_sizes = first_fit_decreasing(dataset.lengths, max_length)
    row_starts = np.zeros(len(row_sizes) + 1, dtype=np.int64)
    np.cumsum(row_sizes, out=row_starts[1:])
    return PackedDataset(dataset, order, row_starts)


class PackedDataset:
    """Rows of packed samples, built when read: ``input_ids``, ``labels`` and per-sample ``position_ids``."""

    def __init__(self, source, order: "np.ndarray", row_starts: "np.ndarray"):
        self.source, self.order, self.row_starts = source, order, row_starts

    def __len__(self) -> int:
        return len(self.row_starts) - 1

    def __getitem__(self, index: int) -> dict[str, Any]:
        import numpy as np

        index = _row(index, len(self))
        samples = [self.source[int(i)] for i in self.order[self.row_starts[index]:self.row_starts[index + 1]]]
        labels = [sample["labels"].copy() for sample in samples]
        for row in labels:
            row[0] = IGNORE_INDEX
        return {"input_ids": np.concatenate([s["input_ids"] for s in samples]), "labels": np.concatenate(labels),
                "position_ids": np.concatenate([np.arange(len(s["input_ids"])) for s in samples])}


@dataclass
class PackingCollator:
    """Pads packed rows to the longest; padding becomes its own position run; no 2D mask, no cache."""

    pad_token_id: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import numpy as np

        longest = max(len(f["input_ids"]) for f in features)
        positions = [np.concatenate([f["position_ids"], np.arange(longest - len(f["position_ids"]))]) for f in features]
        # use_cache=False: with a cache, transformers skips packed-sequence detection (samples would mix).
        return {"input_ids": _pad_right([f["input_ids"] for f in features], self.pad_token_id, longest),
                "labels": _pad_right([f["labels"] for f in features], IGNORE_INDEX, longest),
                "position_ids": _pad_right(positions, 0, longest), "use_cache": False}
