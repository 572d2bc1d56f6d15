"""Reading raw and target-format files, and writing outputs atomically.

Raw inputs: ``.json`` (a list, a single object, or JSON Lines under a .json name), ``.jsonl``,
``.csv``, ``.tsv`` and ``.parquet``. Text encodings: UTF-8, UTF-8 with BOM, UTF-16 with BOM and
GBK/GB18030, detected from the bytes or forced with ``encoding=``. JSON Lines are streamed line by
line, so memory does not grow with the file; a JSON list is parsed whole (orjson).

Outputs are written to a temporary file beside the target and renamed into place, so an
interrupted run never leaves a partial file.
"""

from __future__ import annotations

import codecs
import csv
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson

from minicpm_data.conversation import Conversation
from minicpm_data.errors import InputError

RAW_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".parquet")
OUTPUT_FORMATS = ("json", "jsonl")
_SNIFF_BYTES = 1 << 16
_WRITE_BUFFER = 1 << 20  # records are a few KB each: fewer, larger writes
# Tried in this order when no encoding is given (a BOM decides first).
_FALLBACK_ENCODINGS = ("utf-8", "gb18030")


@dataclass(frozen=True, slots=True)
class RawRecord:
    """One input record: its 0-based ``index`` in the file, its 1-based ``line`` where the format
    has lines (JSON Lines, CSV: the row's first line), and the parsed ``data``."""

    index: int
    line: int | None
    data: Any


class RecordParseError(InputError):
    """A file's bytes or syntax are broken at a known line."""

    def __init__(self, path: Path, line: int, detail: str):
        super().__init__(f"{path}:{line}: {detail}")
        self.path, self.line, self.detail = path, line, detail

    def __reduce__(self):  # crosses process boundaries in parallel conversion
        return type(self), (self.path, self.line, self.detail)


# --- encodings --------------------------------------------------------------------------------


def detect_encoding(path: Path) -> str:
    """Guess a text file's encoding from a BOM, else from whether its first bytes decode."""
    with open(path, "rb") as handle:
        head = handle.read(_SNIFF_BYTES)
    if head.startswith(codecs.BOM_UTF8):
        return "utf-8-sig"
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    first_error = None
    for encoding in _FALLBACK_ENCODINGS:
        try:
            # final=False: the sniffed head may end inside a multi-byte character.
            codecs.getincrementaldecoder(encoding)().decode(head, final=False)
            return encoding
        except UnicodeDecodeError as error:
            first_error = first_error or error
    line = head.count(b"\n", 0, first_error.start) + 1
    raise RecordParseError(path, line, "bytes are neither UTF-8 nor GB18030; pass --encoding")


def _check_encoding(encoding: str) -> str:
    try:
        "".encode(encoding)  # LookupError also for codecs that are not text encodings (base64, zlib)
    except LookupError:
        raise InputError(f"unknown encoding {encoding!r}; give a text encoding such as utf-8 or gb18030") from None
    return codecs.lookup(encoding).name


def _undecodable(path: Path, line: int, encoding: str) -> RecordParseError:
    return RecordParseError(path, line, f"bytes cannot be decoded as {encoding}; pass --encoding")


# --- raw records --------------------------------------------------------------------------------


def require_file(path: Path) -> None:
    """Raise :class:`InputError` unless ``path`` is an existing file (saying so for a directory)."""
    if path.is_dir():
        raise InputError(f"{path}: is a directory; name the files in it")
    if not path.is_file():
        raise InputError(f"{path}: no such file")


def iter_raw_records(path: str | Path, *, encoding: str | None = None) -> Iterator[RawRecord]:
    """Yield every record of a raw input file. Raises :class:`InputError` naming file and line."""
    path = Path(path)
    require_file(path)
    suffix = path.suffix.lower()
    if suffix not in RAW_SUFFIXES:
        raise InputError(f"{path}: unsupported file type {suffix or '(none)'}; expected one of {', '.join(RAW_SUFFIXES)}")
    if suffix == ".parquet":
        return _iter_parquet(path)
    encoding = _check_encoding(encoding) if encoding else detect_encoding(path)
    if suffix in (".csv", ".tsv"):
        return _iter_delimited(path, encoding, "\t" if suffix == ".tsv" else ",")
    return _iter_json(path, encoding)


def _first_char(path: Path, encoding: str) -> str:
    number = 0
    with open(path, encoding=encoding, errors="replace") as handle:
        try:
            for number, line in enumerate(handle, 1):
                stripped = line.lstrip("\ufeff \t\r\n")
                if stripped:
                    return stripped[0]
        except UnicodeError:  # despite errors="replace": UTF-16/32 without a BOM, idna
            raise _undecodable(path, number + 1, encoding) from None
    return ""


