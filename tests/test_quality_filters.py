"""llmtrain.data.quality: one document per filter that fails that filter and no other, the
switches, the config checks, and the two n-gram implementations against a plain reference."""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import fields, replace

import pytest
from conftest import CORPUS, need_shared

from llmtrain.data import quality
from llmtrain.data.quality import FILTERS, GOPHER_DUP_NGRAMS, GOPHER_TOP_NGRAMS, QualityConfig, quality_reason
from llmtrain.errors import UserError

ON = QualityConfig(enabled=True)

GOOD = (
    "The river town woke slowly on market days. Farmers arrived before dawn with carts of apples,\n"
    "cabbages and late plums, and the baker opened his shutters to the smell of warm bread.\n"
    "By nine the square was crowded with buyers who argued cheerfully about prices, while children\n"
    "ran between the stalls chasing a small brown dog. Nobody seemed to mind the noise.\n"
    "It was the one morning of the week when the whole valley came together, traded news of\n"
    "weddings and storms, and went home with full baskets and lighter purses."
)

# Sentences for building longer documents: distinct words, so they add no repeated n-grams.
SENTENCES = [
    "Old maps of the harbour show a lighthouse that burned down long before anyone now living was born.",
    "Her grandmother kept bees behind the orchard and sold honey to travellers on the coast road.",
    "Every winter the lake froze thick enough for skaters, and lanterns hung from the willow branches.",
    "A retired sailor taught knots to the village children in exchange for fresh eggs and gossip.",
    "When the railway finally arrived, the inn doubled its rooms and hired two cooks from the city.",
    "Scholars still argue about who carved the stone bridge, since no record of its builders survives.",
    "The schoolmaster walked seven miles each morning, reading poetry aloud to an audience of cows.",
    "In spring the meadows filled with poppies, and painters came from far away to capture them.",
    "Fishermen mended nets on the quay while gulls waited patiently for scraps near their boots.",
    "Nobody could remember exactly when the clock in the church tower had last told correct time.",
]


def lines(*parts: str) -> str:
    return "\n".join(parts)


def vocabulary_text(vocab: list[str], n: int, seed: int, per_line: int = 12) -> str:
    """n words drawn from vocab (seeded), in lines of per_line words ending with a full stop."""
    rng = random.Random(seed)
    words = [rng.choice(vocab) for _ in range(n)]
    return "\n".join(" ".join(words[i : i + per_line]) + "." for i in range(0, n, per_line))


SHORT_WORDS = "am an as at by do go he if in is it me my no on or so up us we ox ax yo hi lo oh ah id".split()
LONG_WORDS = (
    "internationalization responsibilities notwithstanding extraordinarily characterization "
    "misunderstandings counterproductive disproportionately telecommunications electromagnetic "
    "institutionalized interdisciplinary transcontinental unquestionably incomprehensibility "
    "overgeneralization psychotherapeutic thermodynamically constitutionality representativeness"
).split()
PLAIN_WORDS = (
    "river stone bread market orchard lantern harbour meadow willow bridge sailor winter spring "
    "honey tower clock poppies painter gulls nets quay railway cooks city travellers coast road "
    "school morning poetry cows scholars record builders village children eggs gossip knots lake "
    "skaters branches grandmother bees inn rooms maps lighthouse"
).split()
URL = "https://example.com/archive/2019/05/a-rather-long-article-path/index.html"
LONG_URL = "https://example.com/archive/2019/05/an-even-longer-article-path-about-the-harbour/and-its-lighthouse/index.html"

