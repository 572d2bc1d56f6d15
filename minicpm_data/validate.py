"""Check target-format files: the JSON Schemas in ``schemas/`` plus the turn-order rules they can't express.

A target file holds one kind of record (:data:`KINDS`), told apart by keys: ``messages`` (SFT
conversations), ``pairs`` (``chosen``/``rejected``: DPO) or ``kto`` (``label``: KTO); the first record
decides a file's kind, and a record of another kind is a problem, never dropped or read as the wrong kind.

Rules: roles are system, user, assistant; a system turn only first; then user and assistant
alternate, starting with user and ending with assistant (a pair's context: ending with the user turn the
two answers reply to); every content is a non-empty string after stripping; only assistant turns of a
messages record may carry ``train`` (true or false); a pair's answers differ; no record names media files
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

SCHEMA_DIR = Path(__file__).resolve().parents[1] / "schemas"
SCHEMA_PATH = SCHEMA_DIR / "messages.schema.json"

# The kinds of target file: what each holds, its schema and record definition, and the training stage it is for.
KINDS = ("messages", "pairs", "kto")
KIND_NAMES = {"messages": "SFT conversations (messages)", "pairs": "preference pairs (chosen/rejected)",
              "kto": "KTO rows (messages with a label)"}
KIND_STAGES = {"messages": "sft", "pairs": "dpo", "kto": "kto"}
_KIND_SCHEMAS = {"messages": ("messages.schema.json", "conversation"), "pairs": ("pairs.schema.json", "pair"),
                 "kto": ("kto.schema.json", "row")}


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
def _record_validator(kind: str = "messages"):
    """A validator of one record of ``kind``, its schema's references resolved among the files of ``schemas/``."""
    from jsonschema import Draft202012Validator
    from referencing import Registry, Resource

    schemas = [json.loads((SCHEMA_DIR / name).read_text(encoding="utf-8")) for name, _ in _KIND_SCHEMAS.values()]
    registry = Registry().with_resources((schema["$id"], Resource.from_contents(schema)) for schema in schemas)
    name, definition = _KIND_SCHEMAS[kind]
    base = next(schema["$id"] for schema in schemas if schema["$id"].endswith(f"/{name}"))
    return Draft202012Validator({"$ref": f"{base}#/$defs/{definition}"}, registry=registry)


def record_kind(record: Any) -> str:
    """The kind of a target-format record by its keys: ``pairs`` with ``chosen`` or ``rejected``, ``kto`` with
    ``label``, else ``messages``."""
    if isinstance(record, dict):
        if "chosen" in record or "rejected" in record:
            return "pairs"
        if "label" in record:
            return "kto"
    return "messages"


def file_kind(path: str | Path) -> str:
    """The kind of a target-format file: its first record's (see :func:`record_kind`). An unreadable file or
    one without records is an :class:`InputError`; :func:`valid_records` checks the rest."""
    from minicpm_data.io import iter_raw_records

    first = next(iter(iter_raw_records(path)), None)
    if first is None:
        raise InputError(f"{path}: no records")
    return record_kind(first.data)


def wrong_kind(found: str, expected: str) -> str:
    """Why a file of kind ``found`` cannot be used where ``expected`` is: it says which stage trains it."""
    hint = {"messages": " (or convert raw preference data with minicpm-data convert)",
            "kto": " (a label that is no KTO label, true or false, must go)"}.get(found, "")
    return f"holds {KIND_NAMES[found]}, not {KIND_NAMES[expected]}: train it with --stage {KIND_STAGES[found]}{hint}"


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


def _fits_pair(record: Any) -> bool:
    """The pairs schema as plain Python, like :func:`_fits_schema` (a test keeps them in step)."""
    if type(record) is not dict:
        return False
    messages, chosen, rejected = record.get("messages"), record.get("chosen"), record.get("rejected")
    return (type(messages) is list and len(messages) >= 1 and _fits_answer(chosen) and _fits_answer(rejected)
            and all(type(m) is dict and m.keys() == _MESSAGE_KEYS and m["role"] in ROLES and _fits_content(m["content"])
                    for m in messages))


def _fits_kto(record: Any) -> bool:
    """The KTO schema as plain Python, like :func:`_fits_schema` (a test keeps them in step)."""
    if type(record) is not dict:
        return False
    messages = record.get("messages")
    return (type(record.get("label")) is bool and type(messages) is list and len(messages) >= 2
            and all(type(m) is dict and m.keys() == _MESSAGE_KEYS and m["role"] in ROLES and _fits_content(m["content"])
                    for m in messages))


def _fits_answer(answer: Any) -> bool:
    return (type(answer) is dict and answer.keys() == _MESSAGE_KEYS and answer["role"] == "assistant"
            and _fits_content(answer["content"]))


def _fits_content(content: Any) -> bool:
    return type(content) is str and content != "" and not content.isspace()


