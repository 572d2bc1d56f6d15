"""Load the model to train, offline from a local folder: full, LoRA, or QLoRA (4-bit nf4 base + LoRA)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from minicpm_data.errors import MinicpmError

# The attention projections OpenBMB's guide adapts (r 64, alpha 32, dropout 0.1), per architecture.
DEFAULT_LORA_TARGETS = {
    "minicpm3": ["q_a_proj", "kv_a_proj_with_mqa", "q_b_proj", "kv_b_proj"],  # multi-head latent attention
}
GUIDE_LORA_TARGETS = ["q_proj", "v_proj"]
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


class ModelError(MinicpmError):
    """The model folder cannot be loaded as asked."""


def read_model_config(path: str | Path, *, trust_remote_code: bool) -> dict:
    """The folder's ``config.json``, after checking the folder exists and whether it needs its own code."""
    folder = Path(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelError(f"model folder not found or has no config.json: {folder} (models load offline from a "
                         f"local folder: download it first, e.g. `hf download {_hub_repo(str(path))} --local-dir DIR`)")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    from transformers import CONFIG_MAPPING

    if trust_remote_code:
        _check_remote_code_files(folder, config)
    native = config.get("model_type") in CONFIG_MAPPING
    if not native and not trust_remote_code:
        needs = config.get("auto_map", {}).get("AutoModelForCausalLM", "its own modelling code")
        raise ModelError(f"{folder}: model type {config.get('model_type')!r} is not in transformers and runs "
                         f"{needs} from the folder; add --trust_remote_code if you trust that code")
    return config


def _check_remote_code_files(folder: Path, config: dict) -> None:
    """With --trust_remote_code, the modelling files ``auto_map`` names must be in the folder (we are offline)."""
    references = [ref for value in config.get("auto_map", {}).values()
                  for ref in (value if isinstance(value, list) else [value]) if ref and "--" not in ref]
    missing = sorted({ref.rsplit(".", 1)[0] + ".py" for ref in references} - {p.name for p in folder.glob("*.py")})
    if missing:
        raise ModelError(f"{folder}: --trust_remote_code runs the folder's own code, but {', '.join(missing)} "
                         f"{'is' if len(missing) == 1 else 'are'} not there; copy the model's .py files into it, or "
                         "drop --trust_remote_code to use transformers' own class for this model type")


def _hub_repo(name: str) -> str:
    """The hub repository a missing model name most likely means, for the download hint."""
    from minicpm_train.model_sizes import is_known_name

    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        return name  # already an org/name hub id
    stem = name.rstrip("/").rsplit("/", 1)[-1]
    return f"openbmb/{stem}" if is_known_name(stem) else "openbmb/MiniCPM4-0.5B"


def lora_targets(model, model_type: str, requested: str | None) -> list[str] | str:
    """Module names to adapt: the requested ones (checked), ``all-linear``, or the architecture's default."""
    if requested == "all-linear":
        return "all-linear"
    import torch

    linear_names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                    if isinstance(module, torch.nn.Linear) or type(module).__name__.startswith("Linear")}
    linear_names.discard("lm_head")
    wanted = ([t.strip() for t in requested.split(",") if t.strip()] if requested
              else DEFAULT_LORA_TARGETS.get(model_type, GUIDE_LORA_TARGETS))
    missing = [t for t in wanted if t not in linear_names]
    if missing:
        raise ModelError(f"LoRA target {', '.join(missing)} not in this {model_type} model; its linear layers are: "
                         f"{', '.join(sorted(linear_names))} (or use --lora_target all-linear)")
    return wanted


def disable_cpu_bf16_repacking(model) -> int:
    """Keep bitsandbytes from repacking 4-bit weights at eval on avx512_bf16 CPUs.

    The repacked op has no backward: after the first evaluation every LoRA gradient would be None
    (loss flat, grad_norm 0, no error).
    """
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def load_base_model(options, *, precision: str, device: str, quantize_4bit: bool = False):
    """The pretrained model from its local folder; 4-bit nf4 with double quantisation for QLoRA.

    ``options`` is a RunOptions. A frozen LoRA base sits in the compute dtype; fully trained weights
    stay float32 (the optimizer's masters under mixed precision).
    """
    import torch
    from transformers import AutoModelForCausalLM

    compute_dtype = getattr(torch, DTYPES[precision])
    kwargs = dict(local_files_only=True, trust_remote_code=options.trust_remote_code,
                  dtype=compute_dtype if options.use_lora else torch.float32)
    if quantize_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype)  # follows --bf16 / --fp16, not a fixed fp16
        kwargs["device_map"] = {"": device}
    return AutoModelForCausalLM.from_pretrained(options.model_name_or_path, **kwargs)


def prepare_4bit_for_training(model, *, device: str, gradient_checkpointing: bool):
    """peft's k-bit preparation (norms in float32, input grads, optional checkpointing) + the CPU fix."""
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    if device == "cpu":
        disable_cpu_bf16_repacking(model)
    return model


def add_lora(model, options, model_type: str):
    """Wrap ``model`` with a LoRA adapter from the run's options (targets per architecture)."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=options.lora_r, lora_alpha=options.lora_alpha, lora_dropout=options.lora_dropout,
                      target_modules=lora_targets(model, model_type, options.lora_target), task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        # peft 0.21 reads transformers 5's deprecated `is_gradient_checkpointing`; nothing for the user to change.
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return get_peft_model(model, lora)
