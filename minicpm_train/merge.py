"""Merge a LoRA adapter into its base model: one folder that plain transformers loads.

The merge runs in float32 (a QLoRA adapter is merged into the full-precision base, not the 4-bit one),
then the weights are saved in the base's own dtype unless another is asked for.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from minicpm_train.inference import load_model, resolve_folders, tokenizer_folder
from minicpm_train.model import BUILT_IN, DTYPES, ModelError, copy_tokenizer_files, model_class

_DTYPE_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


@dataclass
class MergeResult:
    output_dir: Path
    base: Path
    adapter: Path
    dtype: str
    parameters: int
    files: list[str]
    notices: list[str] = field(default_factory=list)


def _saved_dtype(config: dict, requested: str | None) -> str:
    if requested and requested != "auto":
        if requested not in DTYPES:
            raise ModelError(f"--dtype must be auto, {', '.join(DTYPES)}; not {requested!r}")
        return requested
    return _DTYPE_NAMES.get(str(config.get("dtype") or config.get("torch_dtype") or "float32"), "fp32")


def _keep_modelling_files(base: Path, output_dir: Path, config: dict) -> None:
    """The modelling files the base's ``auto_map`` points at, so OpenBMB's own code and vLLM (with
    trust_remote_code) still read the merged folder."""
    if config.get("auto_map"):
        for source in base.glob("*.py"):
            shutil.copy2(source, output_dir / source.name)


def merge_adapter(model: str | Path, adapter: str | Path | None, output_dir: str | Path, *, dtype: str | None = None,
                  trust_remote_code: bool = False, overwrite: bool = False) -> MergeResult:
    """Write base + adapter as a full model folder (safetensors, config, tokenizer with its chat template).

    The base's format is kept: its config keys, its modelling ``.py`` files when ``auto_map`` names them,
    and the tokenizer's files byte for byte (``tokenizer.model`` too, which llama.cpp's converter reads).
    """
    import torch

    output_dir = Path(output_dir)
    base, adapter_dir = resolve_folders(model, adapter)
    if adapter_dir is None:
        raise ModelError(f"{model} has no adapter to merge: pass --adapter DIR (a LoRA run's output folder)")
    if output_dir.resolve() in (base.resolve(), adapter_dir.resolve()):
        raise ModelError(f"-o {output_dir}: write the merged model to a new folder, not over its inputs")
    if output_dir.exists() and not output_dir.is_dir():
        raise ModelError(f"-o {output_dir} is a file: name a folder for the merged model")
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise ModelError(f"-o {output_dir} exists and is not empty (add --overwrite to replace its files)")

    loaded = load_model(base, adapter_dir, trust_remote_code=trust_remote_code, dtype="fp32", device="cpu")
    merged = loaded.model.merge_and_unload()
    saved = _saved_dtype(loaded.config, dtype)
    merged = merged.to(getattr(torch, DTYPES[saved]))
    output_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(output_dir))
    copy_tokenizer_files(tokenizer_folder(base, adapter_dir), output_dir)  # the tokenizer the adapter trained with
    _keep_modelling_files(base, output_dir, loaded.config)
    parameters = sum(p.numel() for p in merged.parameters())
    files = sorted(p.name for p in output_dir.iterdir() if p.is_file())
    return MergeResult(output_dir, base, adapter_dir, saved, parameters, files,
                       loaded.notices + where_it_loads(output_dir, loaded.config))


def where_it_loads(output_dir: Path, config: dict) -> list[str]:
    """For a merged MiniCPM-1/2/4 folder that keeps OpenBMB's code: where that code runs, and the way that runs
    here (OpenBMB's modelling files fail to import under transformers 5)."""
    if not (config.get("auto_map") and model_class(config, trust_remote_code=True) is BUILT_IN):
        return []
    return [f"{output_dir} keeps OpenBMB's modelling code, which runs (trust_remote_code) only under transformers 4 "
            "(OpenBMB's scripts, vLLM); under transformers 5, as here, use `minicpm-train chat` / `eval` on it, or call "
            "minicpm_train.modeling.register_minicpm() before AutoModelForCausalLM.from_pretrained in Python"]
