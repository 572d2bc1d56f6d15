"""A model folder's files checked without loading them: config.json, the tokenizer's files, the weights, a LoRA
adapter. Pure Python (no torch), so ``minicpm-data stats`` checks a tokenizer folder as cheaply as
``minicpm-train doctor --model`` checks an 8B download.

Every check returns :class:`Finding` s (which file, what is wrong, what to do); :func:`require` raises the
first as a :class:`ModelFolderError`, which the CLIs print as one ``error:`` line. Weights are judged by
their structure, never their values: a safetensors file is an 8-byte header length, a JSON header of
``name -> dtype, shape, [begin, end)`` and the tensor bytes, so a truncated download shows as byte ranges
past the end of the file; a ``.bin`` / ``.pt`` file is a zip archive whose directory sits at its end; a
clone made without git-lfs holds small text pointers in place of both.
"""

from __future__ import annotations

import json
import re
import struct
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from minicpm_data.errors import MinicpmError

LFS_MAGIC = b"version https://git-lfs.github.com/spec/v1"
DOWNLOAD_AGAIN = "download it again (an interrupted or partial download?)"
# Bytes per element of safetensors' dtypes (sub-byte types such as F4 are left out of the size check).
SAFETENSORS_ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
                        "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1}
TORCH_DTYPES = ("float32", "float16", "bfloat16", "float64", "float8_e4m3fn", "float8_e5m2", "int8", "uint8", "auto")
# config.json keys that must be positive whole numbers where a config has them.
POSITIVE_INTEGERS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "max_position_embeddings")
VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)")  # a decoder layer's tensor: (index, name within the layer)


@dataclass(frozen=True)
class Finding:
    """One problem with one file of a model folder, and what to do about it."""

    path: Path
    problem: str
    fix: str

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}; {self.fix}"


class ModelFolderError(MinicpmError):
    """A model, tokenizer or adapter folder holds a missing, damaged or inconsistent file (the first finding is
    the message; ``findings`` has them all)."""

    def __init__(self, findings: list[Finding]):
        more = len(findings) - 1
        super().__init__(str(findings[0]) + (f" (and {more} more problem{'s' * (more > 1)})" if more else ""))
        self.findings = findings


def require(findings: Iterable[Finding | None]) -> None:
    """Raise :class:`ModelFolderError` if there is any finding (None entries are no finding)."""
    findings = [finding for finding in findings if finding]
    if findings:
        raise ModelFolderError(findings)


# --- single files -----------------------------------------------------------------------------------------


def lfs_pointer_size(path: Path) -> int | None:
    """The size of the real file when ``path`` is a Git LFS pointer (a clone without git-lfs), else None."""
    try:
        if path.stat().st_size > 1024:
            return None
        text = path.read_bytes()
    except OSError:
        return None
    if not text.startswith(LFS_MAGIC):
        return None
    size = re.search(rb"^size (\d+)", text, re.MULTILINE)
    return int(size[1]) if size else 0


def _lfs_finding(path: Path) -> Finding | None:
    real = lfs_pointer_size(path)
    if real is None:
        return None
    return Finding(path, f"a Git LFS pointer, not the file itself ({real:,} bytes; cloned without git-lfs)",
                   f"run `git lfs install && git lfs pull` in {path.parent}, or download the model with `hf download`")


def read_json_file(path: Path, *, required: bool = True) -> tuple[dict | None, Finding | None]:
    """A JSON object file, or the finding that says why it cannot be read (None, None: absent, not required)."""
    if not path.is_file():
        if not required:
            return None, None
        return None, Finding(path, "missing", f"copy it from the model's download, or {DOWNLOAD_AGAIN}")
    pointer = _lfs_finding(path)
    if pointer:
        return None, pointer
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        return None, Finding(path, "not a text file", DOWNLOAD_AGAIN)
    except ValueError as error:
        where = f" (line {error.lineno}, column {error.colno}: {error.msg})" if hasattr(error, "lineno") else ""
        return None, Finding(path, f"not valid JSON{where}", f"correct the file, or {DOWNLOAD_AGAIN}")
    if not isinstance(data, dict):
        return None, Finding(path, f"holds a JSON {type(data).__name__}, not an object", DOWNLOAD_AGAIN)
    return data, None


@dataclass(frozen=True)
class Tensor:
    """A tensor as a weights file's header describes it."""

    dtype: str
    shape: tuple[int, ...]