# filter -> (document, config overrides the case runs under); each document fails that filter,
# and passes once that filter alone is switched off.
CASES = {
    "min_words": ("The harbour lights shone across the water tonight.", {}),
    "max_words": (GOOD + "\n" + "\n".join(SENTENCES), {"max_words": 150}),
    "min_mean_word_length": (vocabulary_text(SHORT_WORDS + ["to", "of", "be"], 80, seed=1), {}),
    "max_mean_word_length": (
        vocabulary_text(LONG_WORDS, 60, seed=2) + "\nThis is the end of the story, and that is all.",
        {},
    ),
    "max_symbol_word_ratio": (GOOD + "\n" + " ".join(f"#{w}" for w in PLAIN_WORDS[:12]) + ".", {}),
    "max_bullet_lines_ratio": ("\n".join(f"\u2022 {s}" for s in SENTENCES), {}),
    "max_ellipsis_lines_ratio": ("\n".join(s[:-1] + "..." if i % 2 else s for i, s in enumerate(SENTENCES)), {}),
    "min_alpha_words_ratio": (GOOD + "\n" + " ".join(str(1000 + 37 * i) for i in range(30)) + ".", {}),
    "min_stop_words": (vocabulary_text(PLAIN_WORDS, 70, seed=3), {}),
    "min_punctuation_lines_ratio": ("\n".join(s[:-1] for s in SENTENCES), {}),
    "max_duplicate_lines_ratio": (lines(*(x for s in SENTENCES[:9] for x in (s, "Share this"))), {}),
    "max_duplicate_line_chars_ratio": (lines(*(x for s in SENTENCES[:6] for x in (s, URL)), GOOD), {}),
    "max_duplicate_paragraphs_ratio": (
        "\n\n".join(x for i in range(0, 10, 2) for x in (SENTENCES[i] + "\n" + SENTENCES[i + 1], "Advertisement")),
        {},
    ),
    # A duplicated paragraph duplicates its lines, so with the line filters on this one never
    # fires first; it is checked with them off. (One token, so it repeats no n-gram.)
    "max_duplicate_paragraph_chars_ratio": (
        "\n\n".join([SENTENCES[0], LONG_URL, SENTENCES[1], LONG_URL, SENTENCES[2], LONG_URL, SENTENCES[3], SENTENCES[4]]),
        {"max_duplicate_line_chars_ratio": None, "max_duplicate_lines_ratio": None},
    ),
    "max_top_ngram_ratios": (" ".join(f"{s[:-1]} wonderful opportunity." for s in SENTENCES[:8]), {}),
    "max_dup_ngram_ratios": (
        " ".join(f"{s} Quick brown foxes jumped over sleeping dogs." for s in SENTENCES[:4]) + " " + GOOD,
        {},
    ),
    "script": (GOOD, {"script": "cyrillic"}),
}


def test_good_paragraph_passes_the_defaults():
    assert quality_reason(GOOD, ON) is None
    assert quality_reason(GOOD + "\n\n" + "\n".join(SENTENCES), ON) is None
    assert quality_reason(GOOD, replace(ON, script="latin")) is None


def test_filters_are_config_fields_and_every_one_has_a_case():
    names = {f.name for f in fields(QualityConfig)}
    assert set(FILTERS) <= names
    assert len(set(FILTERS)) == len(FILTERS)
    assert set(CASES) == set(FILTERS)


@pytest.mark.parametrize("name", FILTERS)
def test_each_document_fails_exactly_its_filter(name):
    doc, overrides = CASES[name]
    cfg = replace(ON, **overrides)
    assert quality_reason(doc, cfg) == name
    off = replace(cfg, script=None) if name == "script" else replace(cfg, **{name: None})
    assert quality_reason(doc, off) is None, "switching the filter off lets its document through"
    assert quality_reason(doc, replace(cfg, enabled=False)) is None


def test_first_failing_filter_in_order_names_the_document():
    # short and without stop words: min_words runs before min_stop_words
    assert quality_reason("apples pears plums", ON) == "min_words"
    assert quality_reason("apples pears plums", replace(ON, min_words=None, min_mean_word_length=None)) == "min_stop_words"


