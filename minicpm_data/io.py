"""Reading raw and target-format files, and writing outputs atomically.

Raw inputs: ``.json`` (a list, a single object, or JSON Lines under a .json name), ``.jsonl``,
``.csv``, ``.tsv`` and ``.parquet``. Text encodings: UTF-8, UTF-8 with BOM, UTF-16 with BOM and
GBK/GB18030, detected while reading (the file is read once) or forced with ``encoding=``. JSON Lines
and tables are streamed, so memory does not grow with the file; a JSON list is parsed whole (orjson).

Outputs are written to a temporary file beside the target and renamed into place, so an
interrupted run never leaves a partial file.
"""

from __future__ import annotations

import codecs
import csv
import glob
import io
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, NamedTuple

import orjson

from minicpm_data.conversation import RECORD_TYPES, Conversation
from minicpm_data.errors import InputError

RAW_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".parquet")
TARGET_SUFFIXES = (".json", ".jsonl")
REJECTS_NAME = "rejects.jsonl"  # convert's rejects file: OUT.rejects.jsonl beside OUT, DIR/rejects.jsonl with --dev-ratio
TABLE_SUFFIXES = (".csv", ".tsv", ".parquet")
OUTPUT_FORMATS = ("json", "jsonl")
_READ_BYTES = 1 << 18
_SNIFF_BYTES = 1 << 16  # from the first non-ASCII byte: what decides between UTF-8 and GB18030
_WRITE_BUFFER = 1 << 20  # records are a few KB each: fewer, larger writes
# Tried in this order when no encoding is given (a BOM decides first).
_FALLBACK_ENCODINGS = ("utf-8", "gb18030")
_NON_ASCII = re.compile(rb"[\x80-\xff]")


class RawRecord(NamedTuple):
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


# --- encodings ------------------------------------------------------------------------------------


def _bom_encoding(head: bytes) -> str | None:
    if head.startswith(codecs.BOM_UTF8):
        return "utf-8-sig"
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    return None


