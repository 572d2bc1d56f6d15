"""OpenBMB's MiniCPM-1/2/4 decoder built from transformers 5's own pieces.

The arithmetic follows OpenBMB's ``modeling_minicpm.py`` (v2 for transformers 4.36, v4 for 4.46) so the logits
match theirs (see ``fixtures/minicpm_reference``); the plumbing is transformers 5's, as in its Llama: attention
through ``ALL_ATTENTION_FUNCTIONS`` (sdpa / eager / flash-attention), masks from ``create_causal_mask`` (so
``position_ids`` packing keeps samples apart), the ``Cache`` API, ``GradientCheckpointingLayer``.

MiniCPM differs from Llama by three muP scalings: input embeddings times ``scale_emb``; each attention and MLP
output times ``scale_depth / sqrt(num_hidden_layers)`` before the residual add; the final hidden state divided by
``hidden_size / dim_model_base`` right before ``lm_head`` (so a forward pre-hook on ``lm_head`` sees the scaled
input). Rotary embeddings are computed in float32 and applied in float32, as OpenBMB does.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel, slice_logits_to_keep
from transformers.models.llama.modeling_llama import eager_attention_forward, rotate_half
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_minicpm import MiniCPMConfig, warn_sparse_attention_once


class MiniCPMRMSNorm(nn.Module):
    """RMSNorm with OpenBMB's rounding: the variance in float32, the product cast back before the weight."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        variance = hidden_states.to(torch.float32).pow(2).mean(dim=-1, keepdim=True)
        hidden_states = (hidden_states * torch.rsqrt(variance + self.variance_epsilon)).to(hidden_states.dtype)
        return hidden_states * self.weight

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class MiniCPMRotaryEmbedding(nn.Module):
    """cos / sin for the given positions, as OpenBMB's rotary classes compute them.

    OpenBMB builds a cos/sin table of ``max_position_embeddings`` rows at start-up and rebuilds it only for a
    longer input, so what a forward sees depends on ``L = max(max_position_embeddings, sequence length)``:
    LongRoPE uses ``long_factor`` when ``L > original_max_position_embeddings``, else ``short_factor``, and
    scales cos/sin by ``sqrt(1 + ln(max_position_embeddings / original) / ln(original))``; dynamic NTK changes
    the base once ``L > max_position_embeddings``. The sequence length is ``max(position_ids) + 1``, which is
    OpenBMB's key/value length for unpacked inputs (with or without cache) and the longest sample in a packed row.

    The buffers are non-persistent (not in checkpoints); ``MiniCPMPreTrainedModel._init_weights`` recomputes
    them, so a model built on the meta device by ``from_pretrained`` never keeps them uninitialised.
    """

    def __init__(self, config: MiniCPMConfig) -> None:
        super().__init__()
        self.config = config
        self.rope_type = config.rope_type
        self.dim = config.head_dim
        self.base = config.rope_theta
        self.max_position_embeddings = config.max_position_embeddings
        scaling = config.rope_scaling or {}
        self.factor = scaling.get("factor")
        self.attention_scaling = 1.0
        if self.rope_type == "longrope":
            self.original_max_position_embeddings = scaling["original_max_position_embeddings"]
            scale = self.max_position_embeddings / self.original_max_position_embeddings
            self.attention_scaling = math.sqrt(1 + math.log(scale) / math.log(self.original_max_position_embeddings))
        for name, value in self.compute_buffers().items():
            self.register_buffer(name, value, persistent=False)

    def compute_buffers(self, device=None) -> dict[str, torch.Tensor]:
        """The buffers' values: inverse frequencies, and LongRoPE's short / long factors."""
        buffers = {"inv_freq": self._inverse_frequencies(self.base, device)}
        if self.rope_type == "longrope":
            scaling = self.config.rope_scaling
            buffers["short_factor"] = torch.tensor(scaling["short_factor"], dtype=torch.float32, device=device)
            buffers["long_factor"] = torch.tensor(scaling["long_factor"], dtype=torch.float32, device=device)
        return buffers

    def _apply(self, fn, recurse=True):
        """Moves follow the model; a model-wide cast (``.to(torch.bfloat16)``, DeepSpeed's ``module.bfloat16()``)
        would round the frequencies, and a rounded frequency's angle error grows with the position (OpenBMB's
        cos/sin tables only lose a bounded amount), so they are recomputed in float32 instead."""
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:
            for name, value in self.compute_buffers(self.inv_freq.device).items():
                setattr(self, name, value)
        return self

    def _inverse_frequencies(self, base: float, device=None) -> torch.Tensor:
        return 1.0 / (base ** (torch.arange(0, self.dim, 2, device=device).float() / self.dim))

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        positions = position_ids[..., None].to(torch.float32)
        inv_freq = self.inv_freq.to(device=x.device, dtype=torch.float32)
        if self.rope_type == "linear":
            freqs = (positions / self.factor) * inv_freq
        elif self.rope_type == "dynamic":
            seq_len = int(position_ids.max()) + 1
            if seq_len > self.max_position_embeddings:
                base = self.base * ((self.factor * seq_len / self.max_position_embeddings)
                                    - (self.factor - 1)) ** (self.dim / (self.dim - 2))
                inv_freq = self._inverse_frequencies(base, x.device)
            freqs = positions * inv_freq
        elif self.rope_type == "longrope":
            table_length = (position_ids.max() + 1).clamp(min=self.max_position_embeddings)
            use_long = table_length > self.original_max_position_embeddings
            ext_factors = torch.where(use_long, self.long_factor, self.short_factor)
            freqs = (positions * (1.0 / ext_factors)) * inv_freq
        else:
            freqs = positions * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim: int = 1):
    """Rotate queries and keys in float32 (OpenBMB does the same), returning them in their own dtype."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    q_fp32, k_fp32 = q.to(torch.float32), k.to(torch.float32)
    q_embed = (q_fp32 * cos) + (rotate_half(q_fp32) * sin)
    k_embed = (k_fp32 * cos) + (rotate_half(k_fp32) * sin)
    return q_embed.to(q.dtype), k_embed.to(k.dtype)


class MiniCPMMLP(nn.Module):
    def __init__(self, config: MiniCPMConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class MiniCPMAttention(nn.Module):
    """Multi-head / grouped-query attention; the kernel comes from ``config._attn_implementation``."""

    def __init__(self, config: MiniCPMConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=bias)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)

        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)

        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class MiniCPMDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: MiniCPMConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = MiniCPMAttention(config=config, layer_idx=layer_idx)
        self.mlp = MiniCPMMLP(config)
        self.input_layernorm = MiniCPMRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = MiniCPMRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.residual_scale = config.scale_depth / math.sqrt(config.num_hidden_layers)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = residual + hidden_states * self.residual_scale
        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        return residual + hidden_states * self.residual_scale


class MiniCPMPreTrainedModel(PreTrainedModel):
    config: MiniCPMConfig
    config_class = MiniCPMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MiniCPMDecoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _can_compile_fullgraph = False  # dynamic NTK rope reads the sequence length on the host
    _supports_attention_backend = True
    _can_record_outputs = {
        "hidden_states": MiniCPMDecoderLayer,
        "attentions": MiniCPMAttention,
    }

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, MiniCPMRotaryEmbedding):
            for name, value in module.compute_buffers(module.inv_freq.device).items():
                init.copy_(getattr(module, name), value)


class MiniCPMModel(MiniCPMPreTrainedModel):
    """The MiniCPM decoder stack: embeddings (times ``scale_emb``), layers, final norm."""

    def __init__(self, config: MiniCPMConfig) -> None:
        super().__init__(config)
        if (getattr(config, "num_experts", None) or 1) > 1:  # MiniCPM-MoE-8x2B: expert weights this class lacks
            raise ValueError("MiniCPM-MoE (num_experts in config.json) is not supported by the built-in MiniCPM "
                             "class: it implements the dense MiniCPM-1/2/4 models")
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [MiniCPMDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = MiniCPMRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = MiniCPMRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        warn_sparse_attention_once(config)
        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:  # OpenBMB scales looked-up embeddings only, never caller-given ones
            inputs_embeds = self.embed_tokens(input_ids) * self.config.scale_emb
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=causal_mask,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                **kwargs,
            )
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), cache=cache)


class MiniCPMForCausalLM(MiniCPMPreTrainedModel, GenerationMixin):
    """MiniCPM with its language-model head; ``lm_head`` is tied to the embeddings when the config says so."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: MiniCPMConfig) -> None:
        super().__init__(config)
        self.model = MiniCPMModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithPast:
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        # muP: the head sees the hidden state divided by the width ratio (inside lm_head's input, for hooks)
        logits = self.lm_head(hidden_states / (self.config.hidden_size / self.config.dim_model_base))

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


__all__ = ["MiniCPMForCausalLM", "MiniCPMModel", "MiniCPMPreTrainedModel", "MiniCPMRotaryEmbedding"]
