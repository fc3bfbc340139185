"""Tokenizers: one `Tokenizer` interface over our sentencepiece models and over the tokenizer of
a released Hugging Face checkpoint directory; training of our own lives in `tokenizer_train.py`.

    tok = load_tokenizer("tok/")                        # ours: tokenizer.model (+ HF files)
    tok = load_tokenizer("../shared/checkpoints/stories260K")   # released: tokenizer.json
    ids = tok.encode("Hello world")                     # no BOS/EOS
    flat, lengths = tok.encode_documents(texts)         # [BOS] doc [EOS] per text, multi-threaded
    tok.hf()                                            # the transformers tokenizer, same ids

Which files decide (the "backend"):
- a directory made by `llmtrain tokenizer` (it holds `llmtrain_tokenizer.json`), or one with only
  `tokenizer.model`: sentencepiece, whose batch encoder runs on C++ threads without the GIL;
- any other directory with `tokenizer.json` (Llama/Qwen/Mistral releases, stories260K): the Rust
  `tokenizers` library, which is exactly what `transformers` runs.
Special-token strings in text (e.g. `<|endoftext|>`, `</s>`) never become control ids when we
encode data; ids of our chat tokens and other non-special added tokens do match in text.
A directory holding a `tokenizer/` subdirectory (a prepared data dir, a run dir) is accepted too.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from functools import cached_property
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from llmtrain.errors import UserError

MARKER = "llmtrain_tokenizer.json"
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    MARKER,
)
_UNLIMITED = 10**8  # transformers writes ~1e30 as model_max_length when a tokenizer has no limit

# Texts longer than this are encoded in pieces (cut before a space between two non-spaces) so
# one huge document does not serialise the thread pool; used only where it is exact (see below).
_PIECE_CHARS = 1 << 15
_CUT = re.compile(r"(?<=\S) (?=\S)")


def _threads(num_threads: Optional[int]) -> int:
    return max(1, num_threads or os.cpu_count() or 1)


class _SentencePiece:
    name = "sentencepiece"

    def __init__(self, model_file: Path):
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2

        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        except (OSError, RuntimeError) as err:
            raise UserError(f"{model_file}: not a sentencepiece model ({err}); re-create the tokenizer") from None
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(self.sp.serialized_model_proto())
        norm = proto.normalizer_spec
        # Encoding the pieces of a text separately is exact when no piece can span the cut:
        # BPE trained with whitespace splitting, no dummy prefix, no whitespace rewriting.
        self.splittable = (
            proto.trainer_spec.model_type == 2
            and proto.trainer_spec.split_by_whitespace
            and not norm.add_dummy_prefix
            and not norm.remove_extra_whitespaces
            and norm.name == "identity"
        )
        self.files = [model_file]

    def special(self) -> dict[str, Optional[int]]:
        ids = {"bos": self.sp.bos_id(), "eos": self.sp.eos_id(), "pad": self.sp.pad_id(), "unk": self.sp.unk_id()}
        return {k: (v if v >= 0 else None) for k, v in ids.items()}

    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str], threads: int) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=threads)

    def encode_arrays(self, texts: list[str], threads: int) -> list[np.ndarray]:
        return self.sp.encode(texts, num_threads=threads, return_type="numpy")

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode(list(map(int, ids)))

    def token_to_id(self, token: str) -> Optional[int]:
        i = self.sp.piece_to_id(token)
        return None if i == self.sp.unk_id() and token != self.sp.id_to_piece(i) else i

    def id_to_token(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))


class _HFTokenizers:
    name = "tokenizers"
    splittable = False

    def __init__(self, directory: Path):
        from tokenizers import Tokenizer as RustTokenizer

        path = directory / "tokenizer.json"
        try:
            self.tok = RustTokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a plain Exception on a malformed file
            raise UserError(f"{path}: cannot load ({err}); use an intact Hugging Face tokenizer.json") from None
        self.tok.encode_special_tokens = True  # "<|endoftext|>" in data is text, not a control id
        self.directory = directory
        self.files = [path]

    def special(self) -> dict[str, Optional[int]]:
        config = _read_json(self.directory / "tokenizer_config.json")
        for key, value in _read_json(self.directory / "special_tokens_map.json").items():
            config.setdefault(key, value)
        model_config = _read_json(self.directory / "config.json")
        out: dict[str, Optional[int]] = {}
        for name in ("bos", "eos", "pad", "unk"):
            token = config.get(f"{name}_token")
            if isinstance(token, dict):
                token = token.get("content")
            tid = self.tok.token_to_id(token) if isinstance(token, str) else None
            if tid is None and name in ("bos", "eos") and isinstance(model_config.get(f"{name}_token_id"), int):
                tid = model_config[f"{name}_token_id"]
            out[name] = tid
        return out

    def vocab_size(self) -> int:
        return max(self.tok.get_vocab(with_added_tokens=True).values()) + 1

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], threads: int) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch_fast(texts, add_special_tokens=False)]

    def encode_arrays(self, texts: list[str], threads: int) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.int32) for e in self.tok.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(map(int, ids)), skip_special_tokens=False)

    def token_to_id(self, token: str) -> Optional[int]:
        return self.tok.token_to_id(token)

    def id_to_token(self, i: int) -> str:
        return self.tok.id_to_token(int(i))


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: invalid JSON ({err}); fix or remove the file") from None
    return data if isinstance(data, dict) else {}


class Tokenizer:
    """A loaded tokenizer; see the module docstring. Cheap to create, safe to share across threads."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if (self.path / "tokenizer.json").is_file() and not (self.path / MARKER).is_file():
            self._backend = _HFTokenizers(self.path)
        elif (self.path / "tokenizer.model").is_file():
            self._backend = _SentencePiece(self.path / "tokenizer.model")
        else:
            raise UserError(
                f"{self.path}: no tokenizer.model or tokenizer.json; pass a dir made by `llmtrain tokenizer` "
                "or a Hugging Face checkpoint dir"
            )
        special = self._backend.special()
        self.bos_id: Optional[int] = special["bos"]
        self.eos_id: Optional[int] = special["eos"]
        self.pad_id: Optional[int] = special["pad"]
        self.unk_id: Optional[int] = special["unk"]
        self.vocab_size: int = self._backend.vocab_size()
        self.backend: str = self._backend.name

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, backend={self.backend}, vocab_size={self.vocab_size})"

    @cached_property
    def fingerprint(self) -> str:
        """sha256 over the backend, its defining file(s) and the special ids: equal iff same ids."""
        h = hashlib.sha256(self.backend.encode())
        for f in self._backend.files:
            h.update(b"\0" + f.name.encode() + b"\0" + f.read_bytes())
        h.update(json.dumps([self.bos_id, self.eos_id, self.pad_id, self.unk_id]).encode())
        return h.hexdigest()

    @cached_property
    def max_length(self) -> Optional[int]:
        """The longest sequence the tokenizer/model declares (tokenizer_config model_max_length,
        config.json max_position_embeddings); None when unlimited (our own tokenizers)."""
        limits = [
            _read_json(self.path / "tokenizer_config.json").get("model_max_length"),
            _read_json(self.path / "config.json").get("max_position_embeddings"),
        ]
        limits = [int(v) for v in limits if isinstance(v, (int, float)) and 0 < v < _UNLIMITED]
        return min(limits) if limits else None

    # -- encoding ---------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS."""
        return self._backend.encode(text)

    def encode_batch(self, texts: Sequence[str], num_threads: Optional[int] = None) -> list[list[int]]:
        """`encode` of every text, on all cores (C++/Rust threads)."""
        return self._backend.encode_batch(list(texts), _threads(num_threads))

    def encode_documents(self, texts: Sequence[str], num_threads: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
        """Every text as [BOS] tokens [EOS] (BOS only if the tokenizer has one), concatenated.
        Returns (ids int32 [total], lengths int64 [len(texts)])."""
        if self.eos_id is None:
            raise UserError(f"{self.path}: the tokenizer has no EOS token; documents cannot be delimited, use one that has")
        texts = list(texts)
        pieces, owners = self._pieces(texts)
        arrays = self._backend.encode_arrays(pieces, _threads(num_threads))
        inner = np.fromiter(map(len, arrays), dtype=np.int64, count=len(arrays))
        if owners is not None:
            inner = np.bincount(owners, weights=inner, minlength=len(texts)).astype(np.int64)
        has_bos = self.bos_id is not None
        lengths = inner + 1 + has_bos
        ends = np.cumsum(lengths)
        out = np.empty(int(ends[-1]) if len(ends) else 0, dtype=np.int32)
        inner_mask = np.ones(len(out), dtype=bool)
        if has_bos:
            out[ends - lengths] = self.bos_id
            inner_mask[ends - lengths] = False
        out[ends - 1] = self.eos_id
        inner_mask[ends - 1] = False
        if arrays:
            out[inner_mask] = np.concatenate(arrays)
        return out, lengths

    def _pieces(self, texts: list[str]) -> tuple[list[str], Optional[np.ndarray]]:
        if not self._backend.splittable or all(len(t) <= 2 * _PIECE_CHARS for t in texts):
            return texts, None
        pieces, owners = [], []
        for i, text in enumerate(texts):
            start = 0
            while len(text) - start > 2 * _PIECE_CHARS:
                m = _CUT.search(text, start + _PIECE_CHARS)
                if m is None:
                    break
                pieces.append(text[start : m.start()])
                owners.append(i)
                start = m.start()
            pieces.append(text[start:])
            owners.append(i)
        return pieces, np.asarray(owners, dtype=np.int64)

    def decode(self, ids: Sequence[int]) -> str:
        return self._backend.decode(ids)

    def token_to_id(self, token: str) -> Optional[int]:
        return self._backend.token_to_id(token)

    def id_to_token(self, i: int) -> str:
        return self._backend.id_to_token(i)

    # -- Hugging Face / files -----------------------------------------------------------------

    def hf(self):
        """The `transformers` tokenizer of this directory (local files only, no remote code)."""
        if "_hf" not in self.__dict__:
            from transformers import AutoTokenizer

            self.__dict__["_hf"] = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True, trust_remote_code=False)
        return self.__dict__["_hf"]

    def files(self) -> list[Path]:
        return [self.path / n for n in TOKENIZER_FILES if (self.path / n).is_file()]

    def save(self, directory: str | os.PathLike) -> Path:
        """Copy the tokenizer's files (what a Hugging Face export needs) into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for f in self.files():
            shutil.copyfile(f, directory / f.name)
        return directory


def resolve_tokenizer_dir(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise UserError(
            f"{path}: tokenizer directory not found; pass a dir made by `llmtrain tokenizer` or a Hugging Face checkpoint dir"
        )
    if path.is_file() and path.name in ("tokenizer.model", "tokenizer.json"):
        return path.parent
    if not any((path / n).is_file() for n in ("tokenizer.model", "tokenizer.json")) and (path / "tokenizer").is_dir():
        return path / "tokenizer"
    return path


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Our tokenizer dir, a Hugging Face checkpoint dir, or a dir with a `tokenizer/` inside."""
    return Tokenizer(resolve_tokenizer_dir(path))