def safetensors_header(path: Path) -> tuple[dict[str, Tensor], Finding | None]:
    """The tensors a safetensors file holds (name -> dtype, shape), read from its header alone, or the finding
    that says how the file is damaged: too short, a header past the end, tensor bytes past the end."""
    pointer = _lfs_finding(path)
    if pointer:
        return {}, pointer
    size = path.stat().st_size
    damaged = lambda problem: ({}, Finding(path, problem, DOWNLOAD_AGAIN))  # noqa: E731
    if size < 8:
        return damaged(f"{'empty' if size == 0 else f'only {size} bytes'}: not a safetensors file")
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        if 8 + length > size:
            return damaged(f"truncated or not a safetensors file: its header claims {length:,} bytes, the file has "
                           f"{size:,}")
        try:
            header = json.loads(handle.read(length))
        except (ValueError, UnicodeDecodeError):
            return damaged("the safetensors header is not valid JSON (damaged file)")
    if not isinstance(header, dict):
        return damaged("the safetensors header is not a JSON object (damaged file)")
    tensors, end = {}, 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, stop) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            return damaged(f"the safetensors header entry of {name} is malformed (damaged file)")
        count = 1
        for dim in shape:
            count *= dim
        itemsize = SAFETENSORS_ITEMSIZE.get(dtype)
        if itemsize is not None and stop - begin != count * itemsize:
            return damaged(f"{name} takes {stop - begin:,} bytes for a {dtype} tensor of shape {list(shape)} "
                           f"(damaged header)")
        tensors[name] = Tensor(dtype, shape)
        end = max(end, stop)
    data = size - 8 - length
    if end > data:
        return damaged(f"truncated: its tensors need {8 + length + end:,} bytes, the file has {size:,}")
    if end < data:
        return damaged(f"{data - end:,} bytes follow its last tensor (damaged or appended to)")
    return tensors, None


def zip_archive_finding(path: Path) -> Finding | None:
    """A ``torch.save`` file (``pytorch_model.bin``, ``optimizer.pt``) is a zip archive; a truncated one has lost
    the directory at its end. Old (pre-zip) pickles are not judged."""
    pointer = _lfs_finding(path)
    if pointer:
        return pointer
    size = path.stat().st_size
    if size == 0:
        return Finding(path, "empty", DOWNLOAD_AGAIN)
    with path.open("rb") as handle:
        if handle.read(2) != b"PK":
            return None  # a legacy pickle: nothing cheap to check
    try:
        with zipfile.ZipFile(path) as archive:
            last = max((info.header_offset + info.compress_size for info in archive.infolist()), default=0)
    except (zipfile.BadZipFile, OSError, ValueError):
        return Finding(path, f"truncated or damaged ({size:,} bytes; its zip directory is missing)", DOWNLOAD_AGAIN)
    if last > size:
        return Finding(path, f"truncated ({size:,} bytes, its entries need more)", DOWNLOAD_AGAIN)
    return None


def file_finding(path: Path) -> Finding | None:
    """The structural check of one file by its kind: safetensors, a torch zip archive, JSON, or an LFS pointer."""
    if path.suffix == ".safetensors":
        return safetensors_header(path)[1]
    if path.suffix in (".bin", ".pt", ".pth"):
        return zip_archive_finding(path)
    if path.suffix == ".json":
        return read_json_file(path)[1]
    return _lfs_finding(path)


# --- the folder -------------------------------------------------------------------------------------------


def folder_finding(folder: Path) -> Finding | None:
    """A local folder that is not there (mistyped) or is a file."""
    if folder.is_dir():
        return None
    if folder.exists():
        return Finding(folder, "a file, not a folder", "pass the folder that holds the model's files")
    return Finding(folder, "no such folder", "check the path")


# --- config.json ------------------------------------------------------------------------------------------


def config_findings(folder: Path) -> tuple[dict | None, list[Finding]]:
    """``config.json`` read and its values checked: the dtype is a dtype, the sizes positive whole numbers."""
    path = folder / "config.json"
    if not path.is_file():
        return None, [Finding(path, "missing: this is not a model folder (a model download has config.json beside "
                                    "its weights)", "pass the folder that holds the model's files")]
    config, finding = read_json_file(path)
    if finding:
        return None, [finding]
    findings = []
    for key in ("torch_dtype", "dtype"):
        value = config.get(key)
        if value is not None and value not in TORCH_DTYPES:
            close = [d for d in TORCH_DTYPES if d[:4] == str(value)[:4]] or ["bfloat16", "float16", "float32"]
            findings.append(Finding(path, f"\"{key}\": {json.dumps(value)} is not a dtype",
                                    f"correct it (e.g. {' or '.join(json.dumps(d) for d in close)})"))
    for key in POSITIVE_INTEGERS:
        value = config.get(key)
        if key in config and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            if value is None and key == "num_key_value_heads":
                continue  # null: as many as the attention heads
            findings.append(Finding(path, f"\"{key}\": {json.dumps(value)} is not a positive whole number",
                                    f"correct it, or {DOWNLOAD_AGAIN}"))
    return config, findings


