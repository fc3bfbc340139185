"""Document cleaning: Unicode NFC, control characters stripped, empty/short documents dropped,
exact duplicates removed by content hash; every decision counted in `CleanStats`.

    stats = CleanStats()
    text = clean_text(raw, stats)            # None when the document is dropped
    key = content_hash(text)                 # 64-bit; also decides the train/val split
    if stats.is_duplicate(key): ...

Rules (in this order):
- NFC normalisation (`unicodedata`), so visually equal text has one encoding;
- C0/C1 control characters are removed except newline and tab (so CRLF becomes LF);
- trailing whitespace and leading blank (or whitespace-only) lines are trimmed; the indentation
  of the first text line stays;
- a document that is empty, or shorter than `min_chars` characters, is dropped;
- exact duplicates (same cleaned text) keep their first occurrence in input order.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import asdict, dataclass, field

# Every Unicode "Cc" character except \t and \n: U+0000-U+0008, U+000B-U+001F, U+007F-U+009F.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_LEADING_BLANK_LINES = re.compile(r"\A(?:[ \t]*\n)+")


def content_hash(text: str) -> int:
    """64-bit BLAKE2b of the UTF-8 text: the dedup key and the train/val split key."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def is_val(key: int, val_fraction: float) -> bool:
    """Deterministic split by document: the same text always lands in the same split."""
    return (key >> 11) / float(1 << 53) < val_fraction


@dataclass
class CleanStats:
    min_chars: int = 16
    documents_read: int = 0
    dropped_empty: int = 0
    dropped_short: int = 0
    dropped_duplicate: int = 0
    documents_kept: int = 0
    chars_kept: int = 0
    nfc_changed: int = 0
    control_chars_removed: int = 0
    invalid_utf8_documents: int = 0
    invalid_utf8_replacements: int = 0
    long_blocks_split: int = 0
    _seen: set = field(default_factory=set, repr=False)

    def is_duplicate(self, key: int) -> bool:
        if key in self._seen:
            self.dropped_duplicate += 1
            return True
        self._seen.add(key)
        return False

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("_seen")
        d["invalid_utf8_policy"] = "replace with U+FFFD and count"
        return d

    def summary(self) -> str:
        return (
            f"{self.documents_read:,} documents read: {self.documents_kept:,} kept, "
            f"{self.dropped_empty:,} empty, {self.dropped_short:,} shorter than {self.min_chars} chars, "
            f"{self.dropped_duplicate:,} duplicates"
        )


def clean_text(text: str, stats: CleanStats) -> str | None:
    """The cleaned document, or None if it is dropped (counted in `stats`). Not deduplicated here."""
    stats.documents_read += 1
    if not text.isascii() and not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
        stats.nfc_changed += 1
    if _CONTROL.search(text):
        cleaned = _CONTROL.sub("", text)
        stats.control_chars_removed += len(text) - len(cleaned)
        text = cleaned
    text = _LEADING_BLANK_LINES.sub("", text.rstrip())
    if not text.strip():
        stats.dropped_empty += 1
        return None
    if len(text) < stats.min_chars:
        stats.dropped_short += 1
        return None
    return text
