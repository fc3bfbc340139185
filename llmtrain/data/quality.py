"""Heuristic document quality filters in the style of Gopher, C4 and FineWeb: each one a threshold
in `QualityConfig` (None switches it off), defaults the published values with their source.

    cfg = QualityConfig.from_dict({"enabled": True, "min_words": 20})   # UserError on a bad key/value
    reason = quality_reason(text, cfg)      # None: keep; else the FILTERS name that dropped it
    if reason: counts[reason] += 1

The filters, in the order they run (the first failure names the document's reason; every name
in FILTERS is the config field that sets its threshold):
- `script`: with `script` set (e.g. "latin"), the fraction of letters in that script is at least
  `min_script_ratio`; a cheap language check by writing system, off by default;
- `min_words` / `max_words`: words are whitespace-separated tokens, minus tokens that are only
  punctuation; leading/trailing punctuation does not count in a word's length;
- `min_mean_word_length` / `max_mean_word_length`: mean word length in characters;
- `max_symbol_word_ratio`: '#' per word, and '...' (or '…') per word, each at most this;
- `max_bullet_lines_ratio`: lines starting with a bullet (•, ●, ◦, ▪, ‣, or "- ", "* ", "+ ");
- `max_ellipsis_lines_ratio`: lines ending with '...' or '…';
- `min_alpha_words_ratio`: words with at least one letter (any script);
- `min_stop_words`: occurrences of Gopher's English stop words (the, be, to, of, and, that,
  have, with; any case, as whole words);
- `min_punctuation_lines_ratio`: lines ending with . ! ? ' " (or … ” ’ .) !) ?)): C4's terminal
  punctuation rule in FineWeb's document form (`line_punct_thr`, which drops at <= 0.12; here
  below the threshold drops). Hard-wrapped text (books) ends few lines with punctuation;
- `max_duplicate_lines_ratio` / `max_duplicate_line_chars_ratio`: lines (stripped) equal to an
  earlier line, as a fraction of lines and of line characters;
- `max_duplicate_paragraphs_ratio` / `max_duplicate_paragraph_chars_ratio`: the same for
  blank-line-separated paragraphs (a document that is one paragraph never fails these; a
  repeated paragraph repeats its lines, so the chars one acts first only with looser line limits);
- `max_top_ngram_ratios`: for each (n, ratio), the characters of the most frequent repeated
  word n-gram (the longest among ties) times its count, over all word characters (Gopher's
  "top n-gram character fraction"; an n-gram that occurs once is never "top");
- `max_dup_ngram_ratios`: for each (n, ratio), the fraction of word characters covered by word
  n-grams that occur more than once, each character counted once (Gopher's "duplicate n-gram
  character fraction").
"Lines" are the non-blank lines, stripped. The n-gram filters compare whitespace tokens exactly
(case and attached punctuation included): as tuples below 200 tokens, as 64-bit hashes in numpy
above (a collision is possible in principle, at odds of about n^2 / 2^64 per document). Line and
word statistics use str methods and `map` (no per-character Python loops): 15-25 MB/s on one
core on the shared corpus.

Sources of the defaults: Gopher = Rae et al. 2021, "Scaling Language Models: Methods, Analysis &
Insights from Training Gopher", appendix A.1.1 and table A1 (as implemented by datatrove's
GopherQualityFilter / GopherRepetitionFilter); FineWeb = Penedo et al. 2024 (datatrove's
FineWebQualityFilter); `min_script_ratio` 0.65 = FineWeb's language-score threshold.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from dataclasses import dataclass, fields
from itertools import accumulate, compress, filterfalse
from operator import methodcaller
from typing import Any

import numpy as np

from llmtrain.errors import UserError

Ngrams = tuple[tuple[int, float], ...]

FILTERS: tuple[str, ...] = (
    "script",
    "min_words",
    "max_words",
    "min_mean_word_length",
    "max_mean_word_length",
    "max_symbol_word_ratio",
    "max_bullet_lines_ratio",
    "max_ellipsis_lines_ratio",
    "min_alpha_words_ratio",
    "min_stop_words",
    "min_punctuation_lines_ratio",
    "max_duplicate_lines_ratio",
    "max_duplicate_line_chars_ratio",
    "max_duplicate_paragraphs_ratio",
    "max_duplicate_paragraph_chars_ratio",
    "max_top_ngram_ratios",
    "max_dup_ngram_ratios",
)

GOPHER_TOP_NGRAMS: Ngrams = ((2, 0.20), (3, 0.18), (4, 0.16))
GOPHER_DUP_NGRAMS: Ngrams = ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10))
MAX_NGRAM = 20
_SMALL = 200  # tokens: below, the pure-Python n-gram code is faster than numpy's fixed costs

# Letters of each script (the Unicode blocks that hold its letters).
SCRIPTS: dict[str, str] = {
    "latin": "A-Za-z\u00aa\u00ba\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f\u1e00-\u1eff\u2c60-\u2c7f\ua720-\ua7ff\uab30-\uab6f\uff21-\uff3a\uff41-\uff5a",
    "cyrillic": "\u0400-\u052f\u1c80-\u1c8f\u2de0-\u2dff\ua640-\ua69f",
    "greek": "\u0370-\u03ff\u1f00-\u1fff",
    "arabic": "\u0600-\u06ff\u0750-\u077f\u08a0-\u08ff\ufb50-\ufdff\ufe70-\ufeff",
    "hebrew": "\u0590-\u05ff\ufb1d-\ufb4f",
    "devanagari": "\u0900-\u097f\ua8e0-\ua8ff",
    "thai": "\u0e00-\u0e7f",
    "cjk": "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\U00020000-\U0002fa1f",
}
_NOT_SCRIPT = {name: re.compile(f"[^{ranges}]+") for name, ranges in SCRIPTS.items()}
_NON_LETTERS = re.compile(r"[\W\d_]+")
_LETTER = re.compile(r"[^\W\d_]")

_PUNCT = string.punctuation + "\u00a1\u00ab\u00b7\u00bb\u00bf\u2013\u2014\u2018\u2019\u201a\u201c\u201d\u201e\u2026\u2039\u203a"
_BULLETS = (
    "\u2022",
    "\u25cf",
    "\u25cb",
    "\u25e6",
    "\u25aa",
    "\u25ab",
    "\u25a0",
    "\u25a1",
    "\u2023",
    "\u2043",
    "\u2219",
    "- ",
    "* ",
    "+ ",
)
_ELLIPSES = ("...", "\u2026")
_LINE_END_PUNCT = (".", "!", "?", "'", '"', "\u2026", "\u201d", "\u2019", ".)", "!)", "?)")
_strip_punct = methodcaller("strip", _PUNCT)
_starts_bullet = methodcaller("startswith", _BULLETS)
_ends_ellipsis = methodcaller("endswith", _ELLIPSES)
_ends_punct = methodcaller("endswith", _LINE_END_PUNCT)
_STOP_WORDS = re.compile(r"\b(?:the|be|to|of|and|that|have|with)\b", re.IGNORECASE)
_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n")
_MULT = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit multiplier of the rolling n-gram hash
_PAD = np.random.default_rng(0).integers(0, 2**63, MAX_NGRAM, dtype=np.int64).view(np.uint64) | np.uint64(1 << 63)

# Per threshold: its kind (how it is checked) and the default with its source (for messages).
_KIND = {
    "min_words": ("count", "50 (Gopher)"),
    "max_words": ("count", "100000 (Gopher)"),
    "min_mean_word_length": ("length", "3 (Gopher)"),
    "max_mean_word_length": ("length", "10 (Gopher)"),
    "max_symbol_word_ratio": ("ratio", "0.1 (Gopher)"),
    "max_bullet_lines_ratio": ("ratio", "0.9 (Gopher)"),
    "max_ellipsis_lines_ratio": ("ratio", "0.3 (Gopher)"),
    "min_alpha_words_ratio": ("ratio", "0.8 (Gopher)"),
    "min_stop_words": ("count", "2 (Gopher)"),
    "min_punctuation_lines_ratio": ("ratio", "0.12 (FineWeb)"),
    "max_duplicate_lines_ratio": ("ratio", "0.3 (Gopher)"),
    "max_duplicate_line_chars_ratio": ("ratio", "0.2 (Gopher)"),
    "max_duplicate_paragraphs_ratio": ("ratio", "0.3 (Gopher)"),
    "max_duplicate_paragraph_chars_ratio": ("ratio", "0.2 (Gopher)"),
    "max_top_ngram_ratios": ("ngrams", "{2: 0.2, 3: 0.18, 4: 0.16} (Gopher)"),
    "max_dup_ngram_ratios": ("ngrams", "{5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.1} (Gopher)"),
}


@dataclass(frozen=True)
class QualityConfig:
    """Which filters run and their thresholds; None switches one filter off. Checked on creation."""

    enabled: bool = False  # the whole stage
    # Gopher quality filter (Rae et al. 2021, appendix A.1.1)
    min_words: int | None = 50
    max_words: int | None = 100_000
    min_mean_word_length: float | None = 3.0
    max_mean_word_length: float | None = 10.0
    max_symbol_word_ratio: float | None = 0.1  # '#' per word and '...' per word
    max_bullet_lines_ratio: float | None = 0.9
    max_ellipsis_lines_ratio: float | None = 0.3
    min_alpha_words_ratio: float | None = 0.8  # words with at least one letter
    min_stop_words: int | None = 2
    # FineWeb quality filter (Penedo et al. 2024): line_punct_thr
    min_punctuation_lines_ratio: float | None = 0.12
    # Gopher repetition filter (Rae et al. 2021, table A1)
    max_duplicate_lines_ratio: float | None = 0.3
    max_duplicate_line_chars_ratio: float | None = 0.2
    max_duplicate_paragraphs_ratio: float | None = 0.3
    max_duplicate_paragraph_chars_ratio: float | None = 0.2
    max_top_ngram_ratios: Ngrams | None = GOPHER_TOP_NGRAMS  # (n, max ratio) pairs
    max_dup_ngram_ratios: Ngrams | None = GOPHER_DUP_NGRAMS
    # Language by writing system: one of SCRIPTS, or None (off)
    script: str | None = None
    min_script_ratio: float = 0.65  # FineWeb's language-score threshold

    def __post_init__(self) -> None:
        for name in ("max_top_ngram_ratios", "max_dup_ngram_ratios"):
            object.__setattr__(self, name, _ngrams(name, getattr(self, name)))
        self.check()

    def check(self) -> None:
        """Raise UserError (one line: the key, the value, the fix) for a value out of range."""
        if not isinstance(self.enabled, bool):
            raise UserError(f"quality.enabled {self.enabled!r} must be true or false")
        for name, (kind, example) in _KIND.items():
            value = getattr(self, name)
            if value is None or kind == "ngrams":
                continue
            number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if kind == "count" and not (isinstance(value, int) and number and value >= 0):
                raise UserError(f"quality.{name} {value!r} must be a whole number >= 0, or null (off); e.g. {example}")
            if kind == "length" and not (number and value > 0):
                raise UserError(f"quality.{name} {value!r} must be a number > 0, or null (off); e.g. {example}")
            if kind == "ratio" and not (number and 0 <= value <= 1):
                raise UserError(f"quality.{name} {value!r} must be in [0, 1], or null (off); e.g. {example}")
        for low, high in (("min_words", "max_words"), ("min_mean_word_length", "max_mean_word_length")):
            a, b = getattr(self, low), getattr(self, high)
            if a is not None and b is not None and a > b:
                raise UserError(f"quality.{low} {a} is above quality.{high} {b}; lower {low} or raise {high}")
        if self.script is not None and self.script not in SCRIPTS:
            raise UserError(
                f"quality.script {self.script!r} is not a known script; use one of {', '.join(SCRIPTS)}, or null (off)"
            )
        r = self.min_script_ratio
        if not (isinstance(r, (int, float)) and not isinstance(r, bool) and 0 <= r <= 1):
            raise UserError(f"quality.min_script_ratio {r!r} must be in [0, 1]; e.g. 0.65 (FineWeb)")

    @classmethod
    def from_dict(cls, d: dict | None) -> QualityConfig:
        """From a config mapping (e.g. the YAML `quality:` section); unknown keys are errors."""
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise UserError(f"quality must be a mapping of settings, not {type(d).__name__}; e.g. {{enabled: true}}")
        valid = [f.name for f in fields(cls)]
        for key in d:
            if key not in valid:
                raise UserError(f"quality.{key} is not a setting; valid keys: {', '.join(valid)}")
        return cls(**d)


def _ngrams(name: str, value: Any) -> Ngrams | None:
    """(n, ratio) pairs sorted by n, from a mapping {n: ratio} or a list of pairs; None = off."""
    if value is None:
        return None
    bad = UserError(
        f"quality.{name} {value!r} must map n-gram sizes (whole numbers 1..{MAX_NGRAM}) to ratios in [0, 1], "
        f"or be null (off); e.g. {_KIND[name][1]}"
    )
    try:
        pairs = list(value.items()) if isinstance(value, dict) else [tuple(p) for p in value]
    except TypeError:
        raise bad from None
    out = {}
    for pair in pairs:
        if len(pair) != 2:
            raise bad
        n, ratio = pair
        if isinstance(n, str) and n.strip().isdigit():  # YAML/JSON mapping keys may be strings
            n = int(n)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_NGRAM or n in out:
            raise bad
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1:
            raise bad
        out[n] = float(ratio)
    return tuple(sorted(out.items()))


def quality_reason(text: str, cfg: QualityConfig) -> str | None:
    """The name (from FILTERS) of the first filter `text` fails, or None if it passes them all
    (always None when `cfg.enabled` is False)."""
    if not cfg.enabled:
        return None
    if cfg.script is not None and _script_ratio(text, cfg.script) < cfg.min_script_ratio:
        return "script"

    # Words: whitespace tokens; the all-letter ones need no stripping, the rest lose their
    # leading/trailing punctuation, and those left empty were punctuation only.
    tokens = text.split()
    if cfg.min_words is not None and len(tokens) < cfg.min_words:
        return "min_words"  # (fewer tokens than words allowed: no need to look at them)
    others = list(filterfalse(str.isalpha, tokens))
    stripped = list(map(_strip_punct, others))
    n_words = len(tokens) - stripped.count("")
    if cfg.min_words is not None and n_words < cfg.min_words:
        return "min_words"
    if cfg.max_words is not None and n_words > cfg.max_words:
        return "max_words"
    per_word = 1 / max(n_words, 1)
    if cfg.min_mean_word_length is not None or cfg.max_mean_word_length is not None:
        chars = len("".join(tokens)) - len("".join(others)) + len("".join(stripped))  # (join: faster than sum(map(len)))
        mean = chars * per_word
        if cfg.min_mean_word_length is not None and mean < cfg.min_mean_word_length:
            return "min_mean_word_length"
        if cfg.max_mean_word_length is not None and mean > cfg.max_mean_word_length:
            return "max_mean_word_length"
    if cfg.max_symbol_word_ratio is not None:
        limit = cfg.max_symbol_word_ratio
        if text.count("#") * per_word > limit or (text.count("...") + text.count("\u2026")) * per_word > limit:
            return "max_symbol_word_ratio"

    lines = list(filter(None, map(str.strip, text.split("\n"))))
    per_line = 1 / max(len(lines), 1)
    if cfg.max_bullet_lines_ratio is not None and sum(map(_starts_bullet, lines)) * per_line > cfg.max_bullet_lines_ratio:
        return "max_bullet_lines_ratio"
    if cfg.max_ellipsis_lines_ratio is not None and sum(map(_ends_ellipsis, lines)) * per_line > cfg.max_ellipsis_lines_ratio:
        return "max_ellipsis_lines_ratio"
    if cfg.min_alpha_words_ratio is not None:
        # all-letter words first; search the rest for a letter only if needed
        with_letter = len(tokens) - len(others) + sum(map(str.isalpha, stripped))
        if with_letter * per_word < cfg.min_alpha_words_ratio:
            with_letter += sum(1 for s in stripped if not s.isalpha() and _LETTER.search(s))
            if with_letter * per_word < cfg.min_alpha_words_ratio:
                return "min_alpha_words_ratio"
    if cfg.min_stop_words is not None and cfg.min_stop_words > 0:
        found = 0
        for _ in _STOP_WORDS.finditer(text):
            found += 1
            if found >= cfg.min_stop_words:
                break
        else:
            return "min_stop_words"
    if cfg.min_punctuation_lines_ratio is not None and sum(map(_ends_punct, lines)) * per_line < cfg.min_punctuation_lines_ratio:
        return "min_punctuation_lines_ratio"

    reason = _duplicates(lines, cfg.max_duplicate_lines_ratio, cfg.max_duplicate_line_chars_ratio, "line")
    if reason:
        return reason
    if cfg.max_duplicate_paragraphs_ratio is not None or cfg.max_duplicate_paragraph_chars_ratio is not None:
        if _PARAGRAPH_BREAK.search(text):
            paragraphs = list(filter(None, map(str.strip, _PARAGRAPH_BREAK.split(text))))
            reason = _duplicates(
                paragraphs, cfg.max_duplicate_paragraphs_ratio, cfg.max_duplicate_paragraph_chars_ratio, "paragraph"
            )
            if reason:
                return reason
    if cfg.max_top_ngram_ratios or cfg.max_dup_ngram_ratios:
        return _ngram_reason(tokens, cfg.max_top_ngram_ratios or (), cfg.max_dup_ngram_ratios or ())
    return None


def _duplicates(items: list[str], max_ratio: float | None, max_chars_ratio: float | None, what: str) -> str | None:
    """Gopher's duplicate line/paragraph fractions: items equal to an earlier one, by count and
    by characters."""
    if len(items) < 2:
        return None
    unique = set(items)
    if len(unique) == len(items):
        return None
    if max_ratio is not None and (len(items) - len(unique)) / len(items) > max_ratio:
        return f"max_duplicate_{what}s_ratio"
    if max_chars_ratio is not None:
        total = len("".join(items))
        if (total - len("".join(unique))) / max(total, 1) > max_chars_ratio:
            return f"max_duplicate_{what}_chars_ratio"
    return None


def _ngram_reason(tokens: list[str], top: Ngrams, dup: Ngrams) -> str | None:
    """Gopher's top n-gram and duplicate n-gram character fractions over word n-grams; pure
    Python below `_SMALL` tokens (faster there), numpy above. Both exact and equal.

    Only positions whose (n-1)-gram repeats can start a repeated n-gram, so each larger n looks
    only at the previous size's repeated positions (on prose a small part of the text). The
    characters of all repeated n-grams (counted with overlaps) bound both fractions from above,
    which settles most documents without counting; and the duplicate fraction never grows with
    n, so once it is under every larger n's threshold the remaining sizes pass."""
    n_tok = len(tokens)
    limits_top, limits_dup = dict(top), dict(dup)
    sizes = sorted(set(limits_top) | set(limits_dup))
    if n_tok < 2:
        return None
    if n_tok < _SMALL:
        return _ngram_reason_py(tokens, limits_top, limits_dup, sizes)
    return _ngram_reason_np(tokens, limits_top, limits_dup, sizes)


