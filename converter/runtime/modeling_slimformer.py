"""The slimformer runtime: a decoder (Llama / Mistral / Qwen2 / Qwen3 weights) and an encoder (BERT
weights) whose layers may have lost their attention or MLP sub-block.

Read top to bottom: attention, MLP, decoder layer, decoder model, causal-LM head, then the encoder.
Tensor names are the base family's own (``model.layers.3.self_attn.q_proj.weight``, BERT's
``encoder.layer.2.attention.self.query.weight``), so unconverted weights load unchanged and a dropped
sub-block is simply absent from the files.

The KV cache holds one slot per layer that *keeps* attention (``config.cache_layer_indices``): a model
with half of its attention dropped stores half the keys and values. The cache object itself comes
from ``kv_cache.new_cache``, which also provides the score-driven evicting cache (A2SF / H2O /
StreamingLLM); attention masks are built here from the cache's own record of which slots are valid,
so they stay right after eviction and with left padding.

This file ships inside every converted checkpoint (``trust_remote_code=True``) and is imported as
``converter.runtime.modeling_slimformer`` by slimformer itself; it imports only torch, transformers
and its sibling files.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    BaseModelOutputWithPooling,
    CausalLMOutputWithPast,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.bert.modeling_bert import (
    BertAttention,
    BertEmbeddings,
    BertIntermediate,
    BertOutput,
    BertPooler,
)
from transformers.models.llama.modeling_llama import LlamaRMSNorm, eager_attention_forward

from .attention_heads import QueryKeyHeads
from .configuration_slimformer import SlimformerConfig
from .kv_cache import CACHE_FIELD, new_cache, observe_attention, returned_cache, wants_probabilities

# transformers 4.57 copies a remote-code checkpoint's modules into its cache only when THIS file imports them
# relatively (it does not follow nested imports), so every runtime module is imported here once.
from .kv_policies import POLICY_CLASSES  # noqa: F401
from .masks import attend_with_probabilities
from .rotary import RotaryEmbedding
from .sas import STANDARD, SasDecoderLayer, attention_form

# Attention kernels that treat a missing mask as causal; every other one (eager, custom ones) gets it explicitly.
IMPLICITLY_CAUSAL = ("sdpa", "flash_attention_2", "flash_attention_3")


class SlimformerAttention(QueryKeyHeads):
    """Grouped-query attention with RoPE; optional q/k/v bias (Qwen2) and per-head q/k RMSNorm (Qwen3)."""

    def __init__(self, config: SlimformerConfig, layer_idx: int, cache_idx: int) -> None:
        super().__init__(config, layer_idx, cache_idx)
        self.is_causal = True  # read by transformers' attention kernels
        self.attention_dropout = 0.0
        hidden = config.hidden_size
        self.v_proj = nn.Linear(hidden, self.num_key_value_heads * self.head_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=config.attention_output_bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        past_key_values: Cache | None,
    ) -> torch.Tensor:
        batch, q_len, _ = hidden_states.shape
        query, key = self.queries_keys(hidden_states, position_embeddings)
        value = self.v_proj(hidden_states).view(batch, q_len, -1, self.head_dim).transpose(1, 2)
        step = self.cache_step(key, value, attention_mask, past_key_values)
        impl = self.config._attn_implementation
        explicit_probs = wants_probabilities(past_key_values, self.cache_idx, q_len)
        # The probabilities path runs eager attention, which needs even a causal mask spelled out.
        implicit = impl in IMPLICITLY_CAUSAL and not explicit_probs
        bias = step.bias(q_len, query.dtype, query.device, self.config.sliding_window, implicit)
        if explicit_probs:
            # A scoring cache on a short step: compute the probabilities once, for attention and score alike.
            output, probs = attend_with_probabilities(query, step.key, step.value, bias, self.scaling)
            observe_attention(past_key_values, self.cache_idx, query, bias, self.scaling, probs)
        else:
            if bias is not None and 1 < bias.shape[1] < self.num_heads:
                # Per-KV-head validity (an evicting cache keeps different tokens per KV head): one bias per query
                # head of each group, as eager and SDPA broadcast the mask over query heads, not KV heads.
                bias = bias.repeat_interleave(self.num_key_value_groups, dim=1)
            attend = eager_attention_forward if impl == "eager" else ALL_ATTENTION_FUNCTIONS[impl]
            output, _ = attend(self, query, step.key, step.value, bias, dropout=0.0, scaling=self.scaling)
            if past_key_values is not None:
                # Score-driven caches accumulate this step's attention probabilities (recomputed in chunks).
                observe_attention(past_key_values, self.cache_idx, query, bias, self.scaling)
        return self.o_proj(output.reshape(batch, q_len, -1))


class SlimformerMLP(nn.Module):
    """Gated MLP (SwiGLU for the Llama family): ``down(act(gate(x)) * up(x))``."""

    def __init__(self, config: SlimformerConfig) -> None:
        super().__init__()
        hidden, inner = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(hidden, inner, bias=config.mlp_bias)
        self.up_proj = nn.Linear(hidden, inner, bias=config.mlp_bias)
        self.down_proj = nn.Linear(inner, hidden, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class SlimformerDecoderLayer(nn.Module):
    """Pre-norm block; each sub-block (with its norm) exists only if the block config keeps it."""

    def __init__(self, config: SlimformerConfig, layer_idx: int, cache_idx: int | None) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        if cache_idx is not None:
            self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.self_attn = SlimformerAttention(config, layer_idx, cache_idx)
        else:
            self.self_attn = None
        if config.ffn_kept(layer_idx):
            self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.mlp = SlimformerMLP(config)
        else:
            self.mlp = None

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        past_key_values: Cache | None,
    ) -> torch.Tensor:
        if self.self_attn is not None:
            hidden_states = hidden_states + self.self_attn(
                self.input_layernorm(hidden_states), position_embeddings, attention_mask, past_key_values
            )
        if self.mlp is not None:
            hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states


def decoder_layer(config: SlimformerConfig, layer_idx: int, cache_idx: int | None) -> nn.Module:
    """The standard pre-norm layer, or a simplified one (SAS, see ``sas.py``) when its block config names a form."""
    if attention_form(config, layer_idx) == STANDARD:
        return SlimformerDecoderLayer(config, layer_idx, cache_idx)
    return SasDecoderLayer(
        config, layer_idx, cache_idx, SlimformerMLP(config) if config.ffn_kept(layer_idx) else None
    )


def reset_buffers(module: nn.Module, device: torch.device | str | None = None) -> None:
    """Fill in the non-persistent buffers no weight file holds (RoPE frequencies, BERT's position and token
    type ids) after a model was built on the meta device. ``device=None`` refills them where they are."""
    if isinstance(module, RotaryEmbedding):
        module.reset_buffers(device)
    elif isinstance(module, BertEmbeddings):
        if device is None and module.position_ids.is_meta:
            return
        length = module.position_embeddings.num_embeddings
        target = device if device is not None else module.position_ids.device
        module.position_ids = torch.arange(length, device=target).expand((1, -1))
        module.token_type_ids = torch.zeros(1, length, dtype=torch.long, device=target)


class SlimformerPreTrainedModel(PreTrainedModel):
    config_class = SlimformerConfig
    config: SlimformerConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _supports_sdpa = True
    _supports_attention_backend = True
    _no_split_modules = ["SlimformerDecoderLayer", "SasDecoderLayer", "SlimformerEncoderLayer"]

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(mean=0.0, std=std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(mean=0.0, std=std)
        elif isinstance(module, LlamaRMSNorm):
            module.weight.data.fill_(1.0)
        elif isinstance(module, nn.LayerNorm):
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()
        else:
            reset_buffers(module)  # transformers 5 initialises non-persistent buffers here


class SlimformerModel(SlimformerPreTrainedModel):
    """Decoder trunk: embeddings -> layers -> final norm."""

    def __init__(self, config: SlimformerConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        cache_slots = {layer: slot for slot, layer in enumerate(config.cache_layer_indices)}
        self.layers = nn.ModuleList(
            decoder_layer(config, i, cache_slots.get(i)) for i in range(config.num_hidden_layers)
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        cache: Cache | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        """``past_key_values`` and ``cache`` are one argument under two names: transformers >= 5.24 passes
        ``cache=``, earlier releases ``past_key_values=``."""
        past_key_values = past_key_values if past_key_values is not None else cache
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = new_cache(self.config)
        q_len = inputs_embeds.shape[1]
        if position_ids is None:
            # Positions continue from the tokens the cache has SEEN (logical; an evicting cache stores fewer).
            # No cache_position argument: transformers 5 removed it, and 4.57's generate() passes it only
            # as a keyword that **kwargs absorbs -- it always equals these positions.
            seen = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = torch.arange(seen, seen + q_len, device=inputs_embeds.device).unsqueeze(0)

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        for layer in self.layers:
            hidden_states = layer(hidden_states, position_embeddings, attention_mask, past_key_values)
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states, **{CACHE_FIELD: past_key_values if use_cache else None}
        )


class SlimformerForCausalLM(SlimformerPreTrainedModel, GenerationMixin):
    # A mapping (target -> source) as transformers 5 requires; 4.57 iterates it and reads the keys.
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: SlimformerConfig) -> None:
        super().__init__(config)
        self.model = SlimformerModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # The model builds its own cache (compact slots, optional eviction) in forward().
        return False

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        cache: Cache | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values if past_key_values is not None else cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
        )
        hidden = outputs.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: returned_cache(outputs)})


class SlimformerEncoderLayer(nn.Module):
    """BERT's post-norm layer; attention (with its output norm) and the MLP can each be absent."""

    def __init__(self, config: SlimformerConfig, layer_idx: int) -> None:
        super().__init__()
        self.attention = (
            BertAttention(config, layer_idx=layer_idx) if config.attention_kept(layer_idx) else None
        )
        if config.ffn_kept(layer_idx):
            self.intermediate = BertIntermediate(config)
            self.output = BertOutput(config)
        else:
            self.intermediate = self.output = None

    def forward(self, hidden_states: torch.Tensor, extended_mask: torch.Tensor | None) -> torch.Tensor:
        if self.attention is not None:
            hidden_states = self.attention(hidden_states, attention_mask=extended_mask)[0]
        if self.output is not None:
            hidden_states = self.output(self.intermediate(hidden_states), hidden_states)
        return hidden_states


