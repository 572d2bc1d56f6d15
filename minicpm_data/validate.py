"""Check target-format files: the JSON Schema in ``schemas/`` plus the turn-order rules it can't express.

Rules: roles are system, user, assistant; a system turn only first; then user and assistant
alternate, starting with user and ending with assistant; every content is a non-empty string
after stripping; only assistant turns may carry ``train`` (true or false); no record names media files
(``images``, ``videos``, ``audios``: text models cannot train on them); a file holds at least one record.
Each problem names the file, record index, line (JSON Lines), a JSON pointer and a plain message.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from minicpm_data.conversation import ROLES
from minicpm_data.errors import FormatError, InputError
from minicpm_data.media import media_keys

if TYPE_CHECKING:
    from minicpm_data.io import RawRecord

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "schemas" / "messages.schema.json"


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a file: where (file, record index, line, JSON pointer) and what."""

    file: str
    index: int | None
    line: int | None
    pointer: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        record = f" record {self.index}" if self.index is not None else ""
        pointer = f" at {self.pointer}" if self.pointer else ""
        return f"{where}{record}{pointer}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@functools.cache
def load_schema() -> dict[str, Any]:
    """The target format's JSON Schema (one copy, in the repository's ``schemas/``)."""
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


@functools.cache
def _record_validator():
    from jsonschema import Draft202012Validator

    schema = load_schema()
    return Draft202012Validator({"$ref": "#/$defs/conversation", "$defs": schema["$defs"]})


def turn_problems(roles: Sequence[str]) -> list[tuple[int | None, str]]:
    """Turn-order problems as ``(turn position or None, message)``; empty when the order is valid."""
    if not roles:
        return [(None, "no messages")]
    problems: list[tuple[int | None, str]] = [
        (position, f"system turn at position {position}; only the first turn may be system")
        for position, role in enumerate(roles)
        if role == "system" and position > 0
    ]
    # Misplaced system turns are reported above; the alternation is checked without them.
    turns = [(position, role) for position, role in enumerate(roles) if role != "system"]
    for step, (position, role) in enumerate(turns):
        expected = "user" if step % 2 == 0 else "assistant"
        if role != expected:
            problems.append((position, f"turn is {role}, expected {expected}: after an optional system turn, "
                                       "user and assistant alternate, starting with user"))
            break
    if not turns:
        problems.append((None, "no user or assistant turns"))
    elif turns[-1][1] != "assistant":
        position, role = turns[-1]
        problems.append((position, f"last turn is {role}; a conversation must end with an assistant turn"))
    return problems


_MESSAGE_KEYS = {"role", "content"}
_TRAINED_MESSAGE_KEYS = {"role", "content", "train"}


def _fits_schema(record: Any) -> bool:
    """The schema's conversation definition as plain Python: a fast path for valid records
    (jsonschema runs only when this says no, to explain why; a test keeps the two in step)."""
    messages = record.get("messages") if type(record) is dict else None
    return type(messages) is list and len(messages) >= 2 and all(
        type(m) is dict and m.get("role") in ROLES and type(m.get("content")) is str
        and not m["content"].isspace() and m["content"] != ""
        and (m.keys() == _MESSAGE_KEYS
             or (m.keys() == _TRAINED_MESSAGE_KEYS and m["role"] == "assistant" and type(m["train"]) is bool))
        for m in messages)


def record_problems(record: Any) -> list[tuple[str, str]]:
    """``(JSON pointer within the record, message)`` for everything wrong with one record."""
    problems = [] if _fits_schema(record) else sorted(
        ("".join(f"/{part}" for part in error.absolute_path), _schema_message(error))
        for error in _record_validator().iter_errors(record))
    if isinstance(record, dict) and (keys := media_keys(record)):
        problems.append((f"/{keys[0]}", f"media files under {', '.join(keys)}: MiniCPM's text models cannot train on "
                                        "them (minicpm-data convert --media drop keeps the text)"))
    messages = record.get("messages") if isinstance(record, dict) else None
    # Turn order is checked whenever every role is readable, even if a content is wrong.
    if isinstance(messages, list) and messages and all(isinstance(m, dict) and m.get("role") in ROLES
                                                       for m in messages):
        problems += [(f"/messages/{position}" if position is not None else "/messages", message)
                     for position, message in turn_problems([m["role"] for m in messages])]
    return problems


_PLAIN_SCHEMA_MESSAGES = {
    "pattern": "content is empty or only whitespace",
    "minItems": "a conversation needs at least a user turn and an assistant turn",
    "not": "train is only for assistant turns (user and system turns are never trained)",
}


def _schema_message(error) -> str:
    return _PLAIN_SCHEMA_MESSAGES.get(error.validator, error.message)


def validate_file(path: str | Path) -> list[Problem]:
    """Every problem in a target-format ``.json`` (list) or ``.jsonl`` file; empty when it is valid."""
    problems: list[Problem] = []
    for _ in valid_records(path, problems):
        pass
    return problems


def valid_records(path: str | Path, problems: list[Problem]) -> Iterator[RawRecord]:
    """Stream the records of a target-format file that have no problem, in one pass, appending every
    problem found (in records, or with the file as a whole) to ``problems``."""
    from minicpm_data.io import RecordParseError, iter_raw_records, json_layout, require_file

    path = Path(path)
    name = str(path)
    try:
        require_file(path)
        if path.suffix.lower() not in (".json", ".jsonl"):
            problems.append(Problem(name, None, None, "", "not a .json or .jsonl file"))
            return
        layout = json_layout(path)
        if layout == "object":
            problems.append(Problem(name, None, None, "", "top level is a single object; expected a JSON list of records"))
            return
        records = 0
        for records, raw in enumerate(iter_raw_records(path), 1):
            prefix = f"/{raw.index}" if layout == "list" else ""
            found = [Problem(name, raw.index, raw.line, prefix + pointer, message)
                     for pointer, message in record_problems(raw.data)]
            if found:
                problems.extend(found)
            else:
                yield raw
        if not records:  # nothing to train on (JSON Lines without records: only blank lines)
            message = "no records: the list is empty" if layout == "list" else "file is empty"
            problems[:] = [Problem(name, None, None, "", message)]
    except RecordParseError as error:
        problems[:] = [Problem(name, None, error.line, "", error.detail)]
    except InputError as error:
        problems[:] = [Problem(name, None, None, "", str(error).removeprefix(f"{name}: "))]


def require_valid(path: str | Path) -> None:
    """Raise :class:`FormatError` unless ``path`` passes :func:`validate_file`, as training requires.

    The message is one line: ``FILE: N problem(s) in record(s) 1, 4; first: <problem>; see all with:
    minicpm-data validate FILE``, or the problem alone when it is about the whole file (unreadable, empty).
    """
    raise_for_problems(path, validate_file(path))


def raise_for_problems(path: str | Path, problems: list[Problem]) -> None:
    """Raise :func:`require_valid`'s :class:`FormatError` for ``problems`` found in ``path`` (none: return)."""
    if not problems:
        return
    if len(problems) == 1 and problems[0].index is None:
        raise FormatError(str(problems[0]))
    where = sorted({problem.index for problem in problems} - {None})
    records = ", ".join(map(str, where[:5])) + (", ..." if len(where) > 5 else "")
    raise FormatError(f"{path}: {len(problems)} problem(s)" + (f" in record(s) {records}" if records else "")
                      + f"; first: {problems[0]}; see all with: minicpm-data validate {path}")
