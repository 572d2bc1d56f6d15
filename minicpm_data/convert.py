"""Convert raw files into MiniCPM's messages format, losing nothing.

Every input record ends either in the output or in the rejects file (JSON Lines: source file,
index, line, reason, detail and the original record), so ``read == written + rejected``.
Outputs are written atomically; an interrupted run leaves no partial file.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from minicpm_data.errors import FormatError, InputError
from minicpm_data.io import (REJECTS_NAME, TABLE_SUFFIXES, check_target, iter_raw_records, json_lines, output_format,
                              parse_line, record_writer, require_file, serialize, table_columns)
from minicpm_data.media import MEDIA_KEY_NAMES, MEDIA_POLICIES, MEDIA_REASONS, media_keys, parts_as_placeholders
from minicpm_data.repair import FINISHERS, REASONING_POLICIES, TOOL_POLICIES
from minicpm_data.sources import (DETECT_SAMPLE, FORMATS, RecordRejected, Source, check_preference_keys, detect_format,
                                  make_source)
from minicpm_data.sources.base import PREFERENCE_KEYS


@dataclass(frozen=True)
class ConvertOptions:
    """How records are read and turned into conversations (the CLI's convert flags)."""

    source: str = "auto"
    encoding: str | None = None
    user_col: str | None = None
    assistant_col: str | None = None
    system_col: str | None = None
    template: str | None = None
    system: str | None = None
    tool_turns: str = "reject"
    reasoning: str = "reject"
    media: str = "reject"  # images, audio, video: reject the record, or drop them and keep the text
    repair: bool = True
    dedupe: bool = False
    workers: int = 1  # worker processes for JSON Lines input (1: convert in this process)

    def table_options(self) -> dict[str, str | None]:
        return {"user_col": self.user_col, "assistant_col": self.assistant_col,
                "system_col": self.system_col, "template": self.template}

    @property
    def maps_keys(self) -> bool:
        """Whether a column/key mapping is given (it applies to tables and JSON records alike)."""
        return any(self.table_options().values())


@dataclass
class FileSummary:
    path: str
    format: str | None = None
    detected: bool = False
    read: int = 0
    written: int = 0
    rejected: int = 0
    rejects: Counter = field(default_factory=Counter)  # by reason
    auto_format: str | None = None  # what auto detects for the file, when --from named another format

    def from_hint(self) -> str | None:
        """What to do when ``--from`` named a format whose fields the file's records lack, and auto detects another."""
        missing = self.rejects["missing field"]
        if not (missing and self.auto_format):
            return None
        return (f"{self.path}: {missing} of {self.read} records lack a field --from {self.format} needs; auto detects "
                f"{self.auto_format} for this file: try --from {self.auto_format}, or leave --from out")


@dataclass
class ConvertSummary:
    """Counts for a run: ``read == written + rejected``, per file, with repairs and rejects by kind.

    ``output`` is ``None`` when no record was written: then no output file is written either; ``rejects_path``
    likewise when no record was rejected."""

    output: str | None
    rejects_path: str | None
    files: list[FileSummary] = field(default_factory=list)
    repairs: Counter = field(default_factory=Counter)
    rejects: Counter = field(default_factory=Counter)
    splits: dict[str, dict[str, Any]] = field(default_factory=dict)
    kind: str | None = None  # what the output holds: "messages", "pairs" or "kto" (minicpm_data.validate.KINDS)

    @property
    def read(self) -> int:
        return sum(f.read for f in self.files)

    @property
    def written(self) -> int:
        return sum(f.written for f in self.files)

    @property
    def rejected(self) -> int:
        return sum(f.rejected for f in self.files)

    def to_dict(self) -> dict[str, Any]:
        return {"output": self.output, "rejects_file": self.rejects_path,
                "read": self.read, "written": self.written, "rejected": self.rejected,
                "files": [vars(f) for f in self.files],
                "repairs": dict(self.repairs.most_common()), "rejects": dict(self.rejects.most_common()),
                **({"splits": self.splits} if self.splits else {}), "kind": self.kind}


def default_rejects_path(output: Path) -> Path:
    """``data.json`` -> ``data.rejects.jsonl`` beside it."""
    return output.with_name(f"{output.stem}.{REJECTS_NAME}")


def _check_paths(inputs: Sequence[Path], outputs: Sequence[Path], rejects: Path) -> None:
    """Refuse, before anything is written, missing inputs and outputs that would overwrite an input."""
    for path in inputs:
        require_file(path)
    resolved = {path.resolve() for path in inputs}
    for target, what in [*((output, "output") for output in outputs), (rejects, "rejects file")]:
        if target.resolve() in resolved:
            raise InputError(f"{target}: the {what} is also an input; choose another path")
        check_target(target)
    for output in outputs:
        if output.resolve() == rejects.resolve():
            raise InputError(f"{output}: the output and the rejects file are the same path")


def _check_options(options: ConvertOptions) -> None:
    if options.source not in FORMATS:
        raise InputError(f"unknown format {options.source!r}; choose one of {', '.join(FORMATS)}")
    if options.maps_keys and options.source not in ("auto", "csv"):
        raise InputError(f"--user-col, --assistant-col, --system-col and --template map a table's columns or a JSON "
                         f"record's keys; they do not apply to --from {options.source}")
    if options.workers < 1:
        raise InputError(f"--workers must be 1 or more, got {options.workers}")
    if options.tool_turns not in TOOL_POLICIES:
        raise InputError(f"unknown tool policy {options.tool_turns!r}; choose one of {', '.join(TOOL_POLICIES)}")
    if options.reasoning not in REASONING_POLICIES:
        raise InputError(f"unknown reasoning policy {options.reasoning!r}; choose one of {', '.join(REASONING_POLICIES)}")
    if options.media not in MEDIA_POLICIES:
        raise InputError(f"unknown media policy {options.media!r}; choose one of {', '.join(MEDIA_POLICIES)}")


def convert_files(inputs: Sequence[str | Path], output: str | Path, *, options: ConvertOptions = ConvertOptions(),
                  fmt: str | None = None, rejects_path: str | Path | None = None,
                  progress: Callable[[FileSummary], None] | None = None) -> ConvertSummary:
    """Convert every record of ``inputs`` into ``output``; rejected records go to ``rejects_path``.

    When no record is written (all rejected, or none read) there is no output file (an earlier run's stays as it
    was); when none is rejected there is no rejects file (an earlier run's is removed when this run writes an
    output: it would tell of records this output holds).

    ``progress`` is called with the file's counts when its format is known (``read == 0``: e.g. to say
    what auto detected) and then every :data:`PROGRESS_EVERY` records.
    """
    _check_options(options)
    inputs = [Path(p) for p in inputs]
    output = Path(output)
    fmt = output_format(output, fmt)
    rejects = Path(rejects_path) if rejects_path else default_rejects_path(output)
    _check_paths(inputs, [output], rejects)
    summary = ConvertSummary(str(output), str(rejects))
    with (record_writer(output, fmt, skip_empty=True) as out,
          record_writer(rejects, "jsonl", skip_empty=True) as rejected):
        sink = _Sink(summary, out, rejected, dedupe=options.dedupe, progress=progress)
        for path in inputs:
            file_summary = FileSummary(str(path))
            summary.files.append(file_summary)
            _convert_file(path, options, file_summary, sink, progress)
    if not out.count:
        summary.output = None
    if not rejected.count:
        summary.rejects_path = None
        if out.count:  # an earlier run's rejects would tell of records this output holds
            rejects.unlink(missing_ok=True)
    return summary


PROGRESS_EVERY = 10_000


# What became of one record: (serialized conversation or None, repairs applied, reject reason, detail).
# A plain tuple: cheaper to build, and a quarter of a NamedTuple's cost to pickle back from a worker.
Outcome = tuple[bytes | None, list[str], str, str]


class RecordProcessor:
    """Record -> :class:`Outcome` for one file; picklable, so worker processes can run it."""

    def __init__(self, source: Source, options: ConvertOptions, path: Path):
        self.path = path
        self._source = source
        self._convert = source.convert
        self._drop_media = options.media == "drop"
        self._sft = source.kind == "messages"
        self._finish = functools.partial(FINISHERS[source.kind], repair=options.repair, tool_turns=options.tool_turns,
                                         reasoning=options.reasoning, media=options.media, verbatim=source.verbatim,
                                         default_system=options.system)

    def __call__(self, record: Any) -> Outcome:
        try:
            if not isinstance(record, dict):
                raise RecordRejected("not an object", f"record is {type(record).__name__}")
            if self._sft and not record.keys().isdisjoint(PREFERENCE_KEYS):
                check_preference_keys(self._source, record)
            try:
                conversation = self._convert(record)
            except RecordRejected as rejection:
                if not (self._drop_media and rejection.reason in MEDIA_REASONS):
                    raise
                # Media parts: as placeholders, which the media policy then drops like any other.
                conversation = self._convert(parts_as_placeholders(record))
            keys = None if record.keys().isdisjoint(MEDIA_KEY_NAMES) else media_keys(record)  # the common case inline
            finished, applied = self._finish(conversation, media_keys=keys) if keys else self._finish(conversation)
        except RecordRejected as rejection:
            return None, [], rejection.reason, rejection.detail
        return serialize(finished), applied, "", ""

    def process_lines(self, batch: list[tuple[int, int, bytes | str]]) -> list[Outcome]:
        return [self(parse_line(self.path, line, text)) for _, line, text in batch]


class _Sink:
    """Writes outcomes in input order: conversations to the output, rejects with their original record."""

    def __init__(self, summary: ConvertSummary, out, rejected, *, dedupe: bool,
                 progress: Callable[[FileSummary], None] | None):
        self.summary, self.out, self.rejected, self.progress = summary, out, rejected, progress
        self.seen: dict[bytes, str] | None = {} if dedupe else None

    def add(self, file: FileSummary, entries: Sequence[tuple[int, int | None, Any]], outcomes: Sequence[Outcome],
            original: Callable[[Any], Any]) -> None:
        """The outcomes of ``entries``, ``(index, line, payload)`` each; ``original(payload)`` is the record."""
        written: list[bytes] = []
        repairs: list[str] = []
        for (index, line, payload), (data, applied, reason, detail) in zip(entries, outcomes):
            file.read += 1
            if self.progress and file.read % PROGRESS_EVERY == 0:
                self.progress(file)
            if data is not None and self.seen is not None:
                here = f"{file.path} record {index}"
                first = self.seen.setdefault(hashlib.blake2b(data, digest_size=16).digest(), here)
                if first != here:
                    data, reason, detail = None, "duplicate", f"same as {first}"
            if data is None:
                file.rejected += 1
                file.rejects[reason] += 1
                self.summary.rejects[reason] += 1
                self.rejected.write({"file": file.path, "index": index, "line": line, "reason": reason,
                                     "detail": detail, "record": original(payload)})
            else:
                file.written += 1
                repairs += applied
                written.append(data)
        self.summary.repairs.update(repairs)  # once per batch: Counter.update costs more than the counting
        self.out.write_serialized(written)


def _convert_file(path: Path, options: ConvertOptions, file_summary: FileSummary, sink: _Sink,
                  progress: Callable[[FileSummary], None] | None) -> None:
    records = iter_raw_records(path, encoding=options.encoding)
    head = list(itertools.islice(records, DETECT_SAMPLE))
    name = options.source
    if name == "auto" and options.maps_keys:
        name = "csv"
    if name == "auto" and head:
        name = detect_format([r.data for r in head], str(path))
        file_summary.detected = True
    elif name != "csv" and head:
        file_summary.auto_format = _other_format([r.data for r in head], name)
    file_summary.format = None if name == "auto" else name
    if progress:
        progress(file_summary)
    if name == "auto":  # no records to detect from
        return
    source = make_source(name, **options.table_options())
    _check_kind(sink.summary, source, path)
    if path.suffix.lower() in TABLE_SUFFIXES and (columns := table_columns(path, encoding=options.encoding)):
        source.check_columns(columns, str(path))  # also for a header without rows
    elif head:  # JSON records: the keys the sampled records have, like a table's header
        source.check_columns(list(dict.fromkeys(k for r in head if isinstance(r.data, Mapping) for k in r.data)),
                             str(path), what="key")
    if not head:
        return
    process = RecordProcessor(source, options, path)
    lines = json_lines(path, encoding=options.encoding)
    if lines is None:
        for raw in itertools.chain(head, records):
            sink.add(file_summary, [raw], [process(raw.data)], _same)
        return
    records.close()  # JSON Lines are parsed in batches where they are processed, the sampled head included
    if options.workers > 1:
        batches = _in_workers(process, lines, options.workers)
    else:
        batches = ((batch, process.process_lines(batch)) for batch in _batches(lines, _LOCAL_BATCH_BYTES))
    for batch, outcomes in batches:
        sink.add(file_summary, batch, outcomes, orjson.loads)


def _other_format(records: list[Any], chosen: str) -> str | None:
    """The format auto detects for ``records`` when it is not ``chosen``; None when it is, or detection fails."""
    try:
        detected = detect_format(records, "")
    except FormatError:
        return None
    return None if detected == chosen else detected


def _check_kind(summary: ConvertSummary, source: Source, path: Path) -> None:
    """One output holds one kind of record: SFT conversations, preference pairs or KTO rows."""
    if summary.kind is None:
        summary.kind = source.kind
    elif source.kind != summary.kind:
        from minicpm_data.validate import KIND_NAMES

        raise FormatError(f"{path}: its {source.name} records become {KIND_NAMES[source.kind]}, the inputs before it "
                          f"{KIND_NAMES[summary.kind]}: one output holds one kind; convert them separately")


def _same(record: Any) -> Any:
    return record


_BATCH_BYTES = 1 << 20  # sent to a worker at once
_LOCAL_BATCH_BYTES = 1 << 16  # processed in this process at once: small enough to stay in the CPU's caches


def _process_batch(process: RecordProcessor, batch: list[tuple[int, int, bytes | str]]) -> list[Outcome]:
    return process.process_lines(batch)


def _in_workers(process: RecordProcessor, lines: Iterator[tuple[int, int, bytes | str]],
                workers: int) -> Iterator[tuple[list, list[Outcome]]]:
    """Batches of lines and their outcomes, in input order; at most ``2 * workers`` batches in flight,
    so memory stays flat however large the file."""
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers) as pool:
        pending: deque = deque()
        for batch in _batches(lines, _BATCH_BYTES):
            pending.append((batch, pool.submit(_process_batch, process, batch)))
            if len(pending) >= 2 * workers:
                batch, future = pending.popleft()
                yield batch, future.result()
        while pending:
            batch, future = pending.popleft()
            yield batch, future.result()