class SlimformerEncoder(nn.Module):
    def __init__(self, config: SlimformerConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(SlimformerEncoderLayer(config, i) for i in range(config.num_hidden_layers))


class SlimformerEncoderModel(SlimformerPreTrainedModel):
    """BERT encoder with BERT's own tensor names; returns ``last_hidden_state`` (and ``pooler_output``)."""

    base_model_prefix = "bert"  # never an attribute here, so BERT-style names load unchanged

    def __init__(self, config: SlimformerConfig) -> None:
        super().__init__(config)
        self.embeddings = BertEmbeddings(config)
        self.encoder = SlimformerEncoder(config)
        self.pooler = BertPooler(config) if getattr(config, "add_pooling_layer", True) else None
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPooling:
        hidden_states = self.embeddings(
            input_ids=input_ids,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
        )
        extended_mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            extended_mask = torch.zeros(
                attention_mask.shape, dtype=hidden_states.dtype, device=hidden_states.device
            )
            extended_mask = extended_mask.masked_fill(
                ~attention_mask.bool(), torch.finfo(hidden_states.dtype).min
            )
            extended_mask = extended_mask[:, None, None, :]
        for layer in self.encoder.layer:
            hidden_states = layer(hidden_states, extended_mask)
        pooled = self.pooler(hidden_states) if self.pooler is not None else None
        return BaseModelOutputWithPooling(last_hidden_state=hidden_states, pooler_output=pooled)
