"""GGUF export for llama.cpp, Ollama and LM Studio: a merged or fully fine-tuned model folder, or a LoRA adapter.

Built on ``gguf``, llama.cpp's own Python library (its writer, tensor-name maps, token types and quantizers);
the model-specific steps follow llama.cpp's converter (see :mod:`.architectures`). A model's GGUF carries the
tokenizer training used and the chat template the run trained on (:mod:`.vocabulary`, :mod:`.chat_format`); an
Ollama ``Modelfile`` is written beside it. A LoRA adapter becomes a GGUF LoRA for llama.cpp's ``--lora``, laid out
against the base given on the command line (a GGUF of the base, or the base folder), never against the path a run
recorded at training time.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from minicpm_train.gguf_export.architectures import EXPORTABLE, Architecture
from minicpm_train.gguf_export.chat_format import gguf_chat_template, modelfile, trained_layout
from minicpm_train.gguf_export.vocabulary import adds_bos, build_vocabulary
from minicpm_train.gguf_export.weights import (
    OUTTYPES,
    ExportError,
    PlannedTensor,
    WeightFiles,
    resolve_outtype,
    tensor_type,
    write_gguf,
    write_text,
)

__all__ = ["EXPORTABLE", "OUTTYPES", "ExportError", "ExportResult", "export_lora", "export_model"]


@dataclass
class ExportResult:
    path: Path
    modelfile: Path
    architecture: str
    outtype: str
    tensors: int
    size: int
    notices: list[str] = field(default_factory=list)


def export_model(folder: str | Path, output: str | Path, *, outtype: str = "auto", force: bool = False,
                 on_progress=None) -> ExportResult:
    """Write the model in ``folder`` (config.json, weights, tokenizer) as a GGUF at ``output``, and its Modelfile.

    ``on_progress(done_bytes, total_bytes)`` follows the tensor data as it is written.
    """
    from minicpm_data.tokenizer import load_tokenizer
    from minicpm_train.inference import run_options

    folder, output = Path(folder), Path(output)
    modelfile_path = _check_outputs(output, force)
    if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        raise ExportError(f"{folder} is a LoRA run's output: export the adapter with --lora --base BASE (the base as "
                          "a GGUF, or its folder), or merge it first with minicpm-train merge")
    config = _read_config(folder)
    architecture = Architecture.of(config, str(folder))
    weights = WeightFiles(folder)
    names = weights.names()
    if not architecture.tied and "lm_head.weight" not in names:
        raise ExportError(f"{folder}: config.json does not tie the output head to the embeddings, but the weights "
                          "have no lm_head.weight")
    outtype = resolve_outtype(outtype, {weights.dtype(name) for name in names})
    tokenizer = load_tokenizer(str(folder))
    vocab = build_vocabulary(tokenizer, config["vocab_size"])
    layout = trained_layout(tokenizer, run_options(folder))

    writer = _writer(architecture.name, folder.name)
    architecture.write_hparams(writer)
    _write_file_type(writer, outtype)
    vocab.write(writer, gguf_chat_template(tokenizer, layout, vocab.add_bos))

    tensors = []
    for name in names:
        gguf_name = architecture.tensor_name(name)
        if gguf_name is not None:
            shape = weights.shape(name)
            tensors.append(PlannedTensor(gguf_name, shape, tensor_type(outtype, shape),
                                         partial(_checkpoint_tensor, weights, name, architecture.row_permutation(name))))
    for name, values in architecture.extra_tensors().items():
        tensors.append(PlannedTensor(name, (len(values),), tensor_type(outtype, (len(values),)),
                                     partial(_float32, values)))
    size = write_gguf(output, writer, tensors, on_progress)
    write_text(modelfile_path, modelfile(tokenizer, layout, vocab.add_bos, model=f"./{output.name}"))
    return ExportResult(output, modelfile_path, architecture.name, outtype, len(tensors), size, architecture.notices)


def export_lora(adapter: str | Path, base: str | Path | None, output: str | Path, *, outtype: str = "auto",
                force: bool = False, on_progress=None) -> ExportResult:
    """Write a LoRA run's adapter as a GGUF LoRA for the base ``base`` (a GGUF file or the base model's folder)."""
    import gguf

    from minicpm_data.tokenizer import load_tokenizer
    from minicpm_train.inference import run_options

    adapter, output = Path(adapter), Path(output)
    adapter_config = _read_adapter_config(adapter)
    recorded = adapter_config.get("base_model_name_or_path")
    if base is None:
        raise ExportError(f"--lora needs --base: a GGUF of the base model (export its folder first) or the base "
                          f"folder; the path the run recorded ({recorded}) is where it was trained, not used here")
    base = Path(base)
    modelfile_path = _check_outputs(output, force)
    architecture, base_shapes = _base_layout(base)
    lora = _lora_matrices(adapter, adapter_config, architecture, base_shapes, base)
    outtype = resolve_outtype(outtype, {str(matrix.dtype) for pair in lora.values() for matrix in pair})

    writer = _writer(architecture.name, adapter.name)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(adapter_config["lora_alpha"]))
    tensors = []
    for gguf_name, (lora_a, lora_b) in lora.items():
        for suffix, matrix in (("lora_a", lora_a), ("lora_b", lora_b)):
            shape = tuple(matrix.shape)
            tensors.append(PlannedTensor(f"{gguf_name}.{suffix}", shape, tensor_type(outtype, shape),
                                         partial(_numpy, matrix)))
    size = write_gguf(output, writer, tensors, on_progress)

    notices = ([f"the adapter was trained on {recorded}; it is laid out against --base {base}"]
               if recorded and Path(recorded).resolve() != base.resolve() else [])
    if base.is_dir():
        notices.append(f"the Modelfile's FROM names the folder {base}: Ollama needs the base as GGUF; export it "
                       "with minicpm-train export and put that file's path there")
    from_line = f"./{base.name}" if base.parent.resolve() == output.parent.resolve() else str(base.resolve())
    tokenizer_dir = adapter if (adapter / "tokenizer_config.json").is_file() else base if base.is_dir() else None
    if tokenizer_dir is None:
        text = f"FROM {from_line}\nADAPTER ./{output.name}\n"  # the base GGUF's own template applies
    else:
        tokenizer = load_tokenizer(str(tokenizer_dir))
        text = modelfile(tokenizer, trained_layout(tokenizer, run_options(adapter)), adds_bos(tokenizer),
                         model=from_line, adapter=f"./{output.name}")
    write_text(modelfile_path, text)
    return ExportResult(output, modelfile_path, architecture.name, outtype, len(tensors), size,
                        architecture.notices + notices)


# --- helpers -----------------------------------------------------------------------------------------------------


def _check_outputs(output: Path, force: bool) -> Path:
    """The Modelfile's path beside ``output``; refuses to replace either without ``force``."""
    if output.suffix != ".gguf":
        raise ExportError(f"-o {output}: name the output FILE.gguf")
    if output.is_dir():
        raise ExportError(f"-o {output} is a folder: name the output FILE.gguf")
    if not output.parent.is_dir():
        raise ExportError(f"-o {output}: folder {output.parent} does not exist")
    modelfile_path = output.with_suffix(".Modelfile")
    existing = [path for path in (output, modelfile_path) if path.exists()]
    if existing and not force:
        raise ExportError(f"{existing[0]} exists: add --force to replace it")
    return modelfile_path