def _batches(lines: Iterator[tuple[int, int, bytes | str]], limit: int) -> Iterator[list]:
    batch, size = [], 0
    for item in lines:
        batch.append(item)
        size += len(item[2])
        if size >= limit:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def convert_and_split(inputs: Sequence[str | Path], out_dir: str | Path, *, dev_ratio: float, seed: int = 42,
                      options: ConvertOptions = ConvertOptions(), fmt: str | None = None,
                      rejects_path: str | Path | None = None,
                      progress: Callable[[FileSummary], None] | None = None) -> ConvertSummary:
    """Convert into the folder ``out_dir`` as ``train.<fmt>`` and ``dev.<fmt>`` (default json);
    rejects go to ``out_dir/rejects.jsonl`` unless ``rejects_path`` is given. When no record is
    written there is no split (``output`` is ``None``), as in :func:`convert_files`."""
    from minicpm_data.split import dev_indices, split_file, split_paths

    out_dir = Path(out_dir)
    if out_dir.suffix.lower() in (".json", ".jsonl"):
        raise InputError(f"{out_dir}: with --dev-ratio, -o names a folder (it gets train.* and dev.*)")
    dev_indices(0, dev_ratio, seed)  # checks the ratio before any work
    fmt = output_format(f"x.{fmt or 'json'}")
    combined = out_dir / f".converted.{fmt}"
    rejects = Path(rejects_path) if rejects_path else out_dir / REJECTS_NAME
    _check_paths([Path(p) for p in inputs], [*split_paths(out_dir, fmt), combined], rejects)
    summary = convert_files(inputs, combined, options=options, fmt=fmt, rejects_path=rejects, progress=progress)
    if summary.output is None:
        return summary
    try:
        result = split_file(combined, out_dir, dev_ratio=dev_ratio, seed=seed, fmt=fmt)
    finally:
        combined.unlink(missing_ok=True)
    summary.output = str(out_dir)
    summary.splits = result.to_dict()
    return summary