def record_problems(record: Any, kind: str = "messages") -> list[tuple[str, str]]:
    """``(JSON pointer within the record, message)`` for everything wrong with one record of ``kind``."""
    fits = {"messages": _fits_schema, "pairs": _fits_pair, "kto": _fits_kto}[kind](record)
    problems = [] if fits else sorted(
        ("".join(f"/{part}" for part in error.absolute_path), _schema_message(error))
        for error in _record_validator(kind).iter_errors(record))
    if isinstance(record, dict) and (keys := media_keys(record)):
        problems.append((f"/{keys[0]}", f"media files under {', '.join(keys)}: MiniCPM's text models cannot train on "
                                        "them (minicpm-data convert --media drop keeps the text)"))
    messages = record.get("messages") if isinstance(record, dict) else None
    # Turn order is checked whenever every role is readable, even if a content is wrong.
    if isinstance(messages, list) and messages and all(isinstance(m, dict) and m.get("role") in ROLES
                                                       for m in messages):
        roles = [m["role"] for m in messages]
        found = _context_problems(roles) if kind == "pairs" else turn_problems(roles)
        problems += [(f"/messages/{position}" if position is not None else "/messages", message)
                     for position, message in found]
    if kind == "pairs" and not problems and record["chosen"]["content"] == record["rejected"]["content"]:
        problems.append(("/rejected/content", "the same answer as chosen: nothing to prefer"))
    if kind == "pairs" and isinstance(record, dict) and "label" in record:
        problems.append(("/label", "a pair has no label (chosen and rejected say which answer is preferred); "
                                   "a KTO row has label and no chosen/rejected"))
    return problems


def _context_problems(roles: list[str]) -> list[tuple[int | None, str]]:
    """Turn-order problems of a pair's context: a conversation once an answer follows its last turn."""
    problems = []
    for position, message in turn_problems([*roles, "assistant"]):
        if position == len(roles):  # where the answers go: the context does not end with a user turn
            position, message = len(roles) - 1, ("a pair's context must end with a user turn "
                                                  "(the chosen and rejected answers reply to it)")
        problems.append((position, message))
    return problems


_PLAIN_SCHEMA_MESSAGES = {
    "pattern": "content is empty or only whitespace",
    "minItems": "a conversation needs at least a user turn and an assistant turn",
    "not": "train is only for assistant turns (user and system turns are never trained)",
}


def _schema_message(error) -> str:
    if error.validator == "not" and error.schema.get("$ref") == "#/$defs/message":  # the context_message definition
        return "no train key here: in a pair or KTO row only the final answer is trained"
    if error.validator == "minItems" and error.validator_value == 1:
        return "a pair's context needs at least the user turn the answers reply to"
    if error.validator == "const" and error.validator_value == "assistant":
        return "an answer's role is assistant"
    return _PLAIN_SCHEMA_MESSAGES.get(error.validator, error.message)


def validate_file(path: str | Path, kind: str | None = None) -> list[Problem]:
    """Every problem in a target-format ``.json`` (list) or ``.jsonl`` file of ``kind`` (None: the file's
    own, see :func:`file_kind`); empty when it is valid."""
    problems: list[Problem] = []
    for _ in valid_records(path, problems, kind):
        pass
    return problems


def valid_records(path: str | Path, problems: list[Problem], kind: str | None = "messages") -> Iterator[RawRecord]:
    """Stream the records of a target-format file that have no problem, in one pass, appending every
    problem found (in records, or with the file as a whole) to ``problems``.

    ``kind`` is what the caller reads (None: whatever the file's first record is). A file whose first record
    is of another kind is one whole-file problem naming the stage that trains it (:func:`wrong_kind`);
    a later record of another kind than the first is a problem of that record."""
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
        records, expected = 0, kind
        for records, raw in enumerate(iter_raw_records(path), 1):
            prefix = f"/{raw.index}" if layout == "list" else ""
            found_kind = record_kind(raw.data)
            if records == 1:
                if expected is not None and found_kind != expected:
                    problems[:] = [Problem(name, None, None, "", wrong_kind(found_kind, expected))]
                    return
                first_kind = found_kind
            if found_kind != first_kind:
                problems.append(Problem(name, raw.index, raw.line, prefix, f"holds {KIND_NAMES[found_kind]}, but the "
                                        f"file's first record holds {KIND_NAMES[first_kind]}: a file holds one kind of record"))
                continue
            found = [Problem(name, raw.index, raw.line, prefix + pointer, message)
                     for pointer, message in record_problems(raw.data, first_kind)]
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


def require_valid(path: str | Path, kind: str | None = "messages") -> None:
    """Raise :class:`FormatError` unless ``path`` passes :func:`validate_file` as a file of ``kind`` (None: of
    its own kind), as training requires.

    The message is one line: ``FILE: N problem(s) in record(s) 1, 4; first: <problem>; see all with:
    minicpm-data validate FILE``, or the problem alone when it is about the whole file (unreadable, empty,
    of another kind).
    """
    raise_for_problems(path, validate_file(path, kind))


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
