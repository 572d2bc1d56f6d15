"""Raw source formats: a registry of converters and auto-detection from the records' keys."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from minicpm_data.errors import FormatError
from minicpm_data.sources.alpaca import Alpaca
from minicpm_data.sources.alpaca_pairs import AlpacaPairs
from minicpm_data.sources.base import REJECT_REASONS, TOOL_ROLE, RecordRejected, Source, preference_keys
from minicpm_data.sources.csv import Table
from minicpm_data.sources.hh import AnthropicHH
from minicpm_data.sources.llamafactory_kto import LlamaFactoryKTO
from minicpm_data.sources.llamafactory_v1_dpo import LlamaFactoryV1DPO
from minicpm_data.sources.messages import Messages
from minicpm_data.sources.ocnli import OCNLI
from minicpm_data.sources.openbmb_dpo import OpenBMBDPO
from minicpm_data.sources.orca_pairs import OrcaPairs
from minicpm_data.sources.prompt_completion import PromptCompletion
from minicpm_data.sources.sharegpt import ShareGPT
from minicpm_data.sources.sharegpt_pairs import ShareGPTPairs
from minicpm_data.sources.trl_kto import TRLKTO
from minicpm_data.sources.trl_preference import TRLPreference
from minicpm_data.sources.ultrafeedback import UltraFeedback

# Preference data (pairs, then KTO rows): docs/preference-data.md.
PREFERENCE_SOURCES: tuple[type[Source], ...] = (ShareGPTPairs, AlpacaPairs, LlamaFactoryV1DPO, TRLPreference, AnthropicHH,
                                                UltraFeedback, OrcaPairs, OpenBMBDPO, LlamaFactoryKTO, TRLKTO)
SOURCES: dict[str, type[Source]] = {cls.name: cls for cls in (ShareGPT, Alpaca, OCNLI, Table, Messages, PromptCompletion,
                                                              *PREFERENCE_SOURCES)}
FORMATS = (*SOURCES, "auto")
# Formats recognisable from record keys alone; csv needs column options, so it is chosen explicitly
# (openbmb-dpo too: its keys are alpaca-pairs').
_DETECTABLE = (Messages, ShareGPT, Alpaca, OCNLI, PromptCompletion,
               *(cls for cls in PREFERENCE_SOURCES if cls is not OpenBMBDPO))
DETECT_SAMPLE = 100

__all__ = ["FORMATS", "PREFERENCE_SOURCES", "REJECT_REASONS", "SOURCES", "TOOL_ROLE", "RecordRejected", "Source",
           "check_preference_keys", "detect_format", "make_source"]


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
        # An SFT source never takes a record with preference keys: it would drop them.
        matching = [cls.name for cls in _DETECTABLE if cls.matches(record)
                    and (cls.kind != "messages" or not preference_keys(record))]
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


def check_preference_keys(source: Source, record: Mapping[str, Any]) -> None:
    """Reject (``preference record``) a record whose preference keys an SFT ``source`` would drop, naming the
    preference source that reads it."""
    keys = [key for key in preference_keys(record) if key not in source.reads_preference_keys]
    if keys:
        readers = [cls.name for cls in PREFERENCE_SOURCES if cls.matches(record)] or ["a preference source"]
        raise RecordRejected("preference record", f"has {', '.join(keys)}, which --from {source.name} would drop; "
                                                  f"convert it with --from {' or '.join(readers)}")
