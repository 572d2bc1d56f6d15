"""Records mapped by column or key: tables (CSV, TSV, Parquet) and JSON / JSON Lines objects, one exchange each."""

from __future__ import annotations

import string
from collections.abc import Mapping
from typing import Any

from minicpm_data.conversation import Conversation, Message
from minicpm_data.errors import FormatError
from minicpm_data.sources.base import PREFERENCE_KEYS, RecordRejected, Source, content_text, field, optional_text


class Table(Source):
    """One row (or JSON object) -> one exchange, by column mapping or a prompt template.

    ``user_col``/``assistant_col`` (and optional ``system_col``) name the columns, or a JSON record's
    keys; or ``template`` builds the user turn from ``{column}`` placeholders (``{{``/``}}`` for literal
    braces; a row whose placeholder cell is empty is rejected, never rendered with a hole)::

        Q,A          --user-col Q --assistant-col A
        12시 땡!,하루가 또 가네요.   -> {"messages": [{"role": "user", "content": "12시 땡!"},
                                                   {"role": "assistant", "content": "하루가 또 가네요."}]}
        {"question": "2+2?", "answer": 4}   --user-col question --assistant-col answer
                                     -> {"messages": [{"role": "user", "content": "2+2?"},
                                                      {"role": "assistant", "content": "4"}]}
    """

    name = "csv"
    # The columns are named by the user: a record's other keys (a preference key too) are left out on purpose.
    reads_preference_keys = frozenset(PREFERENCE_KEYS)

    def __init__(self, *, user_col: str | None = None, assistant_col: str | None = None,
                 system_col: str | None = None, template: str | None = None):
        if not assistant_col or not (user_col or template):
            raise FormatError("--from csv needs --assistant-col and either --user-col or --template")
        if user_col and template:
            raise FormatError("give --user-col or --template, not both")
        self.user_col, self.assistant_col, self.system_col = user_col, assistant_col, system_col
        self.template = _parse_template(template) if template else []
        placeholders = [name for _, name in self.template if name is not None]
        self.columns = [c for c in (user_col, assistant_col, system_col, *placeholders) if c]

    def check_columns(self, columns: list[str], path: str, what: str = "column") -> None:
        missing = [name for name in dict.fromkeys(self.columns) if name not in columns]
        if missing:
            shown = ", ".join(columns[:20]) + (", ..." if len(columns) > 20 else "")
            raise FormatError(f"{path}: missing {what} {', '.join(map(repr, missing))} ({what}s: {shown})")

    def convert(self, record: Mapping[str, Any]) -> Conversation:
        if self.template:
            prompt = "".join(literal + ("" if name is None else _filled(record, name)) for literal, name in self.template)
        else:
            prompt = _cell(field(record, self.user_col), self.user_col)
        system = optional_text(record, self.system_col) if self.system_col else ""
        messages = [Message("system", system)] if system else []
        messages += [Message("user", prompt),
                     Message("assistant", _cell(field(record, self.assistant_col), self.assistant_col))]
        return Conversation(messages)


def _parse_template(template: str) -> list[tuple[str, str | None]]:
    """``(literal text, column or None)`` pieces of a ``{column}`` template; :class:`FormatError` if malformed."""
    usage = "use {column} placeholders, and {{ or }} for a literal brace"
    try:
        pieces = list(string.Formatter().parse(template))
    except ValueError as error:
        raise FormatError(f"--template {template!r}: {error}; {usage}") from None
    for _, name, spec, conversion in pieces:
        if name is not None and not name.strip():
            raise FormatError(f"--template {template!r} has an empty placeholder; {usage}")
        if spec or conversion:
            raise FormatError(f"--template {template!r}: {{{name}}} has a conversion or format spec; {usage}")
    return [(literal, name) for literal, name, _, _ in pieces]


def _filled(record: Mapping[str, Any], column: str) -> str:
    """A template placeholder's cell; empty or null is ``missing field``."""
    value = _cell(field(record, column), column)
    if not value.strip():
        raise RecordRejected("missing field", f"{column!r} is empty (a --template placeholder)")
    return value


def _cell(value: Any, column: str) -> str:
    """A cell as text: numbers (typed Parquet/JSON columns) are written as they read; JSON content part
    lists join as a turn's do."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return content_text(value, repr(column))