def test_thresholds_at_the_boundary():
    doc = " ".join(["word"] * 10)
    cfg = QualityConfig(enabled=True, **{name: None for name in FILTERS if name != "script"})
    assert quality_reason(doc, replace(cfg, min_words=10)) is None
    assert quality_reason(doc, replace(cfg, min_words=11)) == "min_words"
    assert quality_reason(doc, replace(cfg, max_words=10)) is None
    assert quality_reason(doc, replace(cfg, max_words=9)) == "max_words"
    # punctuation-only tokens are not words; leading/trailing punctuation is not counted in length
    assert (
        quality_reason(
            "-- (word) -- word. --", replace(cfg, min_words=2, max_words=2, min_mean_word_length=4, max_mean_word_length=4)
        )
        is None
    )


def test_enabled_false_passes_everything():
    off = QualityConfig()
    assert off.enabled is False
    for doc, _ in CASES.values():
        assert quality_reason(doc, off) is None
    assert quality_reason("", off) is None


def test_empty_and_whitespace_documents_fail_min_words():
    assert quality_reason("", ON) == "min_words"
    assert quality_reason(" \n\t ", ON) == "min_words"


@pytest.mark.parametrize(
    "key, value",
    [
        ("max_symbol_word_ratio", 1.5),
        ("max_bullet_lines_ratio", -0.1),
        ("min_alpha_words_ratio", "0.8"),
        ("min_punctuation_lines_ratio", float("nan")),
        ("max_duplicate_lines_ratio", True),
        ("min_words", -1),
        ("max_words", 2.5),
        ("min_stop_words", "two"),
        ("min_mean_word_length", 0),
        ("max_mean_word_length", -3),
        ("max_top_ngram_ratios", {2: 1.2}),
        ("max_top_ngram_ratios", {0: 0.2}),
        ("max_dup_ngram_ratios", [[5, 0.1, 3]]),
        ("max_dup_ngram_ratios", 0.15),
        ("script", "klingon"),
        ("min_script_ratio", 2),
        ("enabled", "yes"),
    ],
)
def test_out_of_range_values_raise_user_error_naming_the_key(key, value):
    with pytest.raises(UserError, match=rf"quality\.{key}\b") as err:
        QualityConfig.from_dict({"enabled": True, key: value})
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match=rf"quality\.{key}\b"):
        QualityConfig(**{key: value})


def test_error_messages_give_the_fix():
    with pytest.raises(UserError, match=r"quality\.max_symbol_word_ratio 1\.5 must be in \[0, 1\].*0\.1 \(Gopher\)"):
        QualityConfig.from_dict({"max_symbol_word_ratio": 1.5})
    with pytest.raises(UserError, match=r"quality\.min_words 200 is above quality\.max_words 100"):
        QualityConfig.from_dict({"min_words": 200, "max_words": 100})


def test_unknown_key_is_named_with_the_valid_keys():
    with pytest.raises(UserError, match=r"quality\.max_word .*valid keys: enabled, min_words, max_words"):
        QualityConfig.from_dict({"max_word": 10})
    with pytest.raises(UserError, match="mapping"):
        QualityConfig.from_dict(["enabled"])
    assert QualityConfig.from_dict(None) == QualityConfig()


def test_from_dict_accepts_yaml_shapes_and_none_switches_off():
    cfg = QualityConfig.from_dict(
        {"enabled": True, "max_top_ngram_ratios": {"3": 0.3, 2: 0.25}, "max_dup_ngram_ratios": [[6, 0.2]], "min_words": None}
    )
    assert cfg.max_top_ngram_ratios == ((2, 0.25), (3, 0.3))
    assert cfg.max_dup_ngram_ratios == ((6, 0.2),)
    assert cfg.min_words is None
    assert QualityConfig().max_top_ngram_ratios == GOPHER_TOP_NGRAMS
    assert QualityConfig().max_dup_ngram_ratios == GOPHER_DUP_NGRAMS
    hash(cfg)  # frozen and hashable (a Ray task argument, a cache key)