def json_layout(path: Path, encoding: str | None = None) -> str:
    """How a .json/.jsonl file holds its records: ``list``, ``object`` (a single one) or ``lines``."""
    encoding = encoding or detect_encoding(path)
    first = _first_char(path, encoding)
    if first == "[":
        return "list"
    if first == "{" and path.suffix.lower() == ".json" and not _first_line_is_object(path, encoding):
        return "object"
    if first in ("{", ""):
        return "lines"
    raise RecordParseError(path, 1, f"not JSON records (starts with {first!r}); expected a list, an object or JSON Lines")


def _iter_json(path: Path, encoding: str) -> Iterator[RawRecord]:
    layout = json_layout(path, encoding)
    if layout == "lines":
        return _iter_json_lines(path, encoding)
    data = _load_whole_json(path, encoding)
    if layout == "object":
        return iter([RawRecord(0, None, data)])
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a JSON list of records")
    return (RawRecord(index, None, item) for index, item in enumerate(data))


def _decode_json(text: bytes | str, path: Path, line_offset: int = 0) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as error:
        if "UTF-8" in error.msg:
            raise _undecodable(path, line_offset + error.lineno, "utf-8") from None
        raise RecordParseError(path, line_offset + error.lineno, f"invalid JSON: {error.msg} (column {error.colno})") from None


def _load_whole_json(path: Path, encoding: str) -> Any:
    raw = path.read_bytes()
    if encoding in ("utf-8", "utf-8-sig"):
        return _decode_json(raw.removeprefix(codecs.BOM_UTF8), path)
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as error:
        raise _undecodable(path, raw.count(b"\n", 0, error.start) + 1, encoding) from None
    return _decode_json(text.removeprefix("\ufeff"), path)


def _first_line_is_object(path: Path, encoding: str) -> bool:
    for _, text in _numbered_lines(path, encoding):
        if text.strip():
            try:
                return isinstance(orjson.loads(text), dict)
            except orjson.JSONDecodeError:
                return False
    return False


def _numbered_lines(path: Path, encoding: str) -> Iterator[tuple[int, bytes | str]]:
    """1-based lines; bytes for UTF-8 (orjson reads them directly, fastest), else decoded text."""
    if encoding in ("utf-8", "utf-8-sig"):
        with open(path, "rb") as handle:
            for number, line in enumerate(handle, 1):
                yield number, (line.removeprefix(codecs.BOM_UTF8) if number == 1 else line)
        return
    number = 0
    with open(path, encoding=encoding, newline="") as handle:
        try:
            for number, line in enumerate(handle, 1):
                yield number, line.removeprefix("\ufeff")
        except UnicodeError:
            raise _undecodable(path, number + 1, encoding) from None


def _iter_json_lines(path: Path, encoding: str) -> Iterator[RawRecord]:
    for index, number, text in _unparsed_lines(path, encoding):
        yield RawRecord(index, number, parse_line(path, number, text))


def _unparsed_lines(path: Path, encoding: str) -> Iterator[tuple[int, int, bytes | str]]:
    index = 0
    for number, text in _numbered_lines(path, encoding):
        if text and not text.isspace():
            yield index, number, text
            index += 1


