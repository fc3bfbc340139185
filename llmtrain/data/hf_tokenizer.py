"""Our sentencepiece model -> the Hugging Face files (`tokenizer.json`, `tokenizer_config.json`)
so that `transformers.AutoTokenizer.from_pretrained(DIR)` gives the same ids as sentencepiece.

    write_hf_files(Path("tok/tokenizer.model"), Path("tok"))

The `tokenizers` BPE model is rebuilt from the sentencepiece pieces (merges in piece order, as
`transformers`' own sentencepiece extractor does), with the settings our trainer uses: no
normaliser (we train with the identity rule and no dummy prefix), `Metaspace` without a prefix,
byte fallback, and the sentencepiece control/user-defined pieces as added tokens. The
`transformers` tokenizer adds `<s>` in front of a sequence by default, as the model saw in
pretraining; `add_special_tokens=False` gives exactly sentencepiece's ids.

All of them are marked special, so `decode(..., skip_special_tokens=True)` drops the chat
tokens too. One deliberate difference: the literal strings `<s>`, `</s>`, `<unk>`, `<pad>` in
text become their control ids in `transformers` (as for every Hugging Face tokenizer), while
sentencepiece never produces control ids from text. The chat tokens (`<|user|>` etc.) are
single ids in both.
"""

from __future__ import annotations

import json
from pathlib import Path

from sentencepiece import sentencepiece_model_pb2

# sentencepiece ModelProto.SentencePiece.Type
_CONTROL, _USER_DEFINED, _UNKNOWN = 3, 4, 2


def _read_proto(model_file: Path) -> sentencepiece_model_pb2.ModelProto:
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    return proto


def build_hf_tokenizer(model_file: Path):
    """A `tokenizers.Tokenizer` equivalent to the sentencepiece BPE model in `model_file`."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    from transformers.convert_slow_tokenizer import generate_merges

    proto = _read_proto(model_file)
    if proto.trainer_spec.model_type != 2 or proto.normalizer_spec.add_dummy_prefix:
        raise ValueError(f"{model_file}: only llmtrain's BPE models (no dummy prefix) are converted here")
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    merges = generate_merges(vocab, None)
    tok = Tokenizer(
        BPE(vocab=vocab, merges=merges, unk_token=proto.trainer_spec.unk_piece, fuse_unk=True, byte_fallback=True, dropout=None)
    )
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_tokens(
        [
            AddedToken(p.piece, normalized=False, special=True)
            for p in proto.pieces
            if p.type in (_CONTROL, _USER_DEFINED, _UNKNOWN)
        ]
    )
    return tok


def write_hf_files(model_file: Path, out_dir: Path) -> list[Path]:
    """Write tokenizer.json and tokenizer_config.json for `model_file` into `out_dir`."""
    from transformers import PreTrainedTokenizerFast

    proto = _read_proto(model_file)
    spec = proto.trainer_spec
    hf = PreTrainedTokenizerFast(
        tokenizer_object=build_hf_tokenizer(model_file),
        unk_token=spec.unk_piece,
        bos_token=spec.bos_piece if spec.bos_id >= 0 else None,
        eos_token=spec.eos_piece if spec.eos_id >= 0 else None,
        pad_token=spec.pad_piece if spec.pad_id >= 0 else None,
        add_bos_token=spec.bos_id >= 0,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
    )
    written = [Path(p) for p in hf.save_pretrained(str(out_dir))]
    # A class name that transformers 4.x and 5.x both know, instead of 5.x's "TokenizersBackend".
    config_file = Path(out_dir) / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["add_bos_token"] = spec.bos_id >= 0
    config["add_eos_token"] = False
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return written