def test_script_ratio():
    assert quality_reason(GOOD, replace(ON, script="latin")) is None
    russian = "Москва — столица России, крупнейший по численности населения город страны. " * 3
    cfg = QualityConfig(enabled=True, script="latin", **{name: None for name in FILTERS if name != "script"})
    assert quality_reason(russian, cfg) == "script"
    assert quality_reason(russian, replace(cfg, script="cyrillic")) is None
    mixed = "Café au lait. " + "Москва. "  # 10 Latin letters of 16
    assert quality_reason(mixed, replace(cfg, min_script_ratio=0.6)) is None
    assert quality_reason(mixed, replace(cfg, min_script_ratio=0.65)) == "script"
    assert quality_reason("1234 5678", cfg) == "script"  # no letters at all


# ---------------------------------------------------------------------------------------------
# The n-gram filters: the pure-Python and numpy code against a plain reference.


def reference_ngram_reason(tokens, top, dup):
    """Gopher's definitions written out directly: the top n-gram (most frequent; among ties the
    longest) times its count, and the characters of tokens inside any repeated n-gram."""
    total = sum(map(len, tokens))
    for n in sorted(set(dict(top)) | set(dict(dup))):
        grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
        counts = Counter(grams)
        if n in dict(top) and counts:
            best = max(counts.values())
            chars = max(sum(map(len, g)) for g, c in counts.items() if c == best)
            if best > 1 and best * chars > dict(top)[n] * total:
                return "max_top_ngram_ratios"
        if n in dict(dup):
            covered = set()
            for i, g in enumerate(grams):
                if counts[g] > 1:
                    covered.update(range(i, i + n))
            if sum(len(tokens[i]) for i in covered) > dict(dup)[n] * total:
                return "max_dup_ngram_ratios"
    return None


def random_documents(count: int, seed: int):
    rng = random.Random(seed)
    for _ in range(count):
        vocab = [rng.choice(PLAIN_WORDS + SHORT_WORDS) for _ in range(rng.randint(3, 60))]
        yield [rng.choice(vocab) for _ in range(rng.randint(0, 400))]


def test_ngram_code_matches_the_reference_on_repetitive_documents():
    top, dup = GOPHER_TOP_NGRAMS, GOPHER_DUP_NGRAMS
    seen = Counter()
    for tokens in random_documents(400, seed=0):
        want = reference_ngram_reason(tokens, top, dup)
        seen[want] += 1
        limits_top, limits_dup = dict(top), dict(dup)
        sizes = sorted(set(limits_top) | set(limits_dup))
        if len(tokens) >= 2:
            assert quality._ngram_reason_py(tokens, limits_top, limits_dup, sizes) == want
            assert quality._ngram_reason_np(tokens, limits_top, limits_dup, sizes) == want
        assert quality._ngram_reason(tokens, top, dup) == want
    assert seen[None] and seen["max_top_ngram_ratios"] and seen["max_dup_ngram_ratios"], seen
    # a size set with gaps and only one kind of check
    for tokens in random_documents(100, seed=1):
        for top, dup in [((3, 0.3),), ()], [(), ((2, 0.4), (7, 0.05))]:
            assert quality._ngram_reason(tokens, top, dup) == reference_ngram_reason(tokens, top, dup)


def test_ngram_python_and_numpy_agree_on_the_corpus():
    need_shared()
    blank = re.compile(r"\n(?:[ \t]*\n)+")
    limits_top, limits_dup = dict(GOPHER_TOP_NGRAMS), dict(GOPHER_DUP_NGRAMS)
    sizes = sorted(set(limits_top) | set(limits_dup))
    checked = 0
    for path in sorted(CORPUS.glob("*.txt")):
        with open(path, encoding="utf-8", errors="replace") as f:
            head = f.read(200_000)
        for block in blank.split(head)[:-1]:
            tokens = block.split()
            if len(tokens) >= 2:
                py = quality._ngram_reason_py(tokens, limits_top, limits_dup, sizes)
                assert quality._ngram_reason_np(tokens, limits_top, limits_dup, sizes) == py
                checked += 1
    assert checked > 1000
