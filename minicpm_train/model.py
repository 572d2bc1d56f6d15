"""Load the model to train, offline from a local folder: full, LoRA, or QLoRA (4-bit nf4 base + LoRA)."""

from __future__ import annotations

import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

from minicpm_data.errors import MinicpmError
from minicpm_data.model_files import (
    DOWNLOAD_AGAIN,
    Finding,
    Tensor,
    and_more,
    architecture_findings,
    model_folder_findings,
    require,
)
from minicpm_data.tokenizer import is_hub_id

# The attention projections OpenBMB's guide adapts (r 64, alpha 32, dropout 0.1), per architecture.
DEFAULT_LORA_TARGETS = {
    "minicpm3": ["q_a_proj", "kv_a_proj_with_mqa", "q_b_proj", "kv_b_proj"],  # multi-head latent attention
}
GUIDE_LORA_TARGETS = ["q_proj", "v_proj"]
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


class ModelError(MinicpmError):
    """The model folder cannot be loaded as asked."""


@dataclass(frozen=True)
class ModelClass:
    """Which implementation a model folder loads with."""

    source: str  # "built-in" (this project's), "transformers" (its own class) or "remote code" (the folder's)
    name: str  # the class, or the folder's auto_map reference

    def __str__(self) -> str:
        what = {"built-in": "the built-in MiniCPM class", "transformers": "transformers' own class",
                "remote code": "the folder's own code (--trust_remote_code)"}[self.source]
        return f"{self.name}: {what}"


BUILT_IN = ModelClass("built-in", "minicpm_train.modeling.MiniCPMForCausalLM")


def model_class(config: dict, *, trust_remote_code: bool) -> ModelClass | None:
    """The class ``AutoModelForCausalLM`` will use for a folder's config (None: nothing can load it).

    ``model_type "minicpm"`` (MiniCPM-1/2/4) always loads with the built-in class, even with
    ``--trust_remote_code``; otherwise the folder's own code wins when it is trusted, as in transformers.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from minicpm_train.modeling import MODEL_TYPE

    model_type = config.get("model_type")
    remote = config.get("auto_map", {}).get("AutoModelForCausalLM")
    if model_type == MODEL_TYPE:
        return BUILT_IN
    if remote and trust_remote_code:
        return ModelClass("remote code", remote)
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return ModelClass("transformers", MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
    return ModelClass("remote code", remote) if remote else None


def read_model_config(path: str | Path, *, trust_remote_code: bool) -> dict:
    """The folder's ``config.json``, after :func:`check_model_folder` found nothing wrong with the folder.

    A folder of a built-in model type gets the built-in class registered with the Auto classes here, so
    everything that loads it afterwards (model, tokenizer, config) runs none of the folder's own code.
    """
    folder = Path(path)
    if not folder.exists() and is_hub_id(str(path)):
        raise ModelError(f"{path} is not a local folder: models load offline from one; download it first "
                         f"(`hf download {path} --local-dir DIR`) and pass DIR")
    config, findings = check_model_folder(folder, trust_remote_code=trust_remote_code)
    require(findings)
    return config


def check_model_folder(folder: Path, *, trust_remote_code: bool) -> tuple[dict | None, list[Finding]]:
    """The one check of a model folder that every command loading one runs first (``doctor --model`` shows all
    its findings): ``minicpm_data.model_files``' checks of config.json, the tokenizer's files and the weights;
    then the class that will load it (a :class:`ModelError` when none can); then the weights' shapes against
    the model that class builds from config.json, on the meta device (nothing allocated, seconds for an 8B).

    Returns the config (None when it is unreadable) and the findings.
    """
    config, tensors, findings = model_folder_findings(folder)
    if config is None or findings:
        return config, findings
    loads_with = model_class(config, trust_remote_code=trust_remote_code)
    if loads_with is BUILT_IN:
        _check_built_in_config(folder, config)
    elif trust_remote_code:
        _check_remote_code_files(folder, config)
    if loads_with is None or (loads_with.source == "remote code" and not trust_remote_code):
        needs = loads_with.name if loads_with else "its own modelling code"
        raise ModelError(f"{folder}: model type {config.get('model_type')!r} is not in transformers and runs "
                         f"{needs} from the folder; add --trust_remote_code if you trust that code")
    if tensors is None:  # .bin weights: their shapes need torch to read
        tensors = _bin_tensors(folder)
        findings += architecture_findings(folder, config, tensors)
    return config, findings + (_shape_findings(folder, config, tensors, trust_remote_code) if not findings else [])


def _bin_tensors(folder: Path) -> dict[str, Tensor]:
    """Names and shapes of ``pytorch_model*.bin`` weights, read onto the meta device (no tensor data is read)."""
    import torch

    tensors = {}
    for path in sorted(folder.glob("pytorch_model*.bin")):
        state = torch.load(path, map_location="meta", weights_only=True, mmap=True)
        tensors.update({name: Tensor(str(t.dtype), tuple(t.shape)) for name, t in state.items()
                        if isinstance(t, torch.Tensor)})
    return tensors


def _shape_findings(folder: Path, config: dict, tensors: dict[str, Tensor], trust_remote_code: bool) -> list[Finding]:
    """The model config.json describes, built on the meta device, against the weights' shapes (a mismatch would
    stop transformers' load with a traceback). Tensors only one side has are left to the load report."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = folder / "config.json"
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            built = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code, local_files_only=True)
            model = AutoModelForCausalLM.from_config(built, trust_remote_code=trust_remote_code)
    except Exception as error:  # any reason the config builds no model is the config's problem, said in one line
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        return [Finding(path, f"describes no model transformers can build: {reason}", "correct it, or download it "
                                                                                       "again")]
    for name, value in model.state_dict().items():
        held = tensors.get(name)
        if held is not None and tuple(value.shape) != held.shape:
            return [Finding(path, f"describes {name} as {list(value.shape)} but the weights hold {list(held.shape)}",
                            f"use the config.json that came with these weights, or {DOWNLOAD_AGAIN}")]
    return []