def _ngram_reason_py(tokens: list[str], limits_top: dict, limits_dup: dict, sizes: list[int]) -> str | None:
    """The n-gram filters with tuples of tokens as n-grams."""
    n_tok = len(tokens)
    ends = list(accumulate(map(len, tokens), initial=0))  # ends[i]: characters in tokens[:i]
    total = ends[-1]
    pos = None  # start positions whose previous-size n-gram repeats
    for n in sizes:
        if pos is None:
            grams = list(zip(*[tokens[j:] for j in range(n)]))
            starts = range(len(grams))
        else:
            starts = [i for i in pos if i + n <= n_tok]
            grams = [tuple(tokens[i : i + n]) for i in starts]
        counts = Counter(grams)
        if len(counts) == len(grams):
            return None  # no repeated n-gram: no larger one either
        pos = [i for i, gram in zip(starts, grams) if counts[gram] > 1]
        bound = sum([ends[i + n] - ends[i] for i in pos])
        if n in limits_top and bound > limits_top[n] * total:
            best = max(counts.values())
            chars = max(sum(map(len, gram)) for gram, c in counts.items() if c == best)
            if best * chars > limits_top[n] * total:
                return "max_top_ngram_ratios"
        if n in limits_dup:
            covered = bound
            if bound > limits_dup[n] * total:
                mask = bytearray(n_tok)
                ones = b"\x01" * n
                for i in pos:
                    mask[i : i + n] = ones
                covered = sum(compress(map(len, tokens), mask))
                if covered > limits_dup[n] * total:
                    return "max_dup_ngram_ratios"
            if _rest_pass(n, covered, total, limits_top, limits_dup, sizes):
                return None
    return None


