"""Reading a model folder's weights one tensor at a time, and writing a GGUF file as a stream.

A folder's weights are ``model.safetensors`` (or shards with ``model.safetensors.index.json``), as ``merge`` and
``run`` save them and MiniCPM4 ships them, or ``pytorch_model.bin`` (or shards), as MiniCPM-2B-sft-bf16 ships them.
The GGUF is written tensor by tensor (``gguf.GGUFWriter``'s header, key/values and tensor table first, then each
tensor's data as it is converted), so an 8B model never sits in memory whole; it goes to a temporary file in the
output's folder that is renamed over the output only when complete.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from minicpm_data.errors import MinicpmError

OUTTYPES = ("auto", "f32", "f16", "bf16", "q8_0")


class ExportError(MinicpmError):
    """A model or adapter cannot be exported to GGUF as asked."""


class WeightFiles:
    """The tensors of a model folder by name, each loaded only when asked for (as float32)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._sources: dict[str, Path] = {}
        self._torch_files: dict[Path, dict] = {}
        for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                                   ("pytorch_model.bin.index.json", "pytorch_model.bin")):
            index = folder / index_name
            if index.is_file():
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                self._sources = {name: folder / file for name, file in weight_map.items()}
                break
            if (folder / single).is_file():
                self._sources = {name: folder / single for name in self._names_in(folder / single)}
                break
        if not self._sources:
            raise ExportError(f"{folder} has no model weights (model.safetensors or pytorch_model.bin, or their "
                              "sharded index)")
        missing = sorted({path.name for path in self._sources.values() if not path.is_file()})
        if missing:
            raise ExportError(f"{folder}: weight file {missing[0]} named by the index is missing")

    def names(self) -> list[str]:
        return list(self._sources)

    def shape(self, name: str) -> tuple[int, ...]:
        path = self._sources[name]
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                return tuple(handle.get_slice(name).get_shape())
        return tuple(self._torch(path)[name].shape)

    def dtype(self, name: str) -> str:
        """The stored dtype, e.g. ``torch.bfloat16``."""
        path = self._sources[name]
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                return {"BF16": "torch.bfloat16", "F16": "torch.float16"}.get(handle.get_slice(name).get_dtype(),
                                                                               "torch.float32")
        return str(self._torch(path)[name].dtype)

    def load(self, name: str):
        """The tensor as a float32 torch tensor."""
        import torch

        path = self._sources[name]
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                return handle.get_tensor(name).to(torch.float32)
        return self._torch(path)[name].to(torch.float32)

    def _names_in(self, path: Path) -> list[str]:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                return list(handle.keys())
        return list(self._torch(path))

    def _torch(self, path: Path) -> dict:
        if path not in self._torch_files:
            import torch

            self._torch_files[path] = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        return self._torch_files[path]


def resolve_outtype(outtype: str, stored_dtypes: set[str]) -> str:
    """``auto`` is llama.cpp's choice: bf16 for bf16 weights (f16 could overflow them), else f16."""
    if outtype not in OUTTYPES:
        raise ExportError(f"--outtype must be one of {', '.join(OUTTYPES)}, not {outtype!r}")
    if outtype != "auto":
        return outtype
    return "bf16" if "torch.bfloat16" in stored_dtypes else "f16"


def tensor_type(outtype: str, shape: tuple[int, ...]):
    """The GGML type of one tensor: 1-D tensors (norms, RoPE factors) stay float32, as llama.cpp's converter keeps
    them; q8_0 needs rows that are whole 32-value blocks, else the tensor is f16 (the converter's fallback too)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if len(shape) == 1 or outtype == "f32":
        return GGMLQuantizationType.F32
    if outtype == "q8_0":
        block = GGML_QUANT_SIZES[GGMLQuantizationType.Q8_0][0]
        return GGMLQuantizationType.Q8_0 if shape[-1] % block == 0 else GGMLQuantizationType.F16
    return {"f16": GGMLQuantizationType.F16, "bf16": GGMLQuantizationType.BF16}[outtype]


@dataclass
class PlannedTensor:
    """A tensor of the GGUF: its name, shape (PyTorch order: rows last-but-one), GGML type, and how to make it."""

    name: str
    shape: tuple[int, ...]
    ggml_type: object  # gguf.GGMLQuantizationType
    make: Callable[[], object]  # -> float32 numpy array of ``shape``

    @property
    def nbytes(self) -> int:
        from gguf import GGML_QUANT_SIZES

        block, size = GGML_QUANT_SIZES[self.ggml_type]
        count = 1
        for dim in self.shape:
            count *= dim
        return count // block * size

    def encoded(self):
        """The tensor's bytes as ``gguf.quants`` encodes them for its type."""
        from gguf import quants

        data = self.make()
        if tuple(data.shape) != self.shape:
            raise ExportError(f"tensor {self.name}: made {tuple(data.shape)}, planned {self.shape}")
        return quants.quantize(data, self.ggml_type)


def write_gguf(path: Path, writer, tensors: list[PlannedTensor],
               on_progress: Callable[[int, int], None] | None = None) -> int:
    """Write ``writer``'s key/values and ``tensors`` to ``path`` through a temporary file; the bytes written.

    ``writer`` is a ``gguf.GGUFWriter`` made with no path whose key/values are set; ``on_progress(done, total)``
    follows the tensor data.
    """
    import numpy as np
    from gguf import quants

    total = sum(tensor.nbytes for tensor in tensors)
    for tensor in tensors:
        dtype = _numpy_dtype(tensor.ggml_type)
        shape = quants.quant_shape_to_byte_shape(tensor.shape, tensor.ggml_type) if dtype == np.uint8 else tensor.shape
        writer.add_tensor_info(tensor.name, shape, dtype, tensor.nbytes, raw_dtype=tensor.ggml_type)
    with _replacing(path) as temporary:
        writer.write_header_to_file(temporary)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        done = 0
        for tensor in tensors:
            writer.write_tensor_data(tensor.encoded())
            done += tensor.nbytes
            if on_progress is not None:
                on_progress(done, total)
        writer.close()
    return path.stat().st_size


def write_text(path: Path, text: str) -> None:
    """A small text file, through a temporary file and a rename like the GGUF."""
    with _replacing(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def _numpy_dtype(ggml_type):
    """What ``GGUFWriter.add_tensor_info`` expects beside a raw GGML type (float32 and float16 are stored as such)."""
    import numpy as np
    from gguf import GGMLQuantizationType

    return {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}.get(ggml_type, np.uint8)


@contextmanager
def _replacing(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path``, renamed to it on success and removed on failure."""
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