def _check_built_in_config(folder: Path, config: dict) -> None:
    """Register the built-in MiniCPM class and check it can build this config (one line if not)."""
    from minicpm_train.modeling import MiniCPMConfig, register_minicpm

    register_minicpm()
    if (config.get("num_experts") or 1) > 1:
        raise ModelError(f"{folder}: MiniCPM-MoE (num_experts {config['num_experts']}) is not supported: the built-in "
                         "MiniCPM class implements the dense MiniCPM-1/2/4 models, and OpenBMB's own code for it "
                         "does not run under transformers 5")
    try:
        MiniCPMConfig.from_dict(config)
    except (ValueError, TypeError) as error:
        raise ModelError(f"{folder}: config.json does not describe a MiniCPM model the built-in class can build: "
                         f"{error}") from None


def loading_notices(config: dict, *, trust_remote_code: bool) -> list[str]:
    """What the user should know about how a folder loads: the built-in class replacing the folder's code
    asked for by --trust_remote_code, and dense attention replacing MiniCPM4's sparse attention."""
    if model_class(config, trust_remote_code=trust_remote_code) is not BUILT_IN:
        return []
    from types import SimpleNamespace

    from minicpm_train.modeling import sparse_attention_notice

    notices = []
    if trust_remote_code and config.get("auto_map"):
        notices.append(f"--trust_remote_code: model type {config['model_type']!r} loads with the built-in MiniCPM "
                       f"class; the folder's own {config['auto_map'].get('AutoModelForCausalLM', 'code')} is not run")
    sparse = sparse_attention_notice(SimpleNamespace(sparse_config=config.get("sparse_config")))
    return notices + ([sparse] if sparse else [])


def from_pretrained(folder: str | Path, **kwargs):
    """``AutoModelForCausalLM.from_pretrained``, offline; the sparse-attention notice is left to
    :func:`loading_notices` (shown once with the run's other notices, not as a Python warning)."""
    from transformers import AutoModelForCausalLM

    from minicpm_train.modeling import SparseAttentionNotice

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SparseAttentionNotice)
        model, report = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True,
                                                             output_loading_info=True, **kwargs)
    missing = sorted(report["missing_keys"])
    if missing:  # transformers' load report names them, then carries on with random weights in their place
        raise ModelError(f"{folder}: the weights lack {and_more(missing)}, which {type(model).__name__} would fill "
                         "with random weights; download the weights again")
    return model


def copy_tokenizer_files(source: str | Path, target: str | Path) -> None:
    """Make ``target``'s tokenizer files those of ``source``, byte for byte (the model's config excluded).

    Reloading them gives exactly the tokenizer that was used. ``save_pretrained`` does not round-trip a
    tokenizer converted from a SentencePiece ``tokenizer.model`` (MiniCPM-1/2/4 downloads): it drops
    ``legacy``, and the reloaded one splits the text after special tokens differently from training.
    """
    from minicpm_data.tokenizer import TOKENIZER_FILES

    source, target = Path(source), Path(target)
    if source.resolve() == target.resolve():
        return
    for name in TOKENIZER_FILES:
        if name in ("config.json", "generation_config.json"):
            continue
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)
        else:
            (target / name).unlink(missing_ok=True)  # a file the source lacks would change how it loads


def _check_remote_code_files(folder: Path, config: dict) -> None:
    """With --trust_remote_code, the modelling files ``auto_map`` names must be in the folder (we are offline)."""
    references = [ref for value in config.get("auto_map", {}).values()
                  for ref in (value if isinstance(value, list) else [value]) if ref and "--" not in ref]
    missing = sorted({ref.rsplit(".", 1)[0] + ".py" for ref in references} - {p.name for p in folder.glob("*.py")})
    if missing:
        raise ModelError(f"{folder}: --trust_remote_code runs the folder's own code, but {', '.join(missing)} "
                         f"{'is' if len(missing) == 1 else 'are'} not there; copy the model's .py files into it, or "
                         "drop --trust_remote_code to use transformers' own class for this model type")


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

    compute_dtype = getattr(torch, DTYPES[precision])
    kwargs = dict(trust_remote_code=options.trust_remote_code, dtype=compute_dtype if options.use_lora else torch.float32)
    if quantize_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype)  # follows --bf16 / --fp16, not a fixed fp16
        kwargs["device_map"] = {"": device}
    return from_pretrained(options.model_name_or_path, **kwargs)


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
