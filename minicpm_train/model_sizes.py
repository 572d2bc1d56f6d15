"""Model dimensions and parameter counts, from a ``config.json`` or the MiniCPM family's known configs.

Counts are computed from the dimensions (never copied from a model card): embedding, per layer the
attention (multi-head, grouped-query, or MiniCPM3's multi-head latent attention), the gated MLP and
two RMSNorms, the final norm, and ``lm_head`` unless it is tied to the embedding.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from minicpm_data.errors import MinicpmError


class ModelSizeError(MinicpmError):
    """The model is neither a local folder with a config.json nor a known MiniCPM name."""


# Known configs, keyed by a normalised name (see `_normalise`). Each value holds the config.json keys
# that sizes depend on.
KNOWN_CONFIGS: dict[str, dict] = {
    # MINICPM_FACTS: hidden 2304, 40 layers, 36 heads, intermediate 5760, vocab 122,753.
    # num_key_value_heads and tie_word_embeddings from the model's config.json on the hub.
    "minicpm-2b": dict(model_type="minicpm", vocab_size=122753, hidden_size=2304, num_hidden_layers=40,
                       num_attention_heads=36, num_key_value_heads=36, intermediate_size=5760,
                       tie_word_embeddings=True),
    # From the model's config.json on the hub (vocab 73,440 is also in MINICPM_FACTS).
    "minicpm-1b": dict(model_type="minicpm", vocab_size=73440, hidden_size=1536, num_hidden_layers=52,
                       num_attention_heads=24, num_key_value_heads=8, intermediate_size=3840,
                       tie_word_embeddings=True),
    # From the model's config.json on the hub; the same values are transformers' MiniCPM3Config
    # defaults ("Defaults match the openbmb/MiniCPM3-4B checkpoint").
    "minicpm3-4b": dict(model_type="minicpm3", vocab_size=73448, hidden_size=2560, num_hidden_layers=62,
                        num_attention_heads=40, num_key_value_heads=40, intermediate_size=6400,
                        q_lora_rank=768, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32,
                        v_head_dim=64, tie_word_embeddings=True),
    # From the model's config.json on the hub.
    "minicpm4-0.5b": dict(model_type="minicpm", vocab_size=73448, hidden_size=1024, num_hidden_layers=24,
                          num_attention_heads=16, num_key_value_heads=2, intermediate_size=4096,
                          tie_word_embeddings=True),
    # ../shared/tokenizers/minicpm4/config.json (MiniCPM4-8B's own config).
    "minicpm4-8b": dict(model_type="minicpm", vocab_size=73448, hidden_size=4096, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=2, intermediate_size=16384,
                        tie_word_embeddings=False),
    # MINICPM_FACTS: hidden 1536, 24 layers, vocab 130,560, LlamaForCausalLM. ASSUMED (no config here):
    # head_dim 128 (12 heads), 4 key-value heads, intermediate 4608, tied embeddings. A local folder's
    # config.json always wins: pass the folder for exact numbers.
    "minicpm5-1b": dict(model_type="llama", vocab_size=130560, hidden_size=1536, num_hidden_layers=24,
                        num_attention_heads=12, num_key_value_heads=4, intermediate_size=4608,
                        tie_word_embeddings=True),
    # MINICPM_FACTS: hidden 2048, 42 layers, vocab 130,560. ASSUMED as for 1B: 16 heads, 4 key-value
    # heads, intermediate 6144, tied embeddings.
    "minicpm5-2b": dict(model_type="llama", vocab_size=130560, hidden_size=2048, num_hidden_layers=42,
                        num_attention_heads=16, num_key_value_heads=4, intermediate_size=6144,
                        tie_word_embeddings=True),
}
KNOWN_CONFIGS["minicpm4.1-8b"] = KNOWN_CONFIGS["minicpm4-8b"]
# Suffixes of published checkpoint names that do not change the architecture.
_VARIANT_SUFFIX = re.compile(r"(-(sft|dpo|bf16|fp16|fp32|llama-format|int4|gguf|hf))+$")


@dataclass(frozen=True)
class Architecture:
    """The dimensions memory depends on."""

    name: str
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    tie_word_embeddings: bool
    # Multi-head latent attention (MiniCPM3); None for ordinary attention.
    q_lora_rank: int | None = None
    kv_lora_rank: int | None = None
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0

    @classmethod
    def from_config(cls, config: dict, name: str) -> "Architecture":
        """Read the dimensions from a ``config.json`` mapping (also MiniCPM's custom-code configs)."""
        try:
            hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
            latent = config.get("kv_lora_rank") is not None
            return cls(
                name=name,
                model_type=str(config.get("model_type", "")),
                vocab_size=int(config["vocab_size"]),
                hidden_size=hidden,
                num_layers=int(config["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads),
                intermediate_size=int(config["intermediate_size"]),
                tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),
                q_lora_rank=config.get("q_lora_rank") if latent else None,
                kv_lora_rank=int(config["kv_lora_rank"]) if latent else None,
                qk_nope_head_dim=int(config.get("qk_nope_head_dim", 0)) if latent else 0,
                qk_rope_head_dim=int(config.get("qk_rope_head_dim", 0)) if latent else 0,
                v_head_dim=int(config.get("v_head_dim") or hidden // heads) if latent else 0,
            )
        except KeyError as missing:
            raise ModelSizeError(f"{name}: config.json has no {missing.args[0]!r}; cannot size this model") from None

    @property
    def latent_attention(self) -> bool:
        return self.kv_lora_rank is not None

    def attention_linears(self) -> dict[str, tuple[int, int]]:
        """Each attention projection of one layer: name -> (in features, out features)."""
        h, a = self.hidden_size, self.num_heads
        if self.latent_attention:
            qk = self.qk_nope_head_dim + self.qk_rope_head_dim
            q = ({"q_a_proj": (h, self.q_lora_rank), "q_b_proj": (self.q_lora_rank, a * qk)} if self.q_lora_rank
                 else {"q_proj": (h, a * qk)})
            return {**q, "kv_a_proj_with_mqa": (h, self.kv_lora_rank + self.qk_rope_head_dim),
                    "kv_b_proj": (self.kv_lora_rank, a * (self.qk_nope_head_dim + self.v_head_dim)),
                    "o_proj": (a * self.v_head_dim, h)}
        kv = self.num_kv_heads * self.head_dim
        return {"q_proj": (h, a * self.head_dim), "k_proj": (h, kv), "v_proj": (h, kv),
                "o_proj": (a * self.head_dim, h)}

    def mlp_linears(self) -> dict[str, tuple[int, int]]:
        h, i = self.hidden_size, self.intermediate_size
        return {"gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def layer_linears(self) -> dict[str, tuple[int, int]]:
        return {**self.attention_linears(), **self.mlp_linears()}

    def layer_norm_parameters(self) -> int:
        """RMSNorm weights of one layer: two per layer, plus MLA's norms on the latent vectors."""
        latent = (self.q_lora_rank or 0) + (self.kv_lora_rank or 0)
        return 2 * self.hidden_size + latent

    def parameters(self) -> "ParameterCount":
        """Parameter counts by part (shared embedding / lm_head counted once)."""
        embedding = self.vocab_size * self.hidden_size
        attention = sum(i * o for i, o in self.attention_linears().values())
        mlp = sum(i * o for i, o in self.mlp_linears().values())
        return ParameterCount(
            embedding=embedding,
            attention=attention * self.num_layers,
            mlp=mlp * self.num_layers,
            norms=self.layer_norm_parameters() * self.num_layers + self.hidden_size,
            lm_head=0 if self.tie_word_embeddings else embedding,
            largest_layer=max(embedding, max(i * o for i, o in self.layer_linears().values())),
        )

    def lora_parameters(self, rank: int, targets: list[str] | str) -> int:
        """LoRA A and B matrices over ``targets`` (module names, or ``all-linear``) in every layer."""
        linears = self.layer_linears()
        chosen = linears if targets == "all-linear" else {n: linears[n] for n in targets if n in linears}
        return self.num_layers * sum(rank * (i + o) for i, o in chosen.values())

    def largest_lora_matrix(self, rank: int, targets: list[str] | str) -> int:
        """The biggest single LoRA matrix (A is rank x in, B is out x rank) over ``targets``."""
        linears = self.layer_linears()
        chosen = linears if targets == "all-linear" else {n: linears[n] for n in targets if n in linears}
        return max((rank * max(i, o) for i, o in chosen.values()), default=0)


@dataclass(frozen=True)
class ParameterCount:
    embedding: int
    attention: int
    mlp: int
    norms: int
    lm_head: int
    largest_layer: int  # the biggest single weight (ZeRO-3 gathers one at a time)

    @property
    def total(self) -> int:
        return self.embedding + self.attention + self.mlp + self.norms + self.lm_head

    @property
    def linear(self) -> int:
        """Weights inside the transformer layers' linear projections (what 4-bit quantisation packs)."""
        return self.attention + self.mlp


def _normalise(name: str) -> str:
    base = name.strip().rstrip("/").split("/")[-1].lower()
    return _VARIANT_SUFFIX.sub("", base)


def known_names() -> list[str]:
    return sorted(KNOWN_CONFIGS)


def is_known_name(name: str) -> bool:
    """Whether ``name`` (any variant: ``-sft-bf16``, ``openbmb/...``) is a MiniCPM model with a known config."""
    return _normalise(name) in KNOWN_CONFIGS


def resolve_architecture(model: str) -> tuple[Architecture, str]:
    """A local folder's config.json, else a known MiniCPM name (``MiniCPM-2B-sft-bf16``, ``openbmb/...``).

    Returns the architecture and where its numbers came from.
    """
    from minicpm_data.model_files import config_findings, require

    folder = Path(model).expanduser()
    if (folder / "config.json").is_file():
        config, findings = config_findings(folder)  # what a plan reads (a folder of config.json alone plans too)
        require(findings)
        return Architecture.from_config(config, folder.name), str(folder / "config.json")
    if is_known_name(model):
        key = _normalise(model)
        return Architecture.from_config(KNOWN_CONFIGS[key], model), f"known config of {key}"
    if folder.is_dir():
        raise ModelSizeError(f"{folder} has no config.json")
    raise ModelSizeError(f"{model!r} is not a local model folder nor a known MiniCPM model "
                         f"({', '.join(known_names())})")
