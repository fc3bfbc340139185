"""Our compact Llama-family decoder (Llama, Mistral, Qwen2, Qwen3, Gemma 3 text, Phi-3),
parameter names as in HF (Phi-3's fused checkpoint projections are split by model/hf.py).

RMSNorm, RoPE (rotate-half, optional llama3 scaling), grouped-query attention, SwiGLU MLP,
optional qkv bias (Qwen2) and per-head q/k RMSNorm (Qwen3), tied or untied embeddings. Gemma 3:
(1 + w) RMSNorms before and after attention and MLP, GeGLU (tanh GELU), embeddings times
sqrt(hidden), attention scale query_pre_attn_scalar^-0.5, sliding-window layers with their own
RoPE base, optional final logit soft-capping. Hot ops go through the `kernels` dispatch point;
the exceptions are Gemma's GeGLU and attention over spans longer than a sliding window (masked
torch SDPA, `windowed_attention`: the kernels have no window). The model holds no parallelism code.

    model = Decoder(ModelConfig.from_preset("tiny", vocab_size=8000))
    logits = model(input_ids)                                   # [B, L, V]
    loss_sum = model(input_ids, position_ids, labels=labels)    # fp32 sum over labels != -100
    token_ce = model(input_ids, position_ids, labels=labels, reduction="none")  # [B, L], 0 where -100

Packed rows: `position_ids` restart at 0 at each document start; attention never crosses a
document boundary (document ids = cumsum(position_ids == 0) go to `kernels.attention`).
`labels[b, t]` is the target of the prediction made at position t (already shifted).

Generation: `cache = model.new_kv_cache(batch_size, max_len)`, then
`model(prompt_ids, kv_cache=cache)` and `model(next_ids[:, None], kv_cache=cache)` one token
at a time; positions continue from `cache.length`.

Every parameter is initialised in the constructor of the module that creates it (normal with
std `initializer_range`, o_proj/down_proj scaled by 1/sqrt(2 * layers), norms 1, biases 0), so
construction under `deepspeed.zero.Init` (which partitions each module's parameters right
after its constructor) gives the same statistics. A model whose weights are about to be loaded
is built without any of that: on the meta device (no storage, init skipped) or inside
`no_init()` (storage left uninitialised, e.g. under `zero.Init`), then filled
(llmtrain/engine.py `build_model`).
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import kernels
from llmtrain.errors import UserError
from llmtrain.model.model_config import ModelConfig

_init_state = threading.local()


@contextlib.contextmanager
def no_init() -> Iterator[None]:
    """Modules constructed inside leave their parameters uninitialised (torch.empty): for a
    model whose every parameter is overwritten next (a base's weights), random init is waste
    (~4 s for 0.5B parameters on one core)."""
    before = getattr(_init_state, "skip", False)
    _init_state.skip = True
    try:
        yield
    finally:
        _init_state.skip = before


def _initialise(param: torch.Tensor) -> bool:
    """Whether to run the random init on `param`: not on the meta device (nothing to fill;
    torch's meta init is slow, ~3 ms a call) and not inside `no_init()`."""
    return not (param.is_meta or getattr(_init_state, "skip", False))


class Linear(nn.Linear):
    """nn.Linear initialised N(0, std) with a zero bias (peft's LoRA wraps it like any Linear)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, std: float):
        super().__init__(in_features, out_features, bias=bias)
        self.std = std
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if not hasattr(self, "std") or not _initialise(self.weight):  # nn.Linear.__init__ calls it before `std` is known
            return
        nn.init.normal_(self.weight, mean=0.0, std=self.std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class Embedding(nn.Embedding):
    """nn.Embedding initialised N(0, std)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, std: float):
        super().__init__(num_embeddings, embedding_dim)
        self.std = std
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if hasattr(self, "std") and _initialise(self.weight):
            nn.init.normal_(self.weight, mean=0.0, std=self.std)


class RMSNorm(nn.Module):
    """RMSNorm scaled by `weight`, or with `offset` (Gemma) by 1 + weight computed in fp32 and
    cast back, as transformers' Gemma3RMSNorm (the weight then starts at 0)."""

    def __init__(self, dim: int, eps: float, offset: bool = False):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if _initialise(self.weight):
            (nn.init.zeros_ if self.offset else nn.init.ones_)(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.offset:
            return kernels.rms_norm(x.float(), 1.0 + self.weight.float(), self.eps).to(x.dtype)
        return kernels.rms_norm(x, self.weight, self.eps)


# ---------------------------------------------------------------------------------------------
# Rotary position embedding


def rope_inv_freq(config: ModelConfig, device: torch.device | None = None, local: bool = False) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/d), i < d/2, with Llama 3's frequency-dependent scaling
    when `config.rope_scaling` is llama3, divided by the factor when linear (same float32
    arithmetic as transformers). `local`: Gemma 3's sliding layers (`rope_local_theta`, unscaled)."""
    dim = config.head_dim
    theta = config.rope_local_theta if local else config.rope_theta
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    scaling = None if local else config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return inv_freq / scaling["factor"]
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)  # long waves: divide by factor
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [B, L, head_dim] for position_ids [B, L], computed in fp32 then cast."""
    freqs = position_ids[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


# ---------------------------------------------------------------------------------------------
# KV cache


class KVCache:
    """Preallocated keys/values for incremental decoding: k/v [layers, B, Hkv, max_len, D].

    A forward pass with `kv_cache=cache` writes its new keys/values at `cache.length` and then
    advances `length`. The first call may hold any number of tokens (causal prefill); later
    calls one token per row."""

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, dtype: torch.dtype, device: torch.device):
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's k/v [B, Hkv, L, D] for `layer`; return all keys/values so far."""
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