def parse_line(path: Path, line: int, text: bytes | str) -> Any:
    """One JSON Lines record; :class:`RecordParseError` names the line when it is broken."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return _decode_json(text, path, line - 1)  # raises, naming the line


def json_lines(path: str | Path, *, encoding: str | None = None) -> Iterator[tuple[int, int, bytes | str]] | None:
    """``(index, line, unparsed text)`` per record when ``path`` holds JSON Lines, else ``None``.

    For parsing elsewhere (worker processes) with :func:`parse_line`.
    """
    path = Path(path)
    if path.suffix.lower() not in (".json", ".jsonl"):
        return None
    encoding = _check_encoding(encoding) if encoding else detect_encoding(path)
    return _unparsed_lines(path, encoding) if json_layout(path, encoding) == "lines" else None


def _iter_delimited(path: Path, encoding: str, delimiter: str) -> Iterator[RawRecord]:
    """CSV/TSV rows as dicts keyed by the header; quoted fields may span lines."""
    with open(path, encoding=encoding, newline="") as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        try:
            header = next(reader, None)
            if header is None:
                return
            header = [name.lstrip("\ufeff").strip() for name in header]
            start = reader.line_num + 1
            for index, row in enumerate(reader):
                if row:
                    # Short rows get empty cells; cells beyond the header are kept under numbered keys.
                    row = [cell.replace("\r\n", "\n") for cell in row]  # CRLF inside quoted cells
                    values = dict(zip(header, row + [""] * (len(header) - len(row))))
                    values.update({f"column_{i + 1}": cell for i, cell in enumerate(row) if i >= len(header)})
                    yield RawRecord(index, start, values)
                start = reader.line_num + 1
        except UnicodeError:
            raise _undecodable(path, reader.line_num + 1, encoding) from None
        except csv.Error as error:
            raise RecordParseError(path, reader.line_num, f"invalid {'TSV' if delimiter == chr(9) else 'CSV'}: {error}") from None


def _iter_parquet(path: Path) -> Iterator[RawRecord]:
    import polars as pl

    try:
        frame = pl.read_parquet(path)
    except Exception as error:  # polars raises several unrelated types for unreadable files
        raise InputError(f"{path}: cannot read Parquet: {str(error).splitlines()[0]}") from None
    return (RawRecord(index, None, row) for index, row in enumerate(frame.iter_rows(named=True)))


# --- target-format files ------------------------------------------------------------------------


def read_conversations(path: str | Path) -> Iterator[tuple[int, Conversation]]:
    """``(index, Conversation)`` for every record of a target-format ``.json`` list or ``.jsonl`` file.

    Records must have ``messages`` with string ``role``/``content``; run
    :func:`minicpm_data.validate.validate_file` first for the full rules.
    """
    path = Path(path)
    for record in iter_raw_records(path):
        try:
            yield record.index, Conversation.from_record(record.data)
        except (KeyError, TypeError, AttributeError):
            where = f"{path}:{record.line}" if record.line else str(path)
            raise InputError(
                f"{where}: record {record.index} is not a messages record; check with: minicpm-data validate {path}"
            ) from None


# --- writing --------------------------------------------------------------------------------------


def output_format(path: str | Path, explicit: str | None = None) -> str:
    """``json`` or ``jsonl``: the explicit choice, else from the file extension."""
    if explicit:
        if explicit not in OUTPUT_FORMATS:
            raise InputError(f"unknown output format {explicit!r}; choose json or jsonl")
        return explicit
    suffix = Path(path).suffix.lower()
    if suffix in (".json", ".jsonl"):
        return suffix[1:]
    raise InputError(f"{path}: cannot tell the output format from the extension; use .json, .jsonl or --format")


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


@contextmanager
def atomic_writer(path: str | Path) -> Iterator[IO[bytes]]:
    """A binary handle to a temporary file beside ``path``, renamed onto ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile("wb", buffering=_WRITE_BUFFER, dir=path.parent, prefix=f".{path.name}.",
                                         suffix=".tmp", delete=False)
    try:
        with handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(handle.name, 0o666 & ~_UMASK)  # temporary files are created private (0600)
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def serialize(record: Any) -> bytes:
    """Compact UTF-8 JSON, not ASCII-escaped (dataclasses become objects)."""
    return orjson.dumps(record, option=orjson.OPT_NON_STR_KEYS)


class RecordWriter:
    """Streams records into a JSON list (one record per line) or JSON Lines; UTF-8, not ASCII-escaped."""

    def __init__(self, handle: IO[bytes], fmt: str):
        self._handle = handle
        self._fmt = fmt
        self.count = 0
        if fmt == "json":
            handle.write(b"[")

    def write(self, record: Any) -> None:
        """Write one record (dicts, lists, dataclasses such as :class:`Conversation`)."""
        self.write_serialized(serialize(record))

    def write_serialized(self, data: bytes) -> None:
        """Write one record already serialized by :func:`serialize`."""
        if self._fmt == "json":
            self._handle.write(b"\n" + data if self.count == 0 else b",\n" + data)
        else:
            self._handle.write(data + b"\n")
        self.count += 1

    def close(self) -> None:
        if self._fmt == "json":
            self._handle.write(b"\n]\n" if self.count else b"]\n")


@contextmanager
def record_writer(path: str | Path, fmt: str | None = None) -> Iterator[RecordWriter]:
    """Write records atomically to ``path`` as ``fmt`` (default: by extension)."""
    fmt = output_format(path, fmt)
    with atomic_writer(path) as handle:
        writer = RecordWriter(handle, fmt)
        yield writer
        writer.close()


def write_records(path: str | Path, records: Iterable[Any], fmt: str | None = None) -> int:
    """Write all ``records`` atomically; returns how many were written."""
    with record_writer(path, fmt) as writer:
        for record in records:
            writer.write(record)
    return writer.count
