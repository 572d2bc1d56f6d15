"""TRL's preference datasets: explicit prompt or implicit, strings or message lists."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from minicpm_data.conversation import Message, PreferencePair
from minicpm_data.sources.base import RecordRejected, optional_text, text
from minicpm_data.sources.hh import is_transcript
from minicpm_data.sources.messages import chat_messages
from minicpm_data.sources.preference import SHAPE_KEYS, PairSource, answer, has_side, implicit_pair, sides


class TRLPreference(PairSource):
    """TRL's four preference layouts (its "dataset formats" guide)::

        explicit, standard:        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}
        explicit, conversational:  {"prompt": [{"role": "user", "content": "What color is the sky?"}],
                                    "chosen": [{"role": "assistant", "content": "It is blue."}],
                                    "rejected": [{"role": "assistant", "content": "It is green."}]}
        implicit, conversational:  {"chosen": [{"role": "user", "content": "What color is the sky?"},
                                               {"role": "assistant", "content": "It is blue."}],
                                    "rejected": [{"role": "user", "content": "What color is the sky?"},
                                                 {"role": "assistant", "content": "It is green."}]}
        implicit, standard:        {"chosen": "The sky is blue.", "rejected": "The sky is green."}
        -> {"messages": [{"role": "user", "content": "What color is the sky?"}],
            "chosen": {"role": "assistant", "content": "It is blue."},
            "rejected": {"role": "assistant", "content": "It is green."}}

    A string prompt becomes the user turn (a top-level ``system`` goes first). Implicit conversations must
    share every turn before their final answers (else ``prompts differ``). Implicit strings split where they
    first differ, as TRL's ``extract_prompt`` does (``"The sky is"``, ``"blue."`` / ``"green."``); strings
    that are Human/Assistant transcripts are Anthropic HH data (``--from hh``).
    """

    name = "trl-preference"

    @staticmethod
    def matches(record: Mapping[str, Any]) -> bool:
        return (has_side(record) and not any(key in record for key in SHAPE_KEYS)
                and ("prompt" in record or not is_transcript(record)))

    def convert(self, record: Mapping[str, Any]) -> PreferencePair:
        chosen, rejected = sides(record)
        if "prompt" not in record:
            return _implicit(chosen, rejected)
        prompt = record["prompt"]
        system = optional_text(record, "system")
        context = [Message("system", system)] if system else []
        context += chat_messages(prompt, "prompt message") if isinstance(prompt, list) else [Message("user", text(prompt, "prompt"))]
        return PreferencePair(context, answer(chosen, "chosen"), answer(rejected, "rejected"))


def _implicit(chosen: Any, rejected: Any) -> PreferencePair:
    if isinstance(chosen, list) and isinstance(rejected, list):
        return implicit_pair(chat_messages(chosen, "chosen message"), chat_messages(rejected, "rejected message"))
    if isinstance(chosen, list) or isinstance(rejected, list):
        raise RecordRejected("malformed field", "chosen and rejected must both be strings or both message lists")
    chosen, rejected = text(chosen, "chosen"), text(rejected, "rejected")
    split = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)))
    if split and chosen[split - 1] == " ":  # the space before the answers belongs to them, as in TRL
        split -= 1
    if not chosen[:split].strip():
        raise RecordRejected("no prompt", "chosen and rejected share no beginning: an implicit prompt needs one")
    return PreferencePair([Message("user", chosen[:split])], Message("assistant", chosen[split:]),
                          Message("assistant", rejected[split:]))
