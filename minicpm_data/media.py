"""Images, audio and video in chat data: what MiniCPM's text models cannot train on, wherever a record keeps it.

Multimodal datasets keep media in three ways:

- media keys: LLaMA-Factory and ms-swift list files under ``images``, ``videos`` and ``audios``; LLaVA names
  one ``image``::

      {"messages": [{"role": "user", "content": "<image>Who are they?"}, ...], "images": ["mllm_demo_data/1.jpg"]}

- placeholders in the text, ``<image>``, ``<video>``, ``<audio>``, marking where each file goes;
- media parts in a message's content list (OpenAI ``image_url``, ``input_audio``, ...).

convert's media policy (``--media``) decides: ``reject`` (the default) rejects the record as ``not text: image``
(``audio``, ``video``), the detail naming what holds the media; ``drop`` removes the placeholders and media parts
from the text, ignores the media keys and keeps the text, counted as the repair ``drop media``. Dropping is
for text that stands without its media: a question about "this image" then has an answer the model can
only guess.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

MEDIA_POLICIES = ("reject", "drop")
# Top-level keys naming media files, by the kind of media they hold.
MEDIA_KEYS = {"images": "image", "image": "image", "videos": "video", "video": "video", "audios": "audio",
              "audio": "audio"}
# Content part types (OpenAI chat and Responses API, LLaMA-Factory v1) that hold media, by kind.
MEDIA_PARTS = {"image": "image", "image_url": "image", "input_image": "image", "audio": "audio",
               "input_audio": "audio", "video": "video", "video_url": "video"}
MEDIA_KEY_NAMES = frozenset(MEDIA_KEYS)  # a set: dict_keys.isdisjoint with a set is the cheap test, once per record
MEDIA_REASONS = frozenset(f"not text: {kind}" for kind in ("image", "audio", "video"))
PLACEHOLDER = re.compile(r"<(image|video|audio)>")
# A run of placeholders with the whitespace around it: removed whole, so no blank line or double space is left.
_PLACEHOLDER_RUN = re.compile(r"\s*(?:<(?:image|video|audio)>\s*)+")


def media_keys(record: Mapping[str, Any]) -> list[str]:
    """The media keys of ``record`` that name something (an empty list or null names nothing)."""
    if record.keys().isdisjoint(MEDIA_KEY_NAMES):
        return []
    return [key for key in MEDIA_KEYS if record.get(key) not in (None, "", [])]


def media_found(keys: Sequence[str], contents: Sequence[str]) -> tuple[str, str] | None:
    """The kind of the first media found under ``keys`` or as placeholders in ``contents`` (the turns' texts), and
    where all of it is (``media files under images; <image> in turn 0``); None when there is none."""
    kinds = [MEDIA_KEYS[key] for key in keys]
    where = [f"media files under {', '.join(keys)}"] if keys else []
    for position, content in enumerate(contents):
        marks = list(dict.fromkeys(match[0] for match in PLACEHOLDER.finditer(content)))
        kinds += [mark[1:-1] for mark in marks]
        if marks:
            where.append(f"{''.join(marks)} in turn {position}")
    if not kinds:
        return None
    return kinds[0], "; ".join(where[:3]) + ("; ..." if len(where) > 3 else "")


def without_placeholders(text: str) -> str:
    """``text`` with its media placeholders removed (one space where they stood between words)."""
    return _PLACEHOLDER_RUN.sub(lambda m: "" if m.start() == 0 or m.end() == len(text) else " ", text)


def parts_as_placeholders(value: Any) -> Any:
    """A copy of a record with every media part in a content list replaced by its placeholder text, so that
    ``--media drop`` removes parts as it removes placeholders."""
    if isinstance(value, list):
        return [f"<{MEDIA_PARTS[kind]}>" if isinstance(item, Mapping) and isinstance(kind := item.get("type"), str)
                and kind in MEDIA_PARTS else parts_as_placeholders(item) for item in value]
    if isinstance(value, Mapping):
        return {key: parts_as_placeholders(item) for key, item in value.items()}
    return value