def _rest_pass(n: int, covered: int, total: int, limits_top: dict, limits_dup: dict, sizes: list[int]) -> bool:
    """True when every size above n must pass: no top check left and the duplicate fraction
    (non-increasing in n) already within each remaining threshold."""
    rest = [m for m in sizes if m > n]
    return all(m not in limits_top and covered <= limits_dup[m] * total for m in rest)


def _ngram_reason_np(tokens: list[str], limits_top: dict, limits_dup: dict, sizes: list[int]) -> str | None:
    """The n-gram filters with 64-bit rolling hashes of the tokens' hashes as n-grams; the token
    hashes are padded with distinct values, so an n-gram running past the end is unique."""
    n_tok = len(tokens)
    h = np.empty(n_tok + MAX_NGRAM, dtype=np.uint64)
    h[:n_tok] = np.fromiter(map(hash, tokens), dtype=np.int64, count=n_tok).view(np.uint64)
    h[n_tok:] = _PAD
    ends = np.zeros(n_tok + 1, dtype=np.int64)  # ends[i]: characters in tokens[:i]
    np.cumsum(np.fromiter(map(len, tokens), dtype=np.int64, count=n_tok), out=ends[1:])
    total = int(ends[-1])
    pos = np.arange(n_tok, dtype=np.int64)  # start positions still in play
    g = h[:n_tok].copy()  # the k-gram hash at each position of `pos`
    k = 1
    for n in sizes:
        while k < n:  # extend the k-grams at `pos` to k+1 tokens
            g = g * _MULT + h[pos + k]
            k += 1
        if pos.size < 2:
            return None
        order = np.argsort(g)
        sg = g[order]
        same = sg[1:] == sg[:-1]
        in_run = np.zeros(sg.size, dtype=bool)  # sorted entries whose n-gram repeats
        in_run[1:] = same
        in_run[:-1] |= same
        rep = order[in_run]  # indices into pos of the repeated n-grams, in hash order
        if rep.size == 0:
            return None  # no repeated n-gram: no larger one either
        starts = pos[rep]
        chars = ends[starts + n] - ends[starts]
        bound = int(chars.sum())
        if n in limits_top and bound > limits_top[n] * total:
            # runs of equal hashes: the top count and the longest n-gram with that count
            sr = sg[in_run]
            first = np.flatnonzero(np.concatenate(([True], sr[1:] != sr[:-1])))
            counts = np.diff(np.append(first, sr.size))
            best = counts.max()
            if best * int(chars[first[counts == best]].max()) > limits_top[n] * total:
                return "max_top_ngram_ratios"
        if n in limits_dup:
            covered = bound
            if bound > limits_dup[n] * total:
                cover = np.zeros(n_tok + 1, dtype=np.int64)
                cover[starts] += 1
                cover[starts + n] -= 1
                mask = np.cumsum(cover[:-1]) > 0  # tokens inside a repeated n-gram
                covered = int(np.diff(ends)[mask].sum())
                if covered > limits_dup[n] * total:
                    return "max_dup_ngram_ratios"
            if _rest_pass(n, covered, total, limits_top, limits_dup, sizes):
                return None
        pos, g = pos[rep], g[rep]
    return None


def _script_ratio(text: str, script: str) -> float:
    """Fraction of the letters of `text` that belong to `script` (0.0 when it has none)."""
    if text.isascii():  # ASCII letters are Latin
        return 1.0 if script == "latin" and _LETTER.search(text) else 0.0
    letters = _NON_LETTERS.sub("", text)
    if not letters:
        return 0.0
    return len(_NOT_SCRIPT[script].sub("", letters)) / len(letters)