def _read_config(folder: Path) -> dict:
    if not (folder / "config.json").is_file():
        raise ExportError(f"model folder not found or has no config.json: {folder}")
    return json.loads((folder / "config.json").read_text(encoding="utf-8"))


def _writer(arch_name: str, name: str):
    import gguf

    writer = gguf.GGUFWriter(None, arch_name)
    writer.add_name(name)
    return writer


def _write_file_type(writer, outtype: str) -> None:
    import gguf

    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _checkpoint_tensor(weights: WeightFiles, name: str, rows):
    tensor = weights.load(name)
    return _numpy(tensor if rows is None else tensor[rows])


def _numpy(tensor):
    import torch

    return tensor.detach().to(torch.float32).contiguous().numpy()


def _float32(values: list[float]):
    import numpy as np

    return np.asarray(values, dtype=np.float32)


def _read_adapter_config(adapter: Path) -> dict:
    if not (adapter / "adapter_config.json").is_file():
        raise ExportError(f"--lora: {adapter} has no adapter_config.json (a LoRA run's output folder, or one of its "
                          "checkpoint-N folders)")
    config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    if config.get("peft_type", "LORA") != "LORA":
        raise ExportError(f"{adapter}: a {config['peft_type']} adapter cannot be exported: GGUF adapters are LoRA")
    if config.get("use_dora"):
        raise ExportError(f"{adapter}: a DoRA adapter cannot be exported: llama.cpp's --lora applies plain LoRA; "
                          "merge it (minicpm-train merge) and export the merged folder")
    if config.get("modules_to_save"):
        raise ExportError(f"{adapter}: the adapter also trains whole modules ({', '.join(config['modules_to_save'])}),"
                          " which a GGUF LoRA cannot hold: merge it and export the merged folder")
    return config


