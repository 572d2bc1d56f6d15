"""Load a trained model for merge, chat and eval: a model folder, optionally with a LoRA adapter, offline.

``MODEL`` may also be a LoRA run's output folder on its own (``adapter_config.json`` and no
``config.json``): its base is then read from the adapter's config.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from minicpm_data.model_files import Finding, adapter_findings, folder_finding, read_json_file, require
from minicpm_train.model import DTYPES, ModelError, from_pretrained, loading_notices, read_model_config

_LORA_WEIGHT = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")  # a saved LoRA A or B matrix


@dataclass
class LoadedModel:
    model: object  # a transformers model, or a peft PeftModel when an adapter is applied
    tokenizer: object
    base: Path
    adapter: Path | None
    config: dict
    notices: list[str] = field(default_factory=list)


def resolve_folders(model: str | Path, adapter: str | Path | None) -> tuple[Path, Path | None]:
    """(base model folder, adapter folder or None), accepting an adapter folder given as the model."""
    model = Path(model)
    if adapter is None and (model / "adapter_config.json").is_file() and not (model / "config.json").is_file():
        require(adapter_findings(model))
        base = read_json_file(model / "adapter_config.json")[0].get("base_model_name_or_path")
        if not base or not (Path(base) / "config.json").is_file():
            raise ModelError(f"{model} is a LoRA adapter whose base model {base!r} is not a local folder here; "
                             "pass the base folder as MODEL and this folder as --adapter")
        return Path(base), model
    if adapter is not None:
        adapter = Path(adapter)
        if not (adapter / "adapter_config.json").is_file():
            require([folder_finding(adapter)])
            raise ModelError(f"--adapter {adapter}: no adapter_config.json there (a LoRA run's output folder, or "
                             "one of its checkpoint-N folders)")
        require(adapter_findings(adapter))
    return model, adapter


def check_adapter(model, base: Path, adapter: Path) -> list[str]:
    """Refuse, in one line, an adapter trained on another architecture or size; a notice for another base folder.

    Every adapted layer must exist in ``model`` with the adapter's input and output sizes, and every
    layer its targets match must have weights: peft would fail with a traceback, or silently skip or
    randomly initialise layers of a deeper or shallower model.
    """
    from peft import PeftConfig
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils import load_peft_weights

    config = PeftConfig.from_pretrained(str(adapter))
    trained_on = f"it was trained on another model ({config.base_model_name_or_path})"
    sizes: dict[str, list[int | None]] = {}  # adapted layer -> [input, output] features (lora_A, lora_B)
    for key, tensor in load_peft_weights(str(adapter), device="cpu").items():
        if match := _LORA_WEIGHT.fullmatch(key):
            name, half = match.groups()
            in_out = sizes.setdefault(name, [None, None])
            if half == "A":
                in_out[0] = tensor.shape[1]
            else:
                in_out[1] = tensor.shape[0]
    modules = dict(model.named_modules())
    for name, in_out in sizes.items():
        module = modules.get(name)
        if module is None:
            raise ModelError(f"the adapter {adapter} adapts {name}, which {base} does not have: {trained_on}")
        have = [getattr(module, "in_features", None), getattr(module, "out_features", None)]
        if None not in have and have != in_out:
            raise ModelError(f"the adapter {adapter} adapts {name} as {in_out[0]} -> {in_out[1]} features, but it is "
                             f"{have[0]} -> {have[1]} in {base}: {trained_on}")
    untrained = [name for name in modules if name not in sizes and check_target_module_exists(config, name)]
    if untrained:
        raise ModelError(f"{base} has {untrained[0]}, which the adapter {adapter} targets but has no weights for: "
                         f"{trained_on}")
    recorded = config.base_model_name_or_path
    if recorded and Path(recorded).resolve() != base.resolve():
        return [f"the adapter {adapter} was trained on {recorded}; applying it to {base} (its adapted layers fit)"]
    return []


def default_dtype(device: str) -> str:
    """fp32 on CPU; bf16 on GPUs that have it, else fp16."""
    if device == "cpu":
        return "fp32"
    import torch

    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def tokenizer_folder(base: Path, adapter: Path | None) -> Path:
    """Where the tokenizer comes from: the run's copy next to its adapter, else the base model's."""
    return adapter if adapter is not None and (adapter / "tokenizer_config.json").is_file() else base


def load_tokenizer_for(base: Path, adapter: Path | None, *, trust_remote_code: bool):
    """The tokenizer of :func:`tokenizer_folder`."""
    from minicpm_data.tokenizer import load_tokenizer

    return load_tokenizer(str(tokenizer_folder(base, adapter)), trust_remote_code=trust_remote_code)


def load_model(model: str | Path, adapter: str | Path | None = None, *, trust_remote_code: bool = False,
               dtype: str | None = None, device: str | None = None) -> LoadedModel:
    """The base model with the adapter applied (not merged), in eval mode, plus its tokenizer."""
    import torch
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # a bar per load is noise in a chat terminal
    base, adapter = resolve_folders(model, adapter)
    config = read_model_config(base, trust_remote_code=trust_remote_code)
    device = device or default_device()
    dtype = dtype or default_dtype(device)
    if dtype not in DTYPES:
        raise ModelError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    loaded = from_pretrained(base, dtype=getattr(torch, DTYPES[dtype]), trust_remote_code=trust_remote_code)
    notices = loading_notices(config, trust_remote_code=trust_remote_code)
    if adapter is not None:
        from peft import PeftModel

        notices += check_adapter(loaded, base, adapter)
        loaded = PeftModel.from_pretrained(loaded, str(adapter), is_trainable=False)
    loaded.to(device).eval()
    tokenizer = load_tokenizer_for(base, adapter, trust_remote_code=trust_remote_code)
    return LoadedModel(loaded, tokenizer, base, adapter, config, notices)


def stop_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends an answer: the tokenizer's and generation config's eos, and ChatML's <|im_end|>."""
    ids: list[int] = []
    generation_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (tokenizer.eos_token_id, generation_eos):
        ids += value if isinstance(value, list) else [value] if value is not None else []
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.append(im_end)
    return sorted(set(ids))


def training_options(loaded: LoadedModel) -> dict:
    """The options a run trained with (its ``run_config.json``), so eval and chat render as it did."""
    return run_options(loaded.adapter, loaded.base)


def run_options(*folders: Path | None) -> dict:
    """The options in the first of ``folders`` that has a ``run_config.json``; {} when none has (a plain model)."""
    for folder in folders:
        if folder is not None and (folder / "run_config.json").is_file():
            record, finding = read_json_file(folder / "run_config.json")
            options = (record or {}).get("options")
            if finding or not isinstance(options, dict):
                fix = ("pass --template and --model_max_length yourself, and restore the file from the run (or "
                       "delete it)")
                require([Finding(folder / "run_config.json", finding.problem if finding else "has no run options",
                                 fix)])
            return options
    return {}
