"""Raw source formats: a registry of converters and auto-detection from the records' keys."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from minicpm_data.errors import FormatError
from minicpm_data.sources.alpaca import Alpaca
from minicpm_data.sources.base import REJECT_REASONS, TOOL_ROLE, RecordRejected, Source
from minicpm_data.sources.csv import Table
from minicpm_data.sources.messages import Messages
from minicpm_data.sources.ocnli import OCNLI
from minicpm_data.sources.prompt_completion import PromptCompletion
from minicpm_data.sources.sharegpt import ShareGPT

SOURCES: dict[str, type[Source]] = {cls.name: cls for cls in (ShareGPT, Alpaca, OCNLI, Table, Messages, PromptCompletion)}
FORMATS = (*SOURCES, "auto")
# Formats recognisable from record keys alone; csv needs column options, so it is chosen explicitly.
_DETECTABLE = (Messages, ShareGPT, Alpaca, OCNLI, PromptCompletion)
DETECT_SAMPLE = 100

__all__ = ["FORMATS", "REJECT_REASONS", "SOURCES", "TOOL_ROLE", "RecordRejected", "Source", "detect_format",
           "make_source"]


def make_source(name: str, **table_options: str | None) -> Source:
    """An instance of the named source; ``table_options`` (user_col, ...) configure ``csv``."""
    if name not in SOURCES:
        raise FormatError(f"unknown format {name!r}; choose one of {', '.join(FORMATS)}")
    return SOURCES[name](**table_options) if name == "csv" else SOURCES[name]()


def detect_format(records: Sequence[Any], path: str) -> str:
    """The one format whose keys every sampled record has; ambiguous or unknown input is an error."""
    seen: dict[str, int] = {}
    for position, record in enumerate(records):
        if not isinstance(record, Mapping):
            continue
        matching = [cls.name for cls in _DETECTABLE if cls.matches(record)]
        if len(matching) > 1:
            raise FormatError(f"{path}: record {position} fits {' and '.join(matching)}; choose one with --from")
        if matching:
            seen.setdefault(matching[0], position)
    if len(seen) > 1:
        found = ", ".join(f"{name} (record {position})" for name, position in seen.items())
        raise FormatError(f"{path}: records look like different formats: {found}; choose one with --from")
    if not seen:
        keys = list(dict.fromkeys(key for record in records if isinstance(record, Mapping) for key in record))
        raise FormatError(f"{path}: cannot detect the format from keys {keys[:12]}; choose one with --from "
                          "(tables, or records with other keys: --user-col ... --assistant-col ...)")
    return next(iter(seen))
