"""Load a tokenizer from a local model folder or a hub id, offline, without running model code.

MiniCPM folders carry ``auto_map`` entries that point at custom Python code (``config.json`` of
MiniCPM4, ``tokenizer_config.json`` of MiniCPM3) which is often not there, and which ``AutoTokenizer``
would insist on running. The tokenizer itself never needs it: we pick a transformers class from the
folder's files instead, and always return a fast (``tokenizers``-backed) tokenizer, because the
renderer maps characters to tokens with its offsets. Whatever this returns is what training uses,
so ``minicpm-data stats`` and ``minicpm-train`` tokenize identically.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from minicpm_data.errors import TokenizerError
from minicpm_data.model_files import folder_finding, require, tokenizer_findings, vocabulary_findings

# Files a tokenizer can need; a hub download fetches only these (never weights or code).
TOKENIZER_FILES = ["tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json", "config.json",
                   "generation_config.json", "vocab.json", "merges.txt"]


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False) -> Any:
    """Return a fast tokenizer for a local model folder or a hub id.

    A local folder loads offline. Without ``trust_remote_code``, a custom tokenizer class named by
    ``auto_map`` / ``tokenizer_class`` is replaced by the generic class for the files present
    (``tokenizer.json`` -> fast tokenizer; ``tokenizer.model`` -> Llama SentencePiece, converted).
    """
    folder = Path(name_or_path).expanduser()
    if not folder.is_dir():
        if not is_hub_id(name_or_path):
            require([folder_finding(folder)])
        folder = _fetch_from_hub(name_or_path)
    require(tokenizer_findings(folder))  # a missing vocabulary would load as a tokenizer of special tokens only
    tokenizer = _load_local(folder, trust_remote_code=trust_remote_code)
    if not getattr(tokenizer, "is_fast", False):
        raise TokenizerError(f"tokenizer in {folder} is not a fast (tokenizers-backed) tokenizer; "
                             "add its tokenizer.json to the folder")
    require(vocabulary_findings(tokenizer, folder))
    return tokenizer


def pad_token_id(tokenizer: Any) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its eos (MiniCPM-2B's has no pad token)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def is_hub_id(name: str) -> bool:
    """Whether a name that is no local folder reads as a hub id (``org/name`` with no local ``org`` folder); any
    other name is a mistyped local path."""
    org, slash, _ = name.partition("/")
    return (bool(slash) and name.count("/") == 1 and not name.startswith((".", "/", "~")) and "\\" not in name
            and not Path(org).is_dir())


def _fetch_from_hub(repo_id: str) -> Path:
    """Download only the tokenizer files of ``repo_id`` (or find them in the cache)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=TOKENIZER_FILES))
    except Exception as error:  # network, auth, missing repo: all end the same way for the user
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise TokenizerError(f"could not fetch {repo_id} from the hub (offline? {reason}): "
                             "pass a local model folder with --tokenizer DIR") from None


def _load_local(folder: Path, *, trust_remote_code: bool) -> Any:
    import transformers
    from transformers.utils import logging as hf_logging

    config = _read_json(folder / "tokenizer_config.json")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # conversion chatter and auto_map prompts are not for the user
    try:
        if trust_remote_code:
            return transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=True, local_files_only=True)
        return _tokenizer_class(folder, config).from_pretrained(folder, local_files_only=True)
    except TokenizerError:
        raise
    except Exception as error:
        raise TokenizerError(f"could not load the tokenizer in {folder}: {error}".splitlines()[0]) from None
    finally:
        hf_logging.set_verbosity(verbosity)


def _tokenizer_class(folder: Path, config: dict) -> type:
    """The transformers class named in the config if transformers has it, else a generic one."""
    import transformers

    custom = bool(config.get("auto_map", {}).get("AutoTokenizer"))
    name = config.get("tokenizer_class")
    if name and not custom:
        known = getattr(transformers, name, None) or getattr(transformers, name.removesuffix("Fast"), None)
        if known is not None:
            return known
    if (folder / "tokenizer.json").is_file():
        return transformers.PreTrainedTokenizerFast
    if (folder / "tokenizer.model").is_file():
        return transformers.LlamaTokenizer
    raise TokenizerError(f"{folder} has no tokenizer.json or tokenizer.model")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise TokenizerError(f"cannot read {path}: {error}") from None