def windowed_attention(q, k, v, window: int, q_start: int, doc_ids=None, scale: Optional[float] = None) -> torch.Tensor:
    """Causal attention in which the query at position i sees keys j with i - window < j <= i
    (transformers' sliding window), within its document. q [B, Hq, L, D] at positions
    q_start.., k/v [B, Hkv, Lk, D] at positions 0..Lk-1. Torch SDPA with a [L, Lk] mask."""
    L, Lk = q.shape[2], k.shape[2]
    qpos = torch.arange(q_start, q_start + L, device=q.device)[:, None]
    kpos = torch.arange(Lk, device=q.device)[None, :]
    mask = ((kpos <= qpos) & (qpos - kpos < window))[None, None]
    if doc_ids is not None:
        mask = mask & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
    if q.shape[1] != k.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


# ---------------------------------------------------------------------------------------------
# Blocks


def layer_window(config: ModelConfig, layer: int) -> Optional[int]:
    """The sliding window layer `layer` attends within (None: full causal attention). Mistral's
    window is enforced by refusing longer spans instead (Decoder._check_span)."""
    if config.family == "phi3" or (config.family == "gemma3" and config.layer_types[layer] == "sliding_attention"):
        return config.sliding_window
    return None


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int = 0):
        super().__init__()
        h, hd = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, hd
        std, out_std = config.initializer_range, config.initializer_range / math.sqrt(2 * config.num_hidden_layers)
        self.q_proj = Linear(h, self.num_heads * hd, config.attention_bias, std)
        self.k_proj = Linear(h, self.num_kv_heads * hd, config.attention_bias, std)
        self.v_proj = Linear(h, self.num_kv_heads * hd, config.attention_bias, std)
        self.o_proj = Linear(self.num_heads * hd, h, config.attention_out_bias, out_std)
        gemma = config.family == "gemma3"
        if config.qk_norm:
            self.q_norm = RMSNorm(hd, config.rms_norm_eps, offset=gemma)
            self.k_norm = RMSNorm(hd, config.rms_norm_eps, offset=gemma)
        self.qk_norm = config.qk_norm
        self.scale = config.query_pre_attn_scalar**-0.5 if gemma else None
        self.window = layer_window(config, layer)

    def forward(self, x, cos, sin, doc_ids=None, kv_cache: Optional[KVCache] = None, layer: int = 0):
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, L, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, L, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm:  # Qwen3, Gemma 3: RMSNorm over each head's dims, before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = kernels.apply_rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        causal, start = True, 0
        if kv_cache is not None:
            causal, start = kv_cache.length == 0, kv_cache.length  # prefill is causal; a new token sees the cache
            k, v = kv_cache.update(layer, k, v)
        if self.window is not None and start + L > self.window:
            out = windowed_attention(q, k, v, self.window, start, doc_ids, self.scale)
        else:
            out = kernels.attention(q, k, v, doc_ids=doc_ids, causal=causal, scale=self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(B, L, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        std, out_std = config.initializer_range, config.initializer_range / math.sqrt(2 * config.num_hidden_layers)
        self.gate_proj = Linear(h, i, False, std)
        self.up_proj = Linear(h, i, False, std)
        self.down_proj = Linear(i, h, False, out_std)
        self.geglu = config.family == "gemma3"

    def forward(self, x):
        if self.geglu:  # Gemma: GELU (tanh approximation) gate
            return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))
        return self.down_proj(kernels.swiglu(self.gate_proj(x), self.up_proj(x)))


