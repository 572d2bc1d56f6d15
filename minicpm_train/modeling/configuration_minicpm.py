"""Configuration for OpenBMB's MiniCPM-1/2/4 decoder (``model_type: "minicpm"``), read as OpenBMB writes it.

The fields are those of OpenBMB's ``configuration_minicpm.py`` (v2, written for transformers 4.36), with the
same defaults. MiniCPM4's extra keys (``mup_denominator``, ``sparse_config``, ...) are kept as plain attributes
when a folder has them, so a saved config carries exactly the keys it was loaded with.

``rope_scaling`` is an ordinary field here: transformers 5 would turn it into ``rope_parameters`` (and
``null`` into a ``{"rope_type": "default"}`` dict), but a merged or fine-tuned folder must still read with
OpenBMB's code, vLLM and llama.cpp's converter, which expect ``rope_scaling`` as the base wrote it.
"""

from __future__ import annotations

import warnings

from transformers import PreTrainedConfig

ROPE_TYPES = ("default", "linear", "dynamic", "longrope")


class MiniCPMConfig(PreTrainedConfig):
    """OpenBMB's MiniCPM configuration (MiniCPM-1B, MiniCPM-2B, MiniCPM4 0.5B / 8B / 4.1-8B)."""

    model_type = "minicpm"
    keys_to_ignore_at_inference = ["past_key_values"]
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pretraining_tp: int = 1
    tie_word_embeddings: bool = True  # OpenBMB's default: MiniCPM-2B's config.json does not say it
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    scale_emb: float = 1
    dim_model_base: float = 1
    scale_depth: float = 1

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        super().__post_init__(**kwargs)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) is not a multiple of num_attention_heads "
                             f"({self.num_attention_heads})")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"unsupported rope_scaling type {self.rope_type!r} for MiniCPM; expected one of "
                             f"{', '.join(ROPE_TYPES)}")
        self._check_rope_scaling()

    def _check_rope_scaling(self) -> None:
        """The keys OpenBMB's rotary classes read, present and of the right shape."""
        scaling = self.rope_scaling or {}
        if self.rope_type in ("linear", "dynamic") and not isinstance(scaling.get("factor"), (int, float)):
            raise ValueError(f"rope_scaling {self.rope_type!r} needs a numeric 'factor', got {scaling.get('factor')!r}")
        if self.rope_type != "longrope":
            return
        missing = [key for key in ("short_factor", "long_factor", "original_max_position_embeddings")
                   if key not in scaling]
        if missing:
            raise ValueError(f"rope_scaling 'longrope' lacks {', '.join(missing)}")
        for key in ("short_factor", "long_factor"):
            if len(scaling[key]) != self.head_dim // 2:
                raise ValueError(f"rope_scaling {key} has {len(scaling[key])} values; this model's head size "
                                 f"{self.head_dim} needs {self.head_dim // 2}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rope_type(self) -> str:
        """``default`` for ``rope_scaling: null``; v2 writes the type under ``type``, v4 under ``rope_type``."""
        scaling = self.rope_scaling or {}
        return scaling.get("rope_type", scaling.get("type", "default"))

    def to_diff_dict(self) -> dict:
        """The config as saved; ``torch_dtype`` is written next to transformers 5's ``dtype``, since OpenBMB's
        code and older readers of a MiniCPM folder look for that key."""
        output = super().to_diff_dict()
        if output.get("dtype") is not None:
            output["torch_dtype"] = output["dtype"]
        return output


class SparseAttentionNotice(UserWarning):
    """MiniCPM4's InfLLM-v2 sparse attention is replaced by dense attention."""


def sparse_attention_notice(config) -> str | None:
    """The one-line notice for a config whose ``sparse_config`` asks for InfLLM-v2 attention, else None."""
    sparse = getattr(config, "sparse_config", None)
    if not sparse:
        return None
    dense_len = sparse.get("dense_len", 8192) if isinstance(sparse, dict) else 8192
    return (f"this MiniCPM4 model sets sparse_config: InfLLM-v2 sparse attention is a CUDA kernel path that "
            f"OpenBMB's code takes for inputs longer than {dense_len} tokens; the built-in MiniCPM class uses "
            f"dense attention at every length (identical below {dense_len} tokens, full attention above)")


_warned_sparse = False


def warn_sparse_attention_once(config) -> None:
    """Emit :func:`sparse_attention_notice` as a warning, once per process."""
    global _warned_sparse
    notice = sparse_attention_notice(config)
    if notice and not _warned_sparse:
        _warned_sparse = True
        warnings.warn(notice, SparseAttentionNotice, stacklevel=2)


__all__ = ["MiniCPMConfig", "SparseAttentionNotice", "sparse_attention_notice", "warn_sparse_attention_once"]
