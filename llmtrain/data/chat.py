"""Chat templates and assistant-only loss masks for supervised fine-tuning.

    template = resolve_template("auto", tokenizer)      # the checkpoint's own, or a built-in one
    encoded = encode_conversations(template, tokenizer, [messages, ...])   # [(ids, mask), ...]

A conversation is a list of {"role": "system" | "user" | "assistant", "content": str}. `mask[t]`
is 1 for tokens the model learns to produce: each assistant turn's content *and* the token that
ends the turn (end-of-turn or EOS), so a fine-tuned model learns to stop. Everything else
(system text, prompts, role headers) is 0.

Templates (`data.chat_template`):
- `checkpoint`: the tokenizer's own Jinja chat template (a released instruct model's);
- `llmtrain`: our tokenizer's reserved tokens, `<|user|>\\n...<|end|>\\n<|assistant|>\\n...<|end|>`;
- `plain`: text role headers (`User: ` / `Assistant: `), each answer ending with EOS, for
  tokenizers without chat tokens (e.g. a released base model such as stories260K);
- `completion`: no roles, prompt then answer then EOS (task fine-tuning of a base model);
- a path to a `.jinja` file; `auto` = `checkpoint` if the tokenizer has a template, else
  `llmtrain` if it has our chat tokens, else `plain`.

Masks come from `transformers`: templates with `{% generation %}` blocks (all built-in ones) go
through `apply_chat_template(..., return_assistant_tokens_mask=True)`. Most released templates
have no such blocks; for them each assistant turn is located by rendering the conversation up to
the turn (with the generation prompt) and up to its end: the difference is the turn, trailing
whitespace excluded. A template whose renderings are not prefixes of each other has no usable
mask, and `check_mask` rejects masks that are empty, cover everything, or end a turn on a token
that is not a stop token: those are reported, never trained on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from llmtrain.errors import UserError

ROLES = ("system", "user", "assistant")
CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
_BOS = "{% if bos_token %}{{ bos_token }}{% endif %}"

BUILTIN = {
    "llmtrain": (
        _BOS + "{% for m in messages %}"
        "{% if m['role'] == 'assistant' %}<|assistant|>\n{% generation %}{{ m['content'] }}<|end|>{% endgeneration %}{{ '\\n' }}"
        "{% else %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    ),
    "plain": (
        _BOS + "{% for m in messages %}"
        "{% if m['role'] == 'assistant' %}Assistant: {% generation %}{{ m['content'] }}{{ eos_token }}{% endgeneration %}{{ '\\n' }}"
        "{% elif m['role'] == 'system' %}{{ m['content'] }}\n"
        "{% else %}User: {{ m['content'] }}\n{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}Assistant: {% endif %}"
    ),
    "completion": (
        _BOS + "{% for m in messages %}"
        "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{{ eos_token }}{% endgeneration %}"
        "{% else %}{{ m['content'] }}{% endif %}{% endfor %}"
    ),
}
CHOICES = ("auto", "checkpoint", *BUILTIN)
_GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")


@dataclass(frozen=True)
class ChatTemplate:
    name: str  # checkpoint | llmtrain | plain | completion | a .jinja path
    source: str  # the Jinja text
    stop_ids: tuple[int, ...]  # tokens that may end an assistant turn

    @property
    def has_generation_blocks(self) -> bool:
        return bool(_GENERATION_BLOCK.search(self.source))


def resolve_template(choice: str, tokenizer, extra_stop_ids: Sequence[int] = ()) -> ChatTemplate:
    """The template `data.chat_template=choice` names for this tokenizer (llmtrain.data.tokenizer).
    `extra_stop_ids`: end ids the base model declares (config / generation_config eos)."""
    hf = tokenizer.hf()
    own = hf.chat_template
    if isinstance(own, dict):  # several named templates: the default one
        own = own.get("default")
    if choice == "auto":
        choice = "checkpoint" if own else ("llmtrain" if has_chat_tokens(tokenizer) else "plain")
    stops = {i for i in extra_stop_ids if i is not None}
    if tokenizer.eos_id is not None:
        stops.add(tokenizer.eos_id)
    if choice == "checkpoint":
        if not own:
            raise UserError(
                f"{tokenizer.path}: the tokenizer has no chat template; set data.chat_template to "
                "llmtrain, plain, completion or a .jinja file"
            )
        return ChatTemplate("checkpoint", own, tuple(sorted(stops)))
    if choice in BUILTIN:
        if choice == "llmtrain":
            if not has_chat_tokens(tokenizer):
                raise UserError(
                    f"data.chat_template=llmtrain needs the tokens {' '.join(CHAT_TOKENS)}, which the tokenizer "
                    f"{tokenizer.path} lacks; use data.chat_template=plain or completion"
                )
            stops.add(tokenizer.token_to_id("<|end|>"))
        elif tokenizer.eos_id is None:
            raise UserError(
                f"data.chat_template={choice} ends answers with EOS, but the tokenizer {tokenizer.path} has none; "
                "use a tokenizer with an EOS token or a .jinja template"
            )
        return ChatTemplate(choice, BUILTIN[choice], tuple(sorted(stops)))
    path = Path(choice).expanduser()
    if path.suffix != ".jinja" or not path.is_file():
        raise UserError(f"data.chat_template={choice!r}: expected one of {', '.join(CHOICES)} or an existing .jinja file")
    return ChatTemplate(str(path.resolve()), path.read_text(encoding="utf-8"), tuple(sorted(stops)))


def has_chat_tokens(tokenizer) -> bool:
    """True when each of our chat tokens is a single id of `tokenizer` (ours have them reserved)."""
    for token in CHAT_TOKENS:
        tid = tokenizer.token_to_id(token)
        if tid is None or tokenizer.hf().encode(token, add_special_tokens=False) != [tid]:
            return False
    return True


class TemplateError(Exception):
    """A conversation the template cannot render or mask; `sft.py` names the record."""


def encode_conversations(template: ChatTemplate, tokenizer, conversations: list[list[dict]]) -> list[tuple[list[int], list[int]]]:
    """(token ids, assistant mask) of each conversation, as the template renders it."""
    hf = tokenizer.hf()
    if not conversations:
        return []
    if template.has_generation_blocks:
        try:
            out = hf.apply_chat_template(
                conversations, chat_template=template.source, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
            )
        except Exception as err:  # jinja's TemplateError / raise_exception() in the template
            raise TemplateError(_first_line(err)) from None
        return [(list(ids), list(mask)) for ids, mask in zip(out["input_ids"], out["assistant_masks"])]
    return [_encode_by_prefixes(template, hf, conv) for conv in conversations]


def _render(hf, source: str, messages: list[dict], generation_prompt: bool) -> str:
    try:
        return hf.apply_chat_template(messages, chat_template=source, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as err:
        raise TemplateError(_first_line(err)) from None


def _encode_by_prefixes(template: ChatTemplate, hf, conv: list[dict]) -> tuple[list[int], list[int]]:
    """Assistant spans of a template without {% generation %}: render up to each turn and diff."""
    text = _render(hf, template.source, conv, False)
    spans = []
    for i, message in enumerate(conv):
        if message["role"] != "assistant":
            continue
        before = _render(hf, template.source, conv[:i], True) if i else ""
        upto = _render(hf, template.source, conv[: i + 1], False)
        if not (upto.startswith(before) and text.startswith(upto)):
            raise TemplateError(
                f"template {template.name} has no {{% generation %}} blocks and renders turn {i + 1} differently once later "
                "turns follow, so the assistant tokens cannot be located"
            )
        spans.append((len(before), len(upto.rstrip())))
    enc = hf(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(a < e and b > s for s, e in spans)) for a, b in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


def check_mask(ids: Sequence[int], mask: Sequence[int], template: ChatTemplate, tokenizer, truncated: bool) -> Optional[str]:
    """Why this example's assistant mask is unusable, or None when it is fine."""
    n = sum(mask[1:])  # token 0 is never predicted
    if n == 0:
        return (
            f"template {template.name} marks no assistant tokens (its {{% generation %}} blocks, or the turns it renders, "
            "do not cover the answers)"
        )
    if n == len(ids) - 1:
        return f"template {template.name} marks every token as assistant output, prompts included"
    if truncated:
        return None
    ends = [t for t in range(1, len(ids)) if mask[t] and (t + 1 == len(ids) or not mask[t + 1])]
    for t in ends:
        if ids[t] not in template.stop_ids:
            shown = tokenizer.decode(list(ids[max(0, t - 3) : t + 1]))
            stops = ", ".join(repr(tokenizer.id_to_token(i)) for i in template.stop_ids)
            return (
                f"template {template.name} ends an assistant turn with {shown!r}, not an end-of-turn/EOS token ({stops}), "
                "so a fine-tuned model would never learn to stop; put the end token inside the {% generation %} block"
            )
    return None


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
