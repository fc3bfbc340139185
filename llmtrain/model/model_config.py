"""`ModelConfig`: the decoder's shape, its named presets, and its Hugging Face `config.json` form.

One dataclass describes every supported family (Llama, Mistral, Qwen2, Qwen3, Gemma 3 text,
Phi-3); the families differ only in a few switches (qkv bias, q/k norm, sliding window; Gemma 3's
norms, GeGLU, scaled embeddings and per-layer attention types) and in how `config.json` spells
them, which `from_hf_config` / `to_hf_config` translate. (Phi-3's fused qkv_proj / gate_up_proj
are a checkpoint layout, translated by llmtrain/model/hf.py.)

    cfg = ModelConfig.from_preset("tiny", vocab_size=8000)
    cfg.num_params(), cfg.flops_per_token(seq_len=256)
    hf = cfg.to_hf_config()                       # dict for config.json (transformers loads it)
    assert ModelConfig.from_hf_config(hf) == cfg
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Union

from llmtrain.errors import UserError

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3")
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
}
# config.json's model_type of each family (Gemma 3's text-only model is "gemma3_text"; "gemma3"
# there is the multimodal Gemma3ForConditionalGeneration, which llmtrain does not load).
MODEL_TYPES = {f: f for f in FAMILIES} | {"gemma3": "gemma3_text"}
_FAMILY_OF = {t: f for f, t in MODEL_TYPES.items()}
LAYER_TYPES = ("sliding_attention", "full_attention")
# Fields only some families use: None elsewhere, and left out of `to_dict` when None (so the
# shape recorded by checkpoints of the other families is unchanged).
_OPTIONAL_FIELDS = ("layer_types", "rope_local_theta", "query_pre_attn_scalar", "final_logit_softcapping")
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")

# What transformers' config classes assume when config.json omits a key (v5 class defaults).
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, num_key_value_heads=None, head_dim=None),
    "mistral": dict(
        max_position_embeddings=4096 * 32,
        bos_token_id=1,
        eos_token_id=2,
        num_key_value_heads=8,
        head_dim=None,
        sliding_window=4096,
    ),
    "qwen2": dict(max_position_embeddings=32768, bos_token_id=None, eos_token_id=None, num_key_value_heads=32, head_dim=None),
    "qwen3": dict(max_position_embeddings=32768, bos_token_id=None, eos_token_id=None, num_key_value_heads=32, head_dim=128),
    "gemma3": dict(
        max_position_embeddings=131072,
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
        num_key_value_heads=4,
        head_dim=256,
        sliding_window=4096,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        query_pre_attn_scalar=256,
        rope_theta=1_000_000.0,
        rope_local_base_freq=10_000.0,
        sliding_window_pattern=6,
    ),
    "phi3": dict(
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=32000,
        pad_token_id=32000,
        num_key_value_heads=None,
        head_dim=None,
        sliding_window=None,
    ),
}


@dataclass
class ModelConfig:
    """Shape of a Llama-family decoder. Field names follow Hugging Face's config classes.

    `attention_bias` puts biases on the q/k/v projections, `attention_out_bias` on o_proj
    (Llama/Qwen3 `attention_bias` sets both; Qwen2 always has qkv bias only). `qk_norm` is
    Qwen3's per-head RMSNorm of q and k before RoPE. `sliding_window` (Mistral) is honoured by
    refusing any attention span longer than the window: up to it, sliding-window attention
    equals full causal attention, and longer spans are not implemented. Phi-3 and Gemma 3 do
    attend within their windows (Gemma 3 only in its `sliding_attention` layers).

    Gemma 3 (family "gemma3"): (1 + w) RMSNorms before and after attention and the MLP, GeGLU
    with tanh GELU, embeddings scaled by sqrt(hidden_size), q/k norm, attention scale
    `query_pre_attn_scalar`^-0.5, `layer_types` (one of LAYER_TYPES per layer) whose sliding
    layers use RoPE base `rope_local_theta` and the global ones `rope_theta` (and
    `rope_scaling`, linear), and optional `final_logit_softcapping` (tanh) on the logits.
    """

    family: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 256
    intermediate_size: int = 704
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    max_position_embeddings: int = 1024
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict[str, Any]] = None
    attention_bias: bool = False
    attention_out_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    sliding_window: Optional[int] = None
    bos_token_id: Optional[int] = 1
    eos_token_id: Union[int, list[int], None] = 2
    pad_token_id: Optional[int] = None
    layer_types: Optional[list[str]] = None
    rope_local_theta: Optional[float] = None
    query_pre_attn_scalar: Optional[float] = None
    final_logit_softcapping: Optional[float] = None

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and self.num_attention_heads > 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if isinstance(self.eos_token_id, (list, tuple)):
            self.eos_token_id = [int(e) for e in self.eos_token_id]
        if self.family == "gemma3":  # transformers' Gemma3TextConfig defaults
            if self.layer_types is None:
                self.layer_types = [LAYER_TYPES[(i + 1) % 6 == 0] for i in range(self.num_hidden_layers)]
            self.layer_types = list(self.layer_types)
            if self.rope_local_theta is None:
                self.rope_local_theta = 10_000.0
            if self.query_pre_attn_scalar is None:
                self.query_pre_attn_scalar = 256
        self._validate()

    # -----------------------------------------------------------------------------------------
    # Validation

    def _validate(self) -> None:
        def bad(problem: str, fix: str) -> UserError:
            return UserError(f"model config ({self.family}): {problem}; {fix}")

        if self.family not in FAMILIES:
            raise bad(f"unknown family {self.family!r}", f"use one of {', '.join(FAMILIES)}")
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise bad(f"{name}={value!r} must be a positive integer", f"set {name} to a positive integer")
        if self.num_attention_heads % self.num_key_value_heads:
            raise bad(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of num_key_value_heads={self.num_key_value_heads}",
                "choose a number of KV heads that divides the number of heads",
            )
        if self.head_dim % 2:
            raise bad(f"head_dim={self.head_dim} is odd", "RoPE needs an even head_dim")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise bad(f"sliding_window={self.sliding_window} must be positive", "set it to null or a positive length")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind == "linear" and self.family == "gemma3":  # Gemma 3 4B+ global layers
                if not isinstance(self.rope_scaling.get("factor"), (int, float)):
                    raise bad("linear rope scaling lacks a numeric factor", "give rope_scaling.factor")
                self.rope_scaling = {"rope_type": "linear", "factor": float(self.rope_scaling["factor"])}
            elif kind != "llama3":
                raise bad(f"rope scaling type {kind!r} is not supported", "use no rope scaling or rope_type 'llama3'")
            else:
                missing = [k for k in LLAMA3_ROPE_KEYS if k not in self.rope_scaling]
                if missing:
                    raise bad(f"llama3 rope scaling lacks {', '.join(missing)}", f"give all of {', '.join(LLAMA3_ROPE_KEYS)}")
                self.rope_scaling = {"rope_type": "llama3", **{k: self.rope_scaling[k] for k in LLAMA3_ROPE_KEYS}}
        f = self.family
        if f == "qwen2" and not (self.attention_bias and not self.attention_out_bias):
            raise bad("Qwen2 has biases on q/k/v and none on o_proj", "set attention_bias=True, attention_out_bias=False")
        if f in ("qwen2", "phi3") and self.head_dim != self.hidden_size // self.num_attention_heads:
            raise bad(
                f"this family has head_dim = hidden_size / num_attention_heads, got {self.head_dim}",
                "drop head_dim or use family qwen3",
            )
        if f in ("llama", "qwen3", "gemma3") and self.attention_bias != self.attention_out_bias:
            raise bad("attention_bias covers q/k/v and o_proj together in this family", "set attention_bias = attention_out_bias")
        if f in ("mistral", "phi3") and (self.attention_bias or self.attention_out_bias):
            raise bad("this family has no attention biases", "set attention_bias=attention_out_bias=False")
        if self.qk_norm != (f in ("qwen3", "gemma3")):
            raise bad(
                f"qk_norm={self.qk_norm} does not match the family (only Qwen3 has q/k norm, and Gemma 3 always)",
                "use family qwen3 for q/k norm",
            )
        if self.sliding_window is not None and f not in ("mistral", "gemma3", "phi3"):
            raise bad("sliding_window is only supported for the Mistral, Gemma 3 and Phi-3 families", "set sliding_window=None")
        if f != "gemma3":
            extra = [k for k in _OPTIONAL_FIELDS if getattr(self, k) is not None]
            if extra:
                raise bad(f"{extra[0]} is a Gemma 3 setting", f"set {extra[0]}=None or use family gemma3")
            return
        if len(self.layer_types) != self.num_hidden_layers or any(t not in LAYER_TYPES for t in self.layer_types):
            raise bad(
                f"layer_types must name one of {', '.join(LAYER_TYPES)} for each of the {self.num_hidden_layers} layers",
                "fix layer_types or drop it (every 6th layer global)",
            )
        if "sliding_attention" in self.layer_types and self.sliding_window is None:
            raise bad("sliding_attention layers need a sliding_window", "set sliding_window")
        for name in ("rope_local_theta", "query_pre_attn_scalar", "final_logit_softcapping"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise bad(f"{name}={value!r} must be positive", f"set {name} to a positive number")

    # -----------------------------------------------------------------------------------------
    # Presets and plain-dict form

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named preset (`PRESETS`), with fields overridden, e.g. `from_preset("tiny", vocab_size=512)`."""
        if name not in PRESETS:
            raise UserError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"model config: unknown field(s) {', '.join(unknown)}; valid fields: {', '.join(sorted(known))}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable fields (what checkpoints record to refuse a resume into another shape);
        the Gemma-3-only fields only when set."""
        data = dataclasses.asdict(self)
        return {k: v for k, v in data.items() if not (k in _OPTIONAL_FIELDS and v is None)}

    # -----------------------------------------------------------------------------------------
    # Size and compute

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (tied embeddings counted once). `non_embedding` drops the
        embedding table and the LM head, leaving the transformer blocks and the final norm."""
        h, hd, nh, nkv = self.hidden_size, self.head_dim, self.num_attention_heads, self.num_key_value_heads
        attn = h * nh * hd + 2 * h * nkv * hd + nh * hd * h
        attn += (nh * hd + 2 * nkv * hd) * self.attention_bias + h * self.attention_out_bias
        attn += 2 * hd * self.qk_norm
        block = attn + 3 * h * self.intermediate_size + (4 if self.family == "gemma3" else 2) * h
        body = self.num_hidden_layers * block + h
        if non_embedding:
            return body
        embeddings = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return body + embeddings

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), as in PaLM appendix B / nanoGPT:

            6 N + 12 L H Q T

        N = parameters used in matrix multiplies = blocks + final norm + LM head (vocab x hidden;
        the input embedding is a lookup and costs nothing), L layers, H attention heads, Q head
        dim, T sequence length. The attention term counts QK^T and AV for every query-key pair
        (the causal mask is not discounted), x2 FLOPs per multiply-add, x3 for fwd + bwd."""
        n = self.num_params(non_embedding=True) + self.vocab_size * self.hidden_size
        return 6.0 * n + 12.0 * self.num_hidden_layers * self.num_attention_heads * self.head_dim * seq_len

    # -----------------------------------------------------------------------------------------
    # Hugging Face config.json

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> ModelConfig:
        """Read a `config.json` dict (transformers v4 or v5 spelling) of a supported family."""
        model_type = hf.get("model_type")
        family = _FAMILY_OF.get(model_type)
        if family is None:
            arch = ", ".join(hf.get("architectures") or []) or "unknown architecture"
            raise UserError(
                f"model_type {model_type!r} ({arch}) is not supported; llmtrain loads "
                f"{', '.join(MODEL_TYPES.values())} checkpoints"
            )
        defaults = _HF_DEFAULTS[family]

        def get(key: str) -> Any:  # an explicit null counts (e.g. Mistral's "sliding_window": null)
            return hf[key] if key in hf else defaults.get(key)

        missing = [
            k
            for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
            if hf.get(k) is None
        ]
        if missing:
            raise UserError(f"config.json ({family}) lacks {', '.join(missing)}; it is not a complete model config")
        if family == "gemma3":
            act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
            if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
                raise UserError(f"config.json (gemma3_text): hidden_activation {act!r} is not supported; use gelu_pytorch_tanh")
        elif hf.get("hidden_act", "silu") not in ("silu", "swish"):
            raise UserError(f"config.json: hidden_act {hf['hidden_act']!r} is not supported; llmtrain's MLP is SwiGLU (silu)")
        if hf.get("mlp_bias"):
            raise UserError("config.json: mlp_bias=true is not supported; llmtrain's MLP has no biases")
        if hf.get("quantization_config"):
            raise UserError("config.json: quantized checkpoints are not supported; use the unquantized (bf16/fp32) weights")
        if family in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
            raise UserError(f"config.json ({family}): use_sliding_window=true is not supported; set it to false (full attention)")

        gemma = _gemma3_fields(hf, get) if family == "gemma3" else {}
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        if family == "gemma3":
            rope = dict(gemma.pop("global_rope"))
        theta = rope.pop("rope_theta", hf.get("rope_theta", get("rope_theta") or 10000.0))
        if family == "phi3":
            partial = rope.pop("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
            if partial != 1.0:
                raise UserError(
                    f"config.json (phi3): partial_rotary_factor={partial} is not supported; llmtrain rotates every dim"
                )
        kind = rope.get("rope_type", rope.get("type", "default"))
        scaling = None
        if kind == "llama3":
            rope.setdefault("original_max_position_embeddings", get("max_position_embeddings"))
            scaling = rope
        elif kind == "linear" and family == "gemma3":
            scaling = rope
        elif family == "phi3" and kind in ("longrope", "su", "yarn"):
            raise UserError(
                f"config.json (phi3): rope scaling type {kind!r} (Phi-3 long context) is not supported; "
                "use a 4k-context Phi-3 checkpoint (no rope_scaling)"
            )
        elif kind != "default":
            raise UserError(
                f"config.json: rope scaling type {kind!r} is not supported; llmtrain implements default and llama3 RoPE"
            )

        heads = hf["num_attention_heads"]
        bias = bool(hf.get("attention_bias", False))
        return cls(
            family=family,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=get("num_key_value_heads") or heads,
            head_dim=get("head_dim") if family not in ("qwen2", "phi3") else None,
            max_position_embeddings=get("max_position_embeddings"),
            rms_norm_eps=float(get("rms_norm_eps") or 1e-6),
            rope_theta=float(theta),
            rope_scaling=scaling,
            attention_bias=True if family == "qwen2" else bias and family not in ("mistral", "phi3"),
            attention_out_bias=bias and family in ("llama", "qwen3", "gemma3"),
            qk_norm=family in ("qwen3", "gemma3"),
            tie_word_embeddings=bool(get("tie_word_embeddings") or False),
            initializer_range=float(hf.get("initializer_range", 0.02)),
            sliding_window=get("sliding_window") if family in ("mistral", "gemma3", "phi3") else None,
            bos_token_id=get("bos_token_id"),
            eos_token_id=get("eos_token_id"),
            pad_token_id=get("pad_token_id"),
            **gemma,
        )

    def to_hf_config(self, dtype: Optional[str] = None) -> dict[str, Any]:
        """The `config.json` dict for this family, readable by transformers v5 (`rope_parameters`)
        and by older readers (`rope_theta` / `rope_scaling`). `dtype`: e.g. "bfloat16"."""
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope = {**self.rope_scaling, "rope_theta": self.rope_theta}
        hf: dict[str, Any] = {
            "architectures": [ARCHITECTURES[self.family]],
            "model_type": MODEL_TYPES[self.family],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": self.initializer_range,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None if self.rope_scaling is None else dict(self.rope_scaling),
            "rope_parameters": rope,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "attention_dropout": 0.0,
            "use_cache": True,
        }
        if self.family not in ("qwen2", "phi3"):
            hf["head_dim"] = self.head_dim
        if self.family in ("llama", "qwen3"):
            hf["attention_bias"] = self.attention_bias
        if self.family == "llama":
            hf["mlp_bias"] = False
        if self.family == "mistral":
            hf["sliding_window"] = self.sliding_window
        if self.family in ("qwen2", "qwen3"):
            hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=self.num_hidden_layers)
        if self.family == "phi3":
            rope["partial_rotary_factor"] = 1.0
            hf.update(
                sliding_window=self.sliding_window,
                original_max_position_embeddings=self.max_position_embeddings,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
            )
        if self.family == "gemma3":
            local = {"rope_type": "default", "rope_theta": self.rope_local_theta}
            del hf["hidden_act"]
            hf.update(
                hidden_activation="gelu_pytorch_tanh",
                attention_bias=self.attention_bias,
                sliding_window=self.sliding_window,
                layer_types=list(self.layer_types),
                rope_local_base_freq=self.rope_local_theta,
                rope_parameters={"full_attention": rope, "sliding_attention": local},
                query_pre_attn_scalar=self.query_pre_attn_scalar,
                final_logit_softcapping=self.final_logit_softcapping,
                attn_logit_softcapping=None,
                use_bidirectional_attention=False,
            )
        if dtype is not None:
            hf["dtype"] = hf["torch_dtype"] = dtype
        return hf


def _gemma3_fields(hf: dict[str, Any], get) -> dict[str, Any]:
    """Gemma 3's own config.json fields (v4 or v5 spelling) as ModelConfig keyword arguments,
    plus "global_rope" (the full-attention layers' rope dict, popped by the caller)."""
    if hf.get("attn_logit_softcapping") is not None:
        raise UserError("config.json (gemma3_text): attn_logit_softcapping is not supported; Gemma 3 checkpoints have none")
    if hf.get("use_bidirectional_attention"):
        raise UserError("config.json (gemma3_text): use_bidirectional_attention=true is not supported; llmtrain is causal")
    layers = hf["num_hidden_layers"]
    types = hf.get("layer_types")
    if types is None:
        pattern = int(get("sliding_window_pattern"))
        types = [LAYER_TYPES[(i + 1) % pattern == 0] for i in range(layers)]
    params = hf.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:  # v5: one rope dict per layer type
        global_rope = dict(params.get("full_attention") or {})
        global_rope.setdefault("rope_theta", get("rope_theta"))
        local = dict(params.get("sliding_attention") or {})
        if local.get("rope_type", local.get("type", "default")) != "default":
            raise UserError("config.json (gemma3_text): rope scaling on sliding-attention layers is not supported")
        local_theta = local.get("rope_theta", get("rope_local_base_freq"))
    else:  # v4: rope_theta, rope_local_base_freq, rope_scaling for the global layers
        global_rope = dict(hf.get("rope_scaling") or {})
        global_rope["rope_theta"] = get("rope_theta")
        local_theta = get("rope_local_base_freq")
    return dict(
        layer_types=list(types),
        rope_local_theta=float(local_theta),
        query_pre_attn_scalar=get("query_pre_attn_scalar"),
        final_logit_softcapping=hf.get("final_logit_softcapping"),
        global_rope=global_rope,
    )


# ---------------------------------------------------------------------------------------------
# Presets. The vocabulary normally comes from the tokenizer (the trainer overrides vocab_size).

PRESETS: dict[str, dict[str, Any]] = {
    # ~5M parameters at vocab 8000: CPU tests and the quickstart.
    "tiny": dict(
        family="llama",
        vocab_size=8000,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    ),
    # GPT-3 "small" width/depth with a Llama block and GQA: ~124M parameters at vocab 32000.
    "125m": dict(
        family="llama",
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2816,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    ),
    # Llama-3.2-1B shape (without its long-context rope scaling): 1.24B parameters at vocab 128256.
    "1b": dict(
        family="llama",
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
    # Llama-3.1-8B shape, llama3 rope scaling to 128k positions: 8.03B parameters.
    "8b": dict(
        family="llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        rope_scaling=dict(
            rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
        ),
        bos_token_id=128000,
        eos_token_id=128001,
    ),
}
