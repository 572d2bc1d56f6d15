"""What each exportable architecture writes: llama.cpp's hyperparameter keys, tensor names and tensor layout.

Follows llama.cpp's ``convert_hf_to_gguf.py`` (``conversion/minicpm.py``, ``conversion/llama.py`` at the commit
llama-cpp-python 0.3.36 bundles) with ``gguf``'s tensor-name maps, and goes further where the converter would not
reproduce the model transformers runs:

- ``minicpm`` (MiniCPM-1/2, MiniCPM4): the three muP scalings as ``minicpm.embedding_scale`` /
  ``residual_scale`` / ``logit_scale``; Q and K rows permuted for llama.cpp's rotary layout (GQA: K by its own
  head count); LongRoPE as ``rope_factors_long`` / ``rope_factors_short`` plus the original context length and
  the attention scaling ``sqrt(1 + ln(max / original) / ln(original))`` (the converter writes neither, so a model
  whose ``max_position_embeddings`` exceeds the original one runs with the wrong factors and scale). OpenBMB's
  code builds its rotary table for ``max_position_embeddings`` positions and so uses the long factors at every
  length once that exceeds the original context; llama.cpp picks by the context size instead, so such a model's
  short factors are written as the long ones, which is what OpenBMB's code computes.
- ``minicpm3`` (MiniCPM3): latent attention tensors as they are; llama.cpp's graph hard-codes MiniCPM3-4B's
  scalings, so a config with others is refused rather than exported wrong.
- ``llama`` (MiniCPM5, MiniCPM-2B ``-llama-format``): Q/K permuted, ``rope_freqs`` for Llama-3 RoPE scaling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from minicpm_train.gguf_export.weights import ExportError

EXPORTABLE = {"minicpm": "MiniCPM-1/2 and MiniCPM4", "minicpm3": "MiniCPM3", "llama": "MiniCPM5 and other Llamas"}
# llama.cpp's minicpm3 graph uses these constants instead of reading the config (src/models/minicpm3.cpp).
MINICPM3_SCALINGS = {"scale_emb": 12.0, "scale_depth": 1.4, "dim_model_base": 256}


def _names() -> str:
    return ", ".join(f"{name} ({models})" for name, models in EXPORTABLE.items())


def rope_settings(config: dict) -> dict:
    """RoPE settings however the config writes them: ``rope_scaling`` (OpenBMB, transformers 4) or transformers 5's
    ``rope_parameters``; the type under ``rope_type`` or ``type``, ``default`` for none."""
    merged = {**(config.get("rope_parameters") or {}), **(config.get("rope_scaling") or {})}
    merged["rope_type"] = merged.get("rope_type") or merged.get("type") or "default"
    merged.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    return merged


@dataclass
class Architecture:
    """One folder's ``config.json`` read as a llama.cpp architecture."""

    model_type: str
    config: dict
    notices: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, config: dict, where: str) -> Architecture:
        model_type = config.get("model_type")
        if model_type not in EXPORTABLE:
            raise ExportError(f"{where}: model type {model_type!r} cannot be exported to GGUF; minicpm-train export "
                              f"writes {_names()}")
        if (config.get("num_experts") or 1) > 1:
            raise ExportError(f"{where}: MiniCPM-MoE (num_experts {config['num_experts']}) cannot be exported: "
                              "only dense models are supported")
        architecture = cls(model_type, config)
        architecture.check(where)
        return architecture

    @property
    def gguf_arch(self):
        import gguf

        return {"minicpm": gguf.MODEL_ARCH.MINICPM, "minicpm3": gguf.MODEL_ARCH.MINICPM3,
                "llama": gguf.MODEL_ARCH.LLAMA}[self.model_type]

    @property
    def name(self) -> str:
        import gguf

        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]

    @property
    def layers(self) -> int:
        return self.config["num_hidden_layers"]

    @property
    def heads(self) -> int:
        return self.config["num_attention_heads"]

    @property
    def kv_heads(self) -> int:
        return self.config.get("num_key_value_heads") or self.heads

    @property
    def head_dim(self) -> int:
        return self.config.get("head_dim") or self.config["hidden_size"] // self.heads

    @property
    def tied(self) -> bool:
        """Whether the output head is the embedding matrix (OpenBMB's MiniCPM default ties; Llama's does not)."""
        return bool(self.config.get("tie_word_embeddings", self.model_type != "llama"))

    def check(self, where: str) -> None:
        rope = rope_settings(self.config)
        supported = {"minicpm": ("default", "linear", "dynamic", "longrope"), "minicpm3": ("default", "longrope"),
                     "llama": ("default", "linear", "llama3")}[self.model_type]
        if rope["rope_type"] not in supported:
            raise ExportError(f"{where}: RoPE scaling {rope['rope_type']!r} is not exported for {self.model_type} "
                              f"(supported: {', '.join(supported)})")
        if rope["rope_type"] == "dynamic":
            self.notices.append(f"dynamic NTK RoPE changes only past max_position_embeddings "
                                f"({self.config.get('max_position_embeddings')}); llama.cpp has no such scaling and "
                                "runs plain RoPE, identical up to that length")
        if self.model_type == "minicpm3":
            wrong = {key: self.config.get(key) for key, value in MINICPM3_SCALINGS.items()
                     if not math.isclose(float(self.config.get(key, float("nan"))), value)}
            if wrong:
                have = ", ".join(f"{key} {value}" for key, value in wrong.items())
                raise ExportError(f"{where}: llama.cpp's minicpm3 runs MiniCPM3-4B's scalings "
                                  f"({', '.join(f'{k} {v:g}' for k, v in MINICPM3_SCALINGS.items())}); this model has "
                                  f"{have}, which it would ignore")

    # --- key/values --------------------------------------------------------------------------------------------

    def write_hparams(self, writer) -> None:
        """The architecture's ``{arch}.*`` keys."""
        config = self.config
        rope = rope_settings(config)
        writer.add_context_length(config["max_position_embeddings"])
        writer.add_embedding_length(config["hidden_size"])
        writer.add_block_count(self.layers)
        writer.add_feed_forward_length(config["intermediate_size"])
        writer.add_head_count(self.heads)
        writer.add_head_count_kv(self.kv_heads)
        writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
        writer.add_rope_freq_base(float(rope["rope_theta"]))
        writer.add_vocab_size(config["vocab_size"])
        if self.model_type == "minicpm3":
            if config.get("q_lora_rank") is not None:
                writer.add_q_lora_rank(config["q_lora_rank"])
            writer.add_kv_lora_rank(config["kv_lora_rank"])
            writer.add_key_length(config["qk_nope_head_dim"] + config["qk_rope_head_dim"])
            writer.add_value_length(config["v_head_dim"])
            writer.add_rope_dimension_count(config["qk_rope_head_dim"])
        else:
            writer.add_rope_dimension_count(self.head_dim)
            if config.get("head_dim"):
                writer.add_key_length(self.head_dim)
                writer.add_value_length(self.head_dim)
        if self.model_type == "minicpm":
            writer.add_embedding_scale(float(config.get("scale_emb", 1)))
            writer.add_residual_scale(float(config.get("scale_depth", 1)) / math.sqrt(self.layers))
            writer.add_logit_scale(config["hidden_size"] / float(config.get("dim_model_base", 1)))
        self._write_rope_scaling(writer, rope)

    def _write_rope_scaling(self, writer, rope: dict) -> None:
        import gguf

        if rope["rope_type"] == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(rope["factor"]))
        elif rope["rope_type"] == "longrope":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
            writer.add_rope_scaling_orig_ctx_len(self._original_context)
            writer.add_rope_scaling_attn_factors(self._longrope_attention_scaling(rope))

    @property
    def _original_context(self) -> int:
        rope = rope_settings(self.config)
        return int(rope.get("original_max_position_embeddings")
                   or self.config.get("original_max_position_embeddings") or self.config["max_position_embeddings"])

    def _longrope_attention_scaling(self, rope: dict) -> float:
        """The factor cos and sin are multiplied by (OpenBMB's MiniCPM4 code; transformers' ``longrope`` likewise
        unless the config gives ``attention_factor``)."""
        if rope.get("attention_factor") is not None:
            return float(rope["attention_factor"])
        original = self._original_context
        scale = self.config["max_position_embeddings"] / original
        return 1.0 if scale <= 1.0 else math.sqrt(1 + math.log(scale) / math.log(original))

    # --- tensors -----------------------------------------------------------------------------------------------

    def tensor_name(self, hf_name: str) -> str | None:
        """llama.cpp's name for a checkpoint tensor; None for what is not exported (a tied head, buffers)."""
        import gguf

        if hf_name.endswith("rotary_emb.inv_freq"):
            return None
        if hf_name == "lm_head.weight" and self.tied:
            return None
        mapped = gguf.get_tensor_name_map(self.gguf_arch, self.layers).get_name(hf_name, try_suffixes=(".weight",
                                                                                                         ".bias"))
        if mapped is None:
            raise ExportError(f"tensor {hf_name} has no place in llama.cpp's {self.name} architecture")
        return mapped

    def row_permutation(self, hf_name: str):
        """The row order llama.cpp's rotary layout needs for Q and K (Llama and MiniCPM: HF keeps the two rotary
        halves of each head apart, llama.cpp interleaves them), as an index array; None for other tensors. It
        applies to a LoRA B matrix too, whose rows are the adapted layer's output rows."""
        if self.model_type == "minicpm3":
            return None
        if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            heads = self.heads
        elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            heads = self.kv_heads
        else:
            return None
        import torch

        rows = torch.arange(heads * self.head_dim)
        # LlamaModel.permute of llama.cpp's converter, applied to row indices
        return rows.reshape(heads, 2, self.head_dim // 2).swapaxes(1, 2).reshape(-1)

    def lora_applies(self, gguf_name: str) -> bool:
        """Whether llama.cpp applies a LoRA to this tensor: its minicpm3 graph multiplies the latent attention
        projections directly, skipping any adapter (``src/models/minicpm3.cpp``)."""
        latent = (".attn_q_a.", ".attn_q_b.", ".attn_kv_a_mqa.", ".attn_kv_b.")
        return self.model_type != "minicpm3" or not any(part in gguf_name for part in latent)

    def extra_tensors(self) -> dict[str, list[float]]:
        """Tensors llama.cpp needs that the checkpoint does not store: RoPE factors."""
        import gguf

        rope = rope_settings(self.config)
        name = lambda key: gguf.TENSOR_NAMES[key] + ".weight"  # noqa: E731
        if rope["rope_type"] == "longrope":
            pairs = (self.config["qk_rope_head_dim"] if self.model_type == "minicpm3" else self.head_dim) // 2
            long, short = list(rope["long_factor"]), list(rope["short_factor"])
            if len(long) != pairs or len(short) != pairs:
                raise ExportError(f"rope_scaling long_factor / short_factor need {pairs} values each")
            if self.model_type == "minicpm" and self.config["max_position_embeddings"] > self._original_context:
                short = long  # OpenBMB's code never uses the short factors for this config (module docstring)
            return {name(gguf.MODEL_TENSOR.ROPE_FACTORS_LONG): long, name(gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT): short}
        if rope["rope_type"] == "llama3":
            return {name(gguf.MODEL_TENSOR.ROPE_FREQS): _llama3_rope_factors(rope, self.head_dim)}
        return {}


def _llama3_rope_factors(rope: dict, head_dim: int) -> list[float]:
    """Llama 3's per-frequency RoPE scaling, as llama.cpp's converter computes it for ``rope_freqs``."""
    base = float(rope["rope_theta"])
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    low_wavelength, high_wavelength = old_context / low, old_context / high
    factors = []
    for i in range(0, head_dim, 2):
        wavelength = 2 * math.pi * base ** (i / head_dim)
        if wavelength < high_wavelength:
            factors.append(1.0)
        elif wavelength > low_wavelength:
            factors.append(factor)
        else:
            smooth = (old_context / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return factors