class Block(nn.Module):
    """Pre-norm block; Gemma 3 also normalises the attention and MLP outputs (its
    post_attention_layernorm is on the attention output, pre_feedforward_layernorm before the MLP)."""

    def __init__(self, config: ModelConfig, layer: int = 0):
        super().__init__()
        h, eps, gemma = config.hidden_size, config.rms_norm_eps, config.family == "gemma3"
        self.input_layernorm = RMSNorm(h, eps, offset=gemma)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(h, eps, offset=gemma)
        if gemma:
            self.pre_feedforward_layernorm = RMSNorm(h, eps, offset=True)
            self.post_feedforward_layernorm = RMSNorm(h, eps, offset=True)
        self.mlp = MLP(config)
        self.sandwich = gemma

    def forward(self, x, cos, sin, doc_ids=None, kv_cache: Optional[KVCache] = None, layer: int = 0):
        if self.sandwich:
            x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, doc_ids, kv_cache, layer))
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, doc_ids, kv_cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """Embeddings, blocks and the final norm: HF's `model.*` submodule."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, config.initializer_range)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, offset=config.family == "gemma3")


class LMHead(nn.Module):
    """Output projection. With labels it returns the summed cross-entropy (or, with
    reduction="none", each token's, shaped like labels) computed in this module's own forward
    (so ZeRO-3, which gathers a module's parameters when it is called, gathers the weight here;
    when tied, `weight` is the embedding's Parameter itself)."""

    def __init__(self, config: ModelConfig, tied_weight: Optional[nn.Parameter] = None):
        super().__init__()
        self.softcap = config.final_logit_softcapping
        if tied_weight is not None:
            self.weight = tied_weight
        else:
            self.weight = nn.Parameter(torch.empty(config.vocab_size, config.hidden_size))
            if _initialise(self.weight):
                nn.init.normal_(self.weight, mean=0.0, std=config.initializer_range)

    def forward(self, hidden: torch.Tensor, labels: Optional[torch.Tensor] = None, reduction: str = "sum") -> torch.Tensor:
        if self.softcap is not None:  # Gemma: cap * tanh(logits / cap); the [tokens, V] logits are materialised
            logits = torch.tanh(F.linear(hidden, self.weight) / self.softcap) * self.softcap
            if labels is None:
                return logits
            loss = kernels.cross_entropy(logits, labels, ignore_index=-100, reduction=reduction)
            return loss.view(labels.shape).float() if reduction == "none" else loss.float()
        if labels is None:
            return F.linear(hidden, self.weight)
        h, y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
        if reduction == "sum":
            # Only rows with a target go through the [rows, vocab] matmul: SFT masks prompts and
            # padding (40% of the rows of chat data at seq 512; the LM head was a quarter of a
            # LoRA step at vocab 151,936). index_select's backward puts zeros in the rest.
            keep = (y != -100).nonzero().squeeze(1)
            if keep.numel() < y.numel():
                h, y = h.index_select(0, keep), y.index_select(0, keep)
        loss = kernels.fused_linear_cross_entropy(h, self.weight, y, ignore_index=-100, reduction=reduction)
        return loss.view(labels.shape).float() if reduction == "none" else loss.float()


# ---------------------------------------------------------------------------------------------
# The model


class Decoder(nn.Module):
    """Causal LM: `model` (embeddings, blocks, norm) and `lm_head`, named as in HF checkpoints.

    forward(input_ids [B, L] int64, position_ids=None, labels=None, kv_cache=None):
      - position_ids [B, L] (or [L]) restart at 0 at each document start; None = 0..L-1
        (continuing from `kv_cache.length` when a cache is given) and no document mask.
      - labels None: logits [B, L, V]. labels [B, L] int64 (-100 = ignore): the fp32 SUM of
        the cross-entropies of supervised tokens (the trainer divides by the global count);
        with reduction="none" each token's cross-entropy, fp32 [B, L], 0 where the label is -100
        (its negative is log p(label), which preference losses sum per sequence), through the
        same chunked kernel, so the [B, L, V] logits are never materialised either.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = LMHead(config, self.model.embed_tokens.weight if config.tie_word_embeddings else None)
        self.gradient_checkpointing = False
        self.register_state_dict_post_hook(_drop_tied_head)
        self.register_load_state_dict_post_hook(_allow_missing_tied_head)

    def tie_weights(self) -> None:
        """Re-share the embedding with the LM head (after `to_empty`, which un-shares them)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def new_kv_cache(self, batch_size: int, max_len: int) -> KVCache:
        p = self.model.embed_tokens.weight
        return KVCache(self.config, batch_size, max_len, dtype=p.dtype, device=p.device)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        kv_cache: Optional[KVCache] = None,
        reduction: str = "sum",
    ) -> torch.Tensor:
        B, L = input_ids.shape
        start = 0 if kv_cache is None else kv_cache.length
        doc_ids = None
        if position_ids is None:
            position_ids = torch.arange(start, start + L, device=input_ids.device).expand(B, L)
        else:
            position_ids = position_ids.to(input_ids.device).expand(B, L)
            starts = position_ids[:, 1:] == 0
            if kv_cache is None and bool(starts.any()):  # several documents in a row: mask across them
                doc_ids = (position_ids == 0).cumsum(dim=1)
        self._check_span(start + L, kv_cache)

        x = self.model.embed_tokens(input_ids)
        types = self.config.layer_types or ["full_attention"] * self.config.num_hidden_layers
        rope = {"full_attention": rope_cos_sin(rope_inv_freq(self.config, x.device), position_ids, x.dtype)}
        if self.config.family == "gemma3":  # sqrt(hidden) in the embedding dtype, as transformers
            x = x * torch.tensor(self.config.hidden_size**0.5).to(x.dtype)
            if "sliding_attention" in types:
                local = rope_inv_freq(self.config, x.device, local=True)
                rope["sliding_attention"] = rope_cos_sin(local, position_ids, x.dtype)
        use_ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled() and kv_cache is None
        for i, block in enumerate(self.model.layers):
            cos, sin = rope[types[i]]
            if use_ckpt:
                x = checkpoint(block, x, cos, sin, doc_ids, use_reentrant=False)
            else:
                x = block(x, cos, sin, doc_ids, kv_cache, i)
        x = self.model.norm(x)
        if kv_cache is not None:
            kv_cache.length += L
        return self.lm_head(x, labels, reduction)

    def _check_span(self, span: int, kv_cache: Optional[KVCache]) -> None:
        window = self.config.sliding_window
        if window is not None and span > window and self.config.family == "mistral":
            raise UserError(
                f"attention span {span} exceeds this model's sliding window {window}; sliding-window "
                f"attention is not implemented, so keep sequences (prompt + new tokens) <= {window}"
            )
        if kv_cache is not None:
            if span > kv_cache.max_len:
                raise ValueError(f"KV cache holds {kv_cache.max_len} positions, this call needs {span}")
            if kv_cache.length > 0 and span - kv_cache.length != 1:
                raise ValueError("after the prefill, a KV-cache forward takes exactly one new token per row")


def _drop_tied_head(module: Decoder, state_dict, prefix: str, local_metadata) -> None:
    if module.config.tie_word_embeddings:
        state_dict.pop(prefix + "lm_head.weight", None)


def _allow_missing_tied_head(module: Decoder, incompatible_keys) -> None:
    if module.config.tie_word_embeddings:
        missing = incompatible_keys.missing_keys
        missing[:] = [k for k in missing if not (k == "lm_head.weight" or k.endswith(".lm_head.weight"))]