def _without_bom_encoding(head: bytes) -> str | None:
    """UTF-16 or UTF-32 (LE/BE) when a file's first bytes, which have no byte-order mark, say so; None when they
    hold no NUL byte, or no such layout. JSON and CSV never hold NUL bytes, but in these encodings their ASCII
    characters (brackets, quotes, commas, newlines) do, on one side of each character."""
    sample = head[:4096]
    if b"\0" not in sample:
        return None
    sample = sample[:len(sample) // 4 * 4]
    columns = [sample[offset::4].count(0) * 4 / max(1, len(sample)) for offset in range(4)]
    if min(columns[2:]) > 0.9 and columns[0] < 0.5:  # every character below U+10000 has two NUL bytes
        return "utf-32-le"
    if min(columns[:2]) > 0.9 and columns[3] < 0.5:
        return "utf-32-be"
    # UTF-16: characters with one NUL byte, on the high side (LE: second) or the low side. Chinese text has few
    # ASCII characters (a few percent) and some CJK ones with a NUL low byte (一 is U+4E00); random bytes have both
    # rarely (1 in 256).
    units = list(zip(sample[0::2], sample[1::2]))
    little = sum(1 for first, second in units if second == 0 and first)
    big = sum(1 for first, second in units if first == 0 and second)
    if max(little, big) >= 0.02 * len(units):
        return "utf-16-le" if little >= big else "utf-16-be"
    return None


def _sniff(data: bytes, path: Path, lines_before: int = 0) -> str:
    """UTF-8 or GB18030 for ``data``, ASCII (the same in both) up to a first non-ASCII byte: the first
    of the two that decodes the 64 KB from that byte on. ``lines_before``: newlines before ``data``."""
    start = _NON_ASCII.search(data).start()
    window = data[start:start + _SNIFF_BYTES]
    first_error = None
    for encoding in _FALLBACK_ENCODINGS:
        try:
            # final=False: the window may end inside a multi-byte character.
            codecs.getincrementaldecoder(encoding)().decode(window, final=False)
            return encoding
        except UnicodeDecodeError as error:
            first_error = first_error or error
    line = lines_before + data.count(b"\n", 0, start + first_error.start) + 1
    raise RecordParseError(path, line, "bytes are neither UTF-8 nor GB18030; pass --encoding")


def _check_encoding(encoding: str | None) -> str | None:
    if encoding is None:
        return None
    try:
        "".encode(encoding)  # LookupError also for codecs that are not text encodings (base64, zlib)
    except LookupError:
        raise InputError(f"unknown encoding {encoding!r}; give a text encoding such as utf-8 or gb18030") from None
    return codecs.lookup(encoding).name


def _undecodable(path: Path, line: int, encoding: str) -> RecordParseError:
    return RecordParseError(path, line, f"bytes cannot be decoded as {encoding}; pass --encoding")


def _pieces(path: Path, encoding: str | None, *, as_bytes: bool = False) -> Iterator[bytes | str]:
    """A text file's content in pieces of :data:`_READ_BYTES`, decoded; left as bytes while the text is
    UTF-8 and ``as_bytes`` (orjson parses those directly, fastest, and checks they are UTF-8).

    Without ``encoding``: a BOM's, else UTF-8, or GB18030 when the bytes from the first non-ASCII one
    on are not UTF-8 (everything before is ASCII, the same in both). That is decided where the byte
    comes, however late, so a large file is still read once. A later undecodable byte is an error.
    """
    with open(path, "rb") as handle:
        data = handle.read(_READ_BYTES)
        encoding = encoding or _bom_encoding(data)
        if encoding is None and (unmarked := _without_bom_encoding(data)):
            raise InputError(f"{path}: looks like {unmarked.upper()} text without a byte-order mark (NUL bytes "
                             f"between its characters); read it with --encoding {unmarked}, or save it as UTF-8")
        if encoding in ("utf-8", "utf-8-sig"):
            encoding, data = "utf-8", data.removeprefix(codecs.BOM_UTF8)
        lines = 0  # newlines before ``data``
        while encoding is None:  # ASCII so far
            if not data.isascii():
                data += handle.read(_SNIFF_BYTES)  # the 64 KB window may reach past this read
                encoding = _sniff(data, path, lines)
            elif data:
                yield data if as_bytes else data.decode("ascii")
                lines += data.count(b"\n")
                data = handle.read(_READ_BYTES)
            else:
                return
        if as_bytes and encoding == "utf-8":
            while data:
                yield data
                data = handle.read(_READ_BYTES)
            return
        decoder = codecs.getincrementaldecoder(encoding)()
        first = lines == 0
        while True:
            try:
                text = decoder.decode(data, final=not data)
            except UnicodeError as error:  # also UTF-16/32 without a BOM, and codecs such as idna
                before = error.object.count(b"\n", 0, error.start) if isinstance(error, UnicodeDecodeError) else 0
                raise _undecodable(path, lines + before + 1, encoding) from None
            yield text.removeprefix("\ufeff") if first else text
            if not data:
                return
            first, lines = False, lines + data.count(b"\n")
            data = handle.read(_READ_BYTES)


# --- raw records --------------------------------------------------------------------------------


def require_file(path: Path) -> None:
    """Raise :class:`InputError` unless ``path`` is an existing file (saying so for a directory)."""
    if path.is_dir():
        raise InputError(f"{path}: is a directory; name the files in it")
    if not path.is_file():
        raise InputError(f"{path}: no such file")


def is_rejects_file(path: str | Path) -> bool:
    """Whether ``path`` is named as ``minicpm-data convert`` names its rejects files (``OUT.rejects.jsonl``, or
    ``rejects.jsonl`` in a ``--dev-ratio`` folder): records it could not convert, never training data."""
    name = Path(path).name.lower()
    return name == REJECTS_NAME or name.endswith(f".{REJECTS_NAME}")


def expand_data_path(name: str) -> tuple[list[Path], list[Path]]:
    """The messages files ``name`` stands for, and the rejects files (:func:`is_rejects_file`) it named, which are
    left out. A glob (``*``, ``?``, ``[``) stands for its matches, a folder for its files, each a ``.json`` or
    ``.jsonl`` file, sorted; any other name for itself (whether or not it exists). :class:`InputError` when a glob
    or a folder has no such file."""
    if any(char in name for char in "*?["):
        found = [Path(match) for match in sorted(glob.glob(name)) if Path(match).suffix.lower() in TARGET_SUFFIXES]
        if not found:
            raise InputError(f"no .json or .jsonl file matches {name}")
    elif Path(name).is_dir():
        found = sorted(p for p in Path(name).iterdir() if p.suffix.lower() in TARGET_SUFFIXES and p.is_file())
        if not found:
            raise InputError(f"{name}: folder has no .json or .jsonl file")
    else:
        found = [Path(name)]
    return [p for p in found if not is_rejects_file(p)], [p for p in found if is_rejects_file(p)]


def rejects_note(skipped: Sequence[Path]) -> str:
    """What a note says of the rejects files a glob, a folder or a list of names held: they were left out."""
    return (f"left out {', '.join(map(str, skipped))}: rejects of minicpm-data convert (records it could not "
            "convert, with the reasons), not training data")


def only_rejects(skipped: Sequence[Path]) -> InputError:
    """The error when every file named was a rejects file."""
    return InputError(f"{rejects_note(skipped)}; no data file is left: name the converted output")


def iter_raw_records(path: str | Path, *, encoding: str | None = None) -> Iterator[RawRecord]:
    """Yield every record of a raw input file. Raises :class:`InputError` naming file and line."""
    path = Path(path)
    require_file(path)
    suffix = path.suffix.lower()
    if suffix not in RAW_SUFFIXES:
        raise InputError(f"{path}: unsupported file type {suffix or '(none)'}; expected one of {', '.join(RAW_SUFFIXES)}")
    if suffix == ".parquet":
        return _iter_parquet(path)
    encoding = _check_encoding(encoding)
    if suffix in (".csv", ".tsv"):
        return _iter_delimited(path, encoding)
    return _iter_json(path, encoding)


def _first_char(path: Path, encoding: str | None) -> str:
    for piece in _pieces(path, encoding):
        if stripped := piece.lstrip(" \t\r\n"):
            return stripped[0]
    return ""


def json_layout(path: Path, encoding: str | None = None) -> str:
    """How a .json/.jsonl file holds its records: ``list``, ``object`` (a single one) or ``lines``."""
    first = _first_char(path, encoding)
    if first == "[":
        return "list"
    if first == "{" and path.suffix.lower() == ".json" and not _first_line_is_object(path, encoding):
        return "object"
    if first in ("{", ""):
        return "lines"
    raise RecordParseError(path, 1, f"not JSON records (starts with {first!r}); expected a list, an object or JSON Lines")


def _iter_json(path: Path, encoding: str | None) -> Iterator[RawRecord]:
    layout = json_layout(path, encoding)
    if layout == "lines":
        return _iter_json_lines(path, encoding)
    if layout == "list" and _starts_as_utf8(path, encoding):
        return _iter_json_list(path, encoding)
    data = _load_whole_json(path, encoding)
    if layout == "object":
        return iter([RawRecord(0, None, data)])
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a JSON list of records")
    return (RawRecord(index, None, item) for index, item in enumerate(data))


def _starts_as_utf8(path: Path, encoding: str | None) -> bool:
    """Whether a file is UTF-8 as far as its first non-ASCII bytes show (or ``encoding`` says so)."""
    if encoding is not None:
        return encoding in ("utf-8", "utf-8-sig")
    with open(path, "rb") as handle:
        head = handle.read(_READ_BYTES + _SNIFF_BYTES)
    bom = _bom_encoding(head)
    return bom == "utf-8-sig" or (bom is None and (head.isascii() or _sniff(head, path) == "utf-8"))


def _iter_json_list(path: Path, encoding: str | None) -> Iterator[RawRecord]:
    """The records of a UTF-8 JSON list, parsed as they are read (ijson's C parser): memory stays flat in the
    file size. Where the streaming parser stops (broken JSON, a late non-UTF-8 byte), the whole file is
    parsed as :func:`_load_whole_json` does, which names the line of the error, or reads what streaming
    could not; records already yielded are not yielded again."""
    import ijson

    done = 0
    try:
        with open(path, "rb") as handle:
            if handle.read(len(codecs.BOM_UTF8)) != codecs.BOM_UTF8:
                handle.seek(0)
            for item in ijson.items(handle, "item", use_float=True, buf_size=_READ_BYTES):
                yield RawRecord(done, None, item)
                done += 1
            return
    except ijson.JSONError:
        data = _load_whole_json(path, encoding)
    yield from (RawRecord(index, None, item) for index, item in enumerate(data[done:], done))


def _decode_json(data: bytes | str, path: Path, line: int | None = None) -> Any:
    """Parse JSON; an error names ``line`` (a JSON Lines record) or its own line in ``data``."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as error:
        if "UTF-8" not in error.msg or not isinstance(data, bytes):
            raise RecordParseError(path, line or error.lineno, f"invalid JSON: {error.msg} (column {error.colno})") from None
    try:  # orjson puts bytes that are not UTF-8 on line 1, wherever they are: find the first
        data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = line or data.count(b"\n", 0, error.start) + 1
    raise _undecodable(path, line or 1, "utf-8")


def _load_whole_json(path: Path, encoding: str | None) -> Any:
    raw = path.read_bytes()
    encoding = encoding or _bom_encoding(raw) or ("utf-8" if raw.isascii() else _sniff(raw, path))
    if encoding in ("utf-8", "utf-8-sig"):
        return _decode_json(raw.removeprefix(codecs.BOM_UTF8), path)
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as error:
        raise _undecodable(path, raw.count(b"\n", 0, error.start) + 1, encoding) from None
    return _decode_json(text.removeprefix("\ufeff"), path)


def _first_line_is_object(path: Path, encoding: str | None) -> bool:
    for _, text in _numbered_lines(path, encoding):
        if text.strip():
            try:
                return isinstance(orjson.loads(text), dict)
            except orjson.JSONDecodeError:
                return False
    return False


def _numbered_lines(path: Path, encoding: str | None) -> Iterator[tuple[int, bytes | str]]:
    """1-based lines, split at \\n; bytes while the text is UTF-8 (orjson reads them directly), else str."""
    number, rest = 0, []  # rest: the pieces of a line not ended yet
    for piece in _pieces(path, encoding, as_bytes=True):
        lines = piece.split(b"\n" if isinstance(piece, bytes) else "\n")
        rest.append(lines[0])
        if len(lines) > 1:
            lines[0] = _joined(rest)
            rest = [lines.pop()]
            yield from enumerate(lines, number + 1)
            number += len(lines)
    if rest and (last := _joined(rest)):
        yield number + 1, last


def _joined(parts: list[bytes | str]) -> bytes | str:
    """One line from its pieces; bytes pieces before a str one are ASCII (read before GB18030 was detected)."""
    if isinstance(parts[-1], bytes):
        return b"".join(parts)
    return "".join(part.decode("ascii") if isinstance(part, bytes) else part for part in parts)


def _iter_json_lines(path: Path, encoding: str | None) -> Iterator[RawRecord]:
    for index, number, text in _unparsed_lines(path, encoding):
        yield RawRecord(index, number, parse_line(path, number, text))


def _unparsed_lines(path: Path, encoding: str | None) -> Iterator[tuple[int, int, bytes | str]]:
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
        return _decode_json(text, path, line)  # raises, naming the line


def json_lines(path: str | Path, *, encoding: str | None = None) -> Iterator[tuple[int, int, bytes | str]] | None:
    """``(index, line, unparsed text)`` per record when ``path`` holds JSON Lines, else ``None``.

    For parsing elsewhere (worker processes) with :func:`parse_line`.
    """
    path = Path(path)
    if path.suffix.lower() not in (".json", ".jsonl"):
        return None
    encoding = _check_encoding(encoding)
    return _unparsed_lines(path, encoding) if json_layout(path, encoding) == "lines" else None


def _text_lines(path: Path, encoding: str | None) -> Iterator[str]:
    """Lines with their ends, split at \\r\\n, \\r or \\n, as :mod:`csv` reads them."""
    rest = ""
    for piece in _pieces(path, encoding):
        lines = io.StringIO(rest + piece, newline="").readlines()
        # A last line without LF may go on in the next piece (a CR at its end may be half of a CRLF).
        rest = lines.pop() if lines and not lines[-1].endswith("\n") else ""
        yield from lines
    if rest:
        yield rest


def _rows(path: Path, encoding: str | None) -> Iterator[tuple[int, list[str]]]:
    """``(first line, cells)`` of every non-empty CSV/TSV row, the header included."""
    kind, delimiter = ("TSV", "\t") if path.suffix.lower() == ".tsv" else ("CSV", ",")
    # strict: a quote left open is an error, not the rest of the file swallowed into one cell
    reader = csv.reader(_text_lines(path, encoding), delimiter=delimiter, strict=True)
    start = 1
    try:
        for row in reader:
            if row:
                yield start, row
            start = reader.line_num + 1
    except csv.Error as error:
        if str(error) == "unexpected end of data":
            raise RecordParseError(path, start, f"invalid {kind}: a quoted field in the row starting on this "
                                                f"line is never closed") from None
        raise RecordParseError(path, reader.line_num, f"invalid {kind}: {error}") from None


def _iter_delimited(path: Path, encoding: str | None) -> Iterator[RawRecord]:
    """CSV/TSV rows as dicts keyed by the header; quoted fields may span lines."""
    rows = _rows(path, encoding)
    header = next(rows, None)
    if header is None:
        return
    names = _column_names(header[1])
    for index, (line, row) in enumerate(rows):
        # Short rows get empty cells; cells beyond the header are kept under numbered keys.
        row = [cell.replace("\r\n", "\n") for cell in row]  # CRLF inside quoted cells
        values = dict(zip(names, row + [""] * (len(names) - len(row))))
        values.update({f"column_{i + 1}": cell for i, cell in enumerate(row) if i >= len(names)})
        yield RawRecord(index, line, values)


def _column_names(header: list[str]) -> list[str]:
    return [name.strip() for name in header]


def table_columns(path: str | Path, *, encoding: str | None = None) -> list[str]:
    """The column names of a ``.csv``/``.tsv`` (its header row; none for an empty file) or ``.parquet`` file."""
    path = Path(path)
    if path.suffix.lower() == ".parquet":
        import polars as pl

        with _parquet_errors(path):
            return list(pl.read_parquet_schema(path))
    header = next(_rows(path, _check_encoding(encoding)), None)
    return _column_names(header[1]) if header else []


@contextmanager
def _parquet_errors(path: Path) -> Iterator[None]:
    try:
        yield
    except Exception as error:  # polars raises several unrelated types for unreadable files
        raise InputError(f"{path}: cannot read Parquet: {str(error).splitlines()[0]}") from None


def _iter_parquet(path: Path) -> Iterator[RawRecord]:
    import polars as pl

    with _parquet_errors(path):
        frame = pl.read_parquet(path)
    return (RawRecord(index, None, row) for index, row in enumerate(frame.iter_rows(named=True)))


# --- target-format files ------------------------------------------------------------------------


def read_conversations(path: str | Path) -> Iterator[tuple[int, Conversation]]:
    """``(index, Conversation)`` for every record of a target-format ``.json`` list or ``.jsonl`` file.

    Records must have ``messages`` with string ``role``/``content``; run
    :func:`minicpm_data.validate.validate_file` first for the full rules.
    """
    return read_examples(path, "messages")


def read_examples(path: str | Path, kind: str) -> Iterator[tuple[int, Any]]:
    """``(index, record)`` for every record of a target-format file of ``kind`` (``messages``: a
    :class:`Conversation`; ``pairs``: a :class:`PreferencePair`; ``kto``: a :class:`LabeledConversation`).
    Run :func:`minicpm_data.validate.validate_file` first for the full rules."""
    path = Path(path)
    build = RECORD_TYPES[kind].from_record
    for record in iter_raw_records(path):
        try:
            yield record.index, build(record.data)
        except (KeyError, TypeError, AttributeError):
            where = f"{path}:{record.line}" if record.line else str(path)
            raise InputError(
                f"{where}: record {record.index} is not a {kind} record; check with: minicpm-data validate {path}"
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


def check_target(path: str | Path) -> None:
    """Refuse, before anything is written, an output path that is a directory or lies under a file."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a directory; name a file")
    folder = next((parent for parent in path.parents if parent.exists()), None)
    if folder is not None and not folder.is_dir():
        raise InputError(f"{path}: {folder} is a file, not a folder")


