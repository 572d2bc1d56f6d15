"""The built-in MiniCPM-1/2/4 implementation (``model_type: "minicpm"``) for transformers 5.

``register_minicpm()`` makes ``AutoConfig`` / ``AutoModel`` / ``AutoModelForCausalLM`` load a downloaded
MiniCPM folder with these classes and run none of the folder's own ``.py`` files, with or without
``trust_remote_code`` (transformers prefers a registered class that lives outside transformers over a
folder's ``auto_map``).
"""

from __future__ import annotations

from .configuration_minicpm import (
    MiniCPMConfig,
    SparseAttentionNotice,
    sparse_attention_notice,
    warn_sparse_attention_once,
)
from .modeling_minicpm import MiniCPMForCausalLM, MiniCPMModel, MiniCPMPreTrainedModel

MODEL_TYPE = MiniCPMConfig.model_type


def register_minicpm() -> None:
    """Register the built-in classes for ``model_type "minicpm"`` with the Auto classes (idempotent)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    AutoConfig.register(MODEL_TYPE, MiniCPMConfig, exist_ok=True)
    AutoModel.register(MiniCPMConfig, MiniCPMModel, exist_ok=True)
    AutoModelForCausalLM.register(MiniCPMConfig, MiniCPMForCausalLM, exist_ok=True)


__all__ = [
    "MODEL_TYPE",
    "MiniCPMConfig",
    "MiniCPMForCausalLM",
    "MiniCPMModel",
    "MiniCPMPreTrainedModel",
    "SparseAttentionNotice",
    "register_minicpm",
    "sparse_attention_notice",
    "warn_sparse_attention_once",
]