# --- the tokenizer ----------------------------------------------------------------------------------------


def tokenizer_findings(folder: Path) -> list[Finding]:
    """The tokenizer's files are there and real: a vocabulary file, none of them an LFS pointer or empty, its
    JSON configs readable."""
    findings = []
    for name in ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
        finding = read_json_file(folder / name, required=False)[1]
        if finding:
            findings.append(finding)
    present = [folder / name for name in VOCABULARY_FILES if (folder / name).is_file()]
    for path in present:
        finding = _lfs_finding(path) or (Finding(path, "empty", DOWNLOAD_AGAIN) if path.stat().st_size == 0 else None)
        if finding:
            findings.append(finding)
    if not present and not any(folder.glob("*.tiktoken")):
        findings.append(Finding(folder, f"no tokenizer vocabulary: none of {', '.join(VOCABULARY_FILES)} is here "
                                        "(MiniCPM-1/2 keep theirs in tokenizer.model)",
                                "copy the tokenizer files from the model's download"))
    return findings


def vocabulary_findings(tokenizer, folder: Path) -> list[Finding]:
    """A loaded tokenizer against its folder: a vocabulary beyond its special tokens, and ids that fit the
    model's embedding (``config.json``'s ``vocab_size``, where there is a readable one)."""
    size, special = len(tokenizer), len(tokenizer.get_added_vocab())
    if size <= special:
        return [Finding(folder, f"the tokenizer loads with {size} tokens, all of them special: its vocabulary file is "
                                "missing or unreadable", "copy tokenizer.model / tokenizer.json from the model's "
                                                         "download")]
    config, _ = read_json_file(folder / "config.json", required=False)
    vocab_size = (config or {}).get("vocab_size")
    if not isinstance(vocab_size, int) or vocab_size < 1:
        return []
    path = folder / "config.json"
    if size > vocab_size:
        return [Finding(path, f"vocab_size is {vocab_size:,} but the tokenizer has {size:,} tokens: ids past "
                              f"{vocab_size - 1:,} have no embedding", "use the model's own tokenizer files")]
    if size < vocab_size // 2:
        return [Finding(folder, f"the tokenizer has {size:,} tokens but the model's vocab_size is {vocab_size:,}: "
                                "it is not this model's tokenizer", "copy the tokenizer files from the model's "
                                                                    "download")]
    return []


# --- weights ----------------------------------------------------------------------------------------------

WEIGHT_NAMES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                "pytorch_model.bin")


def weight_findings(folder: Path) -> tuple[dict[str, Tensor] | None, list[Finding]]:
    """The weight files are there, whole and consistent (shards against their index); returns the tensors
    of the safetensors files (None for ``.bin`` weights, whose shapes need torch to read)."""
    present = [name for name in WEIGHT_NAMES if (folder / name).is_file()]
    if not present:
        return None, [Finding(folder / "model.safetensors", "missing: the folder has no weights (model.safetensors, "
                                                            "its shards, or pytorch_model.bin)",
                              f"download the model's weights into {folder}")]
    name = present[0]
    if name.endswith(".index.json"):
        index, finding = read_json_file(folder / name)
        if finding:
            return None, [finding]
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            return None, [Finding(folder / name, "has no weight_map", DOWNLOAD_AGAIN)]
        shards = sorted(set(weight_map.values()))
    else:
        weight_map, shards = None, [name]
    tensors: dict[str, Tensor] | None = {} if shards[0].endswith(".safetensors") else None
    findings = []
    for shard in shards:
        path = folder / shard
        if not path.is_file():
            findings.append(Finding(path, f"missing (named in {name})", f"download the missing shard into {folder}"))
        elif tensors is not None:
            held, finding = safetensors_header(path)
            findings += [finding] if finding else []
            tensors.update(held)
            lost = [t for t, s in (weight_map or {}).items() if s == shard and t not in held and not finding]
            if lost:
                findings.append(Finding(path, f"lacks {and_more(lost)}, which {name} places there", DOWNLOAD_AGAIN))
        else:
            finding = zip_archive_finding(path)
            findings += [finding] if finding else []
    return (None if findings else tensors), findings