def _base_layout(base: Path) -> tuple[Architecture, dict[str, tuple[int, ...]]]:
    """The base's architecture and its tensors' shapes by llama.cpp name (PyTorch order)."""
    if base.is_dir():
        architecture = Architecture.of(_read_config(base), str(base))
        weights = WeightFiles(base)
        shapes = {}
        for name in weights.names():
            gguf_name = architecture.tensor_name(name)
            if gguf_name is not None:
                shapes[gguf_name] = weights.shape(name)
        return architecture, shapes
    if base.suffix != ".gguf" or not base.is_file():
        raise ExportError(f"--base {base}: give the base model as a .gguf file or its folder")
    import gguf

    reader = gguf.GGUFReader(str(base))

    def value(key: str, default=None):
        return reader.fields[key].contents() if key in reader.fields else default

    if value("general.type", "model") != "model":
        raise ExportError(f"--base {base} is a GGUF {value('general.type')}, not a model")
    arch = value("general.architecture")
    model_type = {"minicpm": "minicpm", "minicpm3": "minicpm3", "llama": "llama"}.get(arch)
    if model_type is None:
        raise ExportError(f"--base {base}: GGUF architecture {arch!r} is not one minicpm-train exports")
    config = {"model_type": model_type, "num_hidden_layers": value(f"{arch}.block_count"),
              "hidden_size": value(f"{arch}.embedding_length"),
              "num_attention_heads": value(f"{arch}.attention.head_count"),
              "num_key_value_heads": value(f"{arch}.attention.head_count_kv"),
              "head_dim": value(f"{arch}.attention.key_length"),
              "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors)}
    shapes = {tensor.name: tuple(int(d) for d in reversed(tensor.shape)) for tensor in reader.tensors}
    return Architecture(model_type, config), shapes


def _lora_matrices(adapter: Path, config: dict, architecture: Architecture, base_shapes: dict, base: Path) -> dict:
    """{llama.cpp tensor name: (A, B)} with B's rows in llama.cpp's order and the module's own scaling folded into B
    where llama.cpp's ``alpha / rank`` would differ from peft's (rsLoRA, per-module alpha or rank)."""
    from peft.utils import load_peft_weights
    from peft.utils.other import get_pattern_key

    halves: dict[str, dict[str, object]] = {}
    for key, tensor in load_peft_weights(str(adapter), device="cpu").items():
        module, _, rest = key.removeprefix("base_model.model.").rpartition(".lora_")
        if rest not in ("A.weight", "B.weight"):
            raise ExportError(f"{adapter}: adapter tensor {key} is not a LoRA A or B matrix of a linear layer; a GGUF "
                              "LoRA cannot hold it (merge the adapter and export the merged folder)")
        halves.setdefault(module, {})[rest[0]] = tensor
    trained_on = f"it was trained on another model ({config.get('base_model_name_or_path')})"
    alpha = float(config["lora_alpha"])
    result = {}
    for module, pair in halves.items():
        if set(pair) != {"A", "B"}:
            raise ExportError(f"{adapter}: {module} has only half of its LoRA matrices")
        lora_a, lora_b = pair["A"], pair["B"]
        weight = module + ".weight"
        if weight == "lm_head.weight" and architecture.tied:
            raise ExportError(f"{adapter} adapts lm_head, which {base} ties to the embeddings: llama.cpp cannot "
                              "apply it; merge the adapter and export the merged folder")
        gguf_name = architecture.tensor_name(weight)
        if not architecture.lora_applies(gguf_name):
            raise ExportError(f"{adapter} adapts {module}, but llama.cpp's minicpm3 applies no LoRA to the latent "
                              "attention projections (q_a_proj, q_b_proj, kv_a_proj_with_mqa, kv_b_proj): --lora would "
                              "silently ignore it; merge the adapter (minicpm-train merge) and export the merged folder")
        expected = base_shapes.get(gguf_name)
        if expected is None:
            raise ExportError(f"the adapter {adapter} adapts {module}, which {base} does not have: {trained_on}")
        if expected != (lora_b.shape[0], lora_a.shape[1]):
            raise ExportError(f"the adapter {adapter} adapts {module} as {lora_a.shape[1]} -> {lora_b.shape[0]} "
                              f"features, but it is {expected[1]} -> {expected[0]} in {base}: {trained_on}")
        rank = lora_a.shape[0]
        patterns = config.get("alpha_pattern") or {}
        module_alpha = float(patterns.get(get_pattern_key(patterns.keys(), module), alpha))
        peft_scale = module_alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        if not math.isclose(peft_scale, alpha / rank):
            lora_b = lora_b * (peft_scale / (alpha / rank))
        rows = architecture.row_permutation(weight)
        result[gguf_name] = (lora_a, lora_b if rows is None else lora_b[rows])
    if not result:
        raise ExportError(f"{adapter}: the adapter has no LoRA matrices")
    return result
