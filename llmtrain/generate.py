"""Text generation with the KV cache: greedy, temperature, top-k and top-p sampling.

    llmtrain generate ../shared/checkpoints/stories260K --prompt "Once upon a time" --max-new-tokens 40
    llmtrain generate out/ --prompt "Hello" --prompt "The sea" --temperature 0.8 --top-p 0.9 --seed 0

In Python:

    model = load_hf_model("out/")
    tokens = generate(model, prompt_ids, max_new_tokens=40)        # prompt + continuation
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import torch

from llmtrain.errors import UserError
from llmtrain.model.hf import load_hf_config, load_hf_model

EosIds = Union[int, Iterable[int], None]


@torch.no_grad()
def generate(
    model,
    input_ids: Union[Sequence[int], torch.Tensor],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    eos_id: EosIds = None,
    seed: Optional[int] = None,
) -> Union[list[int], torch.Tensor]:
    """Continue `input_ids` (a list / 1-D tensor, or a [B, L] tensor of equal-length rows) by up
    to `max_new_tokens` tokens. temperature 0 = greedy (top_k/top_p ignored); otherwise sample
    from softmax(logits / temperature) restricted to the top_k tokens and the smallest set whose
    probability reaches top_p. Stops when every row has produced an `eos_id` (kept in the output;
    finished rows are padded with it). Returns prompt + continuation: a list for 1-D input,
    else a [B, L + n] tensor. `seed` makes sampling reproducible."""
    _check_sampling(max_new_tokens, temperature, top_k, top_p)
    device = model.model.embed_tokens.weight.device
    single = not torch.is_tensor(input_ids) or input_ids.dim() == 1
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=device)
    ids = ids.reshape(1, -1) if single else ids
    B, L = ids.shape
    if L == 0:
        raise UserError("empty prompt: give at least one token (e.g. the tokenizer's BOS)")
    limit = model.config.max_position_embeddings
    if L + max_new_tokens > limit:
        raise UserError(
            f"prompt ({L} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"{limit} positions; shorten the prompt or lower --max-new-tokens"
        )
    eos = torch.tensor(sorted(_eos_set(eos_id)), dtype=torch.long, device=device)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)

    was_training = model.training
    model.eval()
    try:
        cache = model.new_kv_cache(B, L + max_new_tokens)
        logits = model(ids, kv_cache=cache)[:, -1]
        out, done = [ids], torch.zeros(B, dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            token = _next_token(logits.float(), temperature, top_k, top_p, generator)
            if eos.numel():
                token = torch.where(done, eos[0], token)
                done |= torch.isin(token, eos)
            out.append(token[:, None])
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            logits = model(token[:, None], kv_cache=cache)[:, -1]
    finally:
        model.train(was_training)
    result = torch.cat(out, dim=1)
    return result[0].tolist() if single else result


def _eos_set(eos_id: EosIds) -> set[int]:
    if eos_id is None:
        return set()
    if isinstance(eos_id, int):
        return {eos_id}
    return {int(e) for e in eos_id}


def _check_sampling(max_new_tokens: int, temperature: float, top_k: Optional[int], top_p: Optional[float]) -> None:
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {max_new_tokens}: must be >= 1 (the number of tokens to generate)")
    if temperature < 0:
        raise UserError(f"--temperature {temperature:g}: must be >= 0 (0 = greedy)")
    if top_k is not None and top_k < 1:
        raise UserError(f"--top-k {top_k}: must be >= 1 (or omitted)")
    if top_p is not None and not 0 < top_p <= 1:
        raise UserError(f"--top-p {top_p:g}: must be in (0, 1] (or omitted)")


def _next_token(
    logits: torch.Tensor, temperature: float, top_k: Optional[int], top_p: Optional[float], generator: Optional[torch.Generator]
) -> torch.Tensor:
    """logits [B, V] (fp32) -> token ids [B]."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p  # mass before this token already reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ---------------------------------------------------------------------------------------------
# `llmtrain generate`


def complete(
    model_dir: Union[str, os.PathLike],
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    seed: Optional[int] = None,
) -> list[str]:
    """Load a Hugging Face-format directory (weights + tokenizer, local files only) and return
    each prompt followed by its continuation, as text."""
    _check_sampling(max_new_tokens, temperature, top_k, top_p)
    load_hf_config(model_dir)  # a clear error for a wrong directory before the tokenizer's
    tokenizer = load_tokenizer(model_dir)
    on_gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if on_gpu and torch.cuda.is_bf16_supported() else torch.float32
    model = load_hf_model(model_dir, dtype=dtype, device="cuda" if on_gpu else "cpu")
    eos = eos_ids(model_dir, model.config.eos_token_id, tokenizer.eos_token_id)
    texts = []
    for i, prompt in enumerate(prompts):
        ids = tokenizer(prompt)["input_ids"]
        if not ids and model.config.bos_token_id is not None:
            ids = [model.config.bos_token_id]
        tokens = generate(
            model,
            ids,
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            eos_id=eos,
            seed=None if seed is None else seed + i,
        )
        texts.append(tokenizer.decode(tokens, skip_special_tokens=True))
    return texts


def eos_ids(model_dir, config_eos: EosIds, tokenizer_eos: Optional[int]) -> EosIds:
    """generation_config.json's eos ids (e.g. Llama-3-Instruct's list), else config.json's, else the tokenizer's."""
    path = Path(model_dir) / "generation_config.json"
    if path.is_file():
        try:
            eos = json.loads(path.read_text()).get("eos_token_id")
        except json.JSONDecodeError:
            raise UserError(f"{path}: invalid JSON; fix or delete the file") from None
        if eos is not None:
            return eos
    return config_eos if config_eos is not None else tokenizer_eos


def load_tokenizer(model_dir: Union[str, os.PathLike]):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"{model_dir}: cannot load its tokenizer ({first}); the directory needs the tokenizer "
            "files (tokenizer.json / tokenizer.model + tokenizer_config.json)"
        ) from None