def architecture_findings(folder: Path, config: dict, tensors: dict[str, Tensor]) -> list[Finding]:
    """The weights against ``config.json``: as many decoder layers, each with the same tensors, and an embedding
    of ``vocab_size`` x ``hidden_size``. Exact shapes per architecture are left to the model class."""
    path, findings = folder / "config.json", []
    layers: dict[int, dict[str, tuple]] = {}
    for name, tensor in tensors.items():
        if match := _LAYER.search(name):
            layers.setdefault(int(match[1]), {})[match[2]] = tensor.shape
    expected = config.get("num_hidden_layers")
    if layers and isinstance(expected, int):
        held = sorted(layers)
        if expected > len(held) or held != list(range(len(held))):
            missing = sorted(set(range(expected)) - set(held))
            findings.append(Finding(path, f"num_hidden_layers is {expected} but the weights hold layer"
                                          f"{'s' * (len(held) > 1)} {_ranges(held)}: layer{'s' * (len(missing) > 1)} "
                                          f"{_ranges(missing)} would be random weights",
                                    f"set num_hidden_layers to {len(held)} if the weights are right, or "
                                    f"{DOWNLOAD_AGAIN}"))
        elif expected < len(held):
            findings.append(Finding(path, f"num_hidden_layers is {expected} but the weights hold {len(held)} layers: "
                                          f"layers {_ranges(held[expected:])} would be left out",
                                    f"set num_hidden_layers to {len(held)}"))
        reference = layers[held[0]]
        for index in held[1:]:
            differ = sorted(k for k in set(reference) | set(layers[index]) if reference.get(k) != layers[index].get(k))
            if differ:
                findings.append(Finding(folder, f"layer {index} of the weights differs from layer {held[0]} in "
                                                f"{differ[0]} (missing, extra or of another shape)", DOWNLOAD_AGAIN))
                break
    embedding = next((t for n, t in tensors.items() if n.endswith("embed_tokens.weight")), None)
    vocab_size, hidden = config.get("vocab_size"), config.get("hidden_size")
    if embedding is not None and len(embedding.shape) == 2 and isinstance(vocab_size, int):
        rows, width = embedding.shape
        if rows != vocab_size or (isinstance(hidden, int) and width != hidden):
            findings.append(Finding(path, f"vocab_size x hidden_size is {vocab_size} x {hidden} but the weights' "
                                          f"embedding is {rows} x {width}",
                                    f"use the config.json that came with these weights, or {DOWNLOAD_AGAIN}"))
    return findings


def and_more(names: list[str]) -> str:
    """``a`` or ``a and 3 more``."""
    return names[0] + (f" and {len(names) - 1} more" if len(names) > 1 else "")


def _ranges(numbers: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``0-2, 5``."""
    parts, start = [], None
    for index, number in enumerate(numbers):
        if start is None:
            start = number
        if index + 1 == len(numbers) or numbers[index + 1] != number + 1:
            parts.append(str(start) if start == number else f"{start}-{number}")
            start = None
    return ", ".join(parts)


# --- a LoRA adapter ---------------------------------------------------------------------------------------

ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def adapter_findings(folder: Path) -> list[Finding]:
    """``adapter_config.json`` readable with a positive rank and targets; the adapter's weights whole, their
    LoRA matrices of that rank."""
    config, finding = read_json_file(folder / "adapter_config.json")
    if finding:
        return [finding]
    path = folder / "adapter_config.json"
    rank = config.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        return [Finding(path, f"\"r\": {json.dumps(rank)} is not a LoRA rank", DOWNLOAD_AGAIN)]
    weights = next((folder / name for name in ADAPTER_WEIGHTS if (folder / name).is_file()), None)
    if weights is None:
        return [Finding(folder / ADAPTER_WEIGHTS[0], "missing: the adapter has no weights",
                        "copy it from the run's output folder (or a checkpoint-N folder of it)")]
    if weights.suffix == ".bin":
        return [f for f in [zip_archive_finding(weights)] if f]
    tensors, finding = safetensors_header(weights)
    if finding or config.get("rank_pattern"):  # (per-module ranks: not checked against r)
        return [finding] if finding else []
    for name, tensor in tensors.items():
        if ".lora_A." in name and tensor.shape[:1] != (rank,) or ".lora_B." in name and tensor.shape[-1:] != (rank,):
            return [Finding(weights, f"{name} has shape {list(tensor.shape)}, not of rank {rank} as "
                                     "adapter_config.json says", "use the adapter_config.json saved with these "
                                                                 "weights")]
    return []


# --- all of it --------------------------------------------------------------------------------------------


def model_folder_findings(folder: Path) -> tuple[dict | None, dict[str, Tensor] | None, list[Finding]]:
    """Every check of a model folder that needs no torch: config.json, the tokenizer's files, the weights and
    their agreement with the config. Returns the config and the safetensors tensors where they could be read."""
    missing = folder_finding(folder)
    if missing:
        return None, None, [missing]
    config, findings = config_findings(folder)
    findings += tokenizer_findings(folder)
    tensors, weights = weight_findings(folder)
    findings += weights
    if config is not None and tensors:
        findings += architecture_findings(folder, config, tensors)
    return config, tensors, findings