@contextmanager
def atomic_writer(path: str | Path) -> Iterator[IO[bytes]]:
    """A binary handle to a temporary file beside ``path``, renamed onto ``path`` only on success."""
    path = Path(path)
    check_target(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = tempfile.NamedTemporaryFile("wb", buffering=_WRITE_BUFFER, dir=path.parent, prefix=f".{path.name}.",
                                             suffix=".tmp", delete=False)
    except OSError as error:  # e.g. a folder without write permission
        raise InputError(f"{path}: cannot write there: {error.strerror or error}") from None
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
        self.write_serialized([serialize(record)])

    def write_serialized(self, records: Sequence[bytes]) -> None:
        """Write records already serialized by :func:`serialize`, in one call."""
        if not records:
            return
        if self._fmt == "json":
            self._handle.write((b"\n" if self.count == 0 else b",\n") + b",\n".join(records))
        else:
            self._handle.write(b"\n".join(records) + b"\n")
        self.count += len(records)

    def close(self) -> None:
        if self._fmt == "json":
            self._handle.write(b"\n]\n" if self.count else b"]\n")


class _NothingWritten(Exception):
    """Ends :func:`record_writer` without a file when ``skip_empty`` and no record came."""


@contextmanager
def record_writer(path: str | Path, fmt: str | None = None, *, skip_empty: bool = False) -> Iterator[RecordWriter]:
    """Write records atomically to ``path`` as ``fmt`` (default: by extension); with ``skip_empty``, a run
    that writes no record leaves no file (and an existing one as it was)."""
    fmt = output_format(path, fmt)
    try:
        with atomic_writer(path) as handle:
            writer = RecordWriter(handle, fmt)
            yield writer
            writer.close()
            if skip_empty and not writer.count:
                raise _NothingWritten
    except _NothingWritten:
        pass


def write_records(path: str | Path, records: Iterable[Any], fmt: str | None = None) -> int:
    """Write all ``records`` atomically; returns how many were written."""
    with record_writer(path, fmt) as writer:
        for record in records:
            writer.write(record)
    return writer.count
