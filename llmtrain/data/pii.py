"""PII redaction: e-mail addresses, IP addresses, phone numbers, payment-card numbers and
secret-looking tokens replaced by placeholders (PLACEHOLDERS), each kind switchable and counted.

    cfg = PiiConfig.from_dict({"enabled": True, "kinds": ["email", "secret"]})
    text, counts = redact(text, cfg)        # counts: {"email": 2} -- only the kinds found

What each kind replaces, in the order they run:
- `secret`: `-----BEGIN ... PRIVATE KEY-----` blocks through their END line (without one, the
  key's base64 and header lines); AWS key ids (AKIA/ASIA...), GitHub (ghp_/gho_/ghu_/ghs_/ghr_,
  github_pat_), Slack (xox?-), Stripe (sk_live_/rk_live_), Google (AIza...) and OpenAI-style
  (sk-...) keys, JWTs; and the value after `name =` / `name:` (quoted or not, or after "Bearer")
  when the name says key/secret/token/password/auth and the value looks random: 16+ characters
  with a letter, a digit and >= 3 bits of entropy per character (short human passwords stay);
- `email`: local@domain, the domain dotted and ending in a 2+ letter label;
- `credit_card`: 13-19 digits (plain, or in groups of 3+ split by spaces or dashes) that start
  as a card network's do (3-6, 2221-2720) and pass the Luhn check;
- `ip`: IPv4 as four dotted octets, not after "version"/"v"/"section" or "name/" / "name-"
  ("3.11.7" has three parts; "1.2.3.4.5" five); IPv6 full or compressed with 3+ groups (a[1::2]
  stays). Only global addresses (ipaddress's is_global, datatrove's PIIFormatter default):
  private, loopback, link-local and documentation addresses identify nobody and stay;
- `phone`: +country-code numbers of 8-15 digits ("+44 20 7946 0958", "+14155550132") and North
  American ones with separators ("(415) 555-0132", "1-415-555-0132"; area code and exchange
  2-9). Bare digit runs, dates (2024-01-15) and year ranges (1999-2004) stay.

Speed: each pattern starts with a literal or the character class it must start with, so the regex
engine skips ahead, and runs only behind a cheap test ('@' for e-mail; marker substrings for
tokens; one shared search for a 7+ character run of digits and separators for the numeric kinds).
Anchors: datatrove's PIIFormatter (e-mail, IPv4), NeMo Curator's PII modifier and Presidio's
recognizers (phones, Luhn-checked cards).
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

from llmtrain.errors import UserError

PII_KINDS = ("email", "ip", "phone", "credit_card", "secret")
PLACEHOLDERS = {
    "email": "<EMAIL>",
    "ip": "<IP_ADDRESS>",
    "phone": "<PHONE_NUMBER>",
    "credit_card": "<CREDIT_CARD>",
    "secret": "<SECRET>",
}
_ORDER = ("secret", "email", "credit_card", "ip", "phone")  # secrets first: a key block holds anything
_NUMERIC = ("credit_card", "ip", "phone")

# --- secrets -------------------------------------------------------------------------------------
_KEY_BEGIN = r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"
_KEY_BODY = (
    r"(?:(?:[ \t]*\n)+[ \t]*(?:[A-Za-z][\w-]*:[^\n]*|[A-Za-z0-9+/=]{4,}(?=[ \t]*(?:\n|\Z))))+"  # base64 / "Header: value" lines
)
# Through the END line (keys are < 16 KB); without one, the key's lines. Text without an END
# line uses the second pattern only, so many BEGIN lines cost no rescans to the end.
_KEY_BLOCK = re.compile(
    _KEY_BEGIN + r"(?:.{0,16384}?-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----|" + _KEY_BODY + ")", re.DOTALL
)
_KEY_BLOCK_NO_END = re.compile(_KEY_BEGIN + _KEY_BODY)
_B = r"(?<![A-Za-z0-9_-])"  # a token starts after none of its own characters...
_E = r"(?![A-Za-z0-9_-])"  # ...and ends before none
# (marker, pattern): the pattern runs only on text holding its marker, and starts with the marker
# (so the regex engine scans for that literal), the look-behind checking what precedes it.
_TOKENS = tuple(
    (marker, re.compile(marker + rf"(?<={_B}{marker}){rest}{_E}"))
    for marker, rest in (
        ("AKIA", "[0-9A-Z]{16}"),  # AWS access key id
        ("ASIA", "[0-9A-Z]{16}"),  # AWS temporary access key id
        ("ghp_", "[A-Za-z0-9]{36}"),  # GitHub personal access token
        ("gho_", "[A-Za-z0-9]{36}"),  # GitHub OAuth token
        ("ghu_", "[A-Za-z0-9]{36}"),  # GitHub user-to-server token
        ("ghs_", "[A-Za-z0-9]{36}"),  # GitHub server-to-server token
        ("ghr_", "[A-Za-z0-9]{36}"),  # GitHub refresh token
        ("github_pat_", "[A-Za-z0-9_]{22,255}"),  # GitHub fine-grained token
        ("sk_live_", "[A-Za-z0-9]{16,}"),  # Stripe secret key
        ("rk_live_", "[A-Za-z0-9]{16,}"),  # Stripe restricted key
        ("xoxa-", "[A-Za-z0-9-]{10,}"),  # Slack tokens
        ("xoxb-", "[A-Za-z0-9-]{10,}"),
        ("xoxp-", "[A-Za-z0-9-]{10,}"),
        ("xoxr-", "[A-Za-z0-9-]{10,}"),
        ("xoxs-", "[A-Za-z0-9-]{10,}"),
        ("AIza", "[0-9A-Za-z_-]{35}"),  # Google API key
        ("sk-", "[A-Za-z0-9_-]{32,}"),  # OpenAI / Anthropic style keys
        ("eyJ", r"[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*"),  # JWT: header.payload.signature
    )
)
# Cheap gates, one substring each, in front of groups of markers: '_' for GitHub and Stripe,
# "xox" for Slack; text with none of them (most prose) skips the token patterns at once.
_TOKEN_GATES = ("AKIA", "ASIA", "AIza", "sk-", "eyJ", "_", "xox")
_TOKEN_GROUPS = tuple(
    (gate, tuple((m, p) for m, p in _TOKENS if ("_" if "_" in m else "xox" if m.startswith("xox") else m) == gate))
    for gate in _TOKEN_GATES
)
# A value after ':' or '=' (optionally quoted, optionally after "Bearer "); the name before it is
# checked separately, in the 64 characters before the ':' or '='.
# (The value is taken whole by the (?=(...))\2 idiom, an atomic group: no backtracking into it.)
_ASSIGNED = re.compile(
    r"""[:=][ \t]*(["']?)(?:(?i:bearer|basic)[ \t]+)?(?=([A-Za-z0-9_\-+/=.~]{16,512}))\2\1(?![A-Za-z0-9_\-+/=.~])"""
)
_SECRET_NAME = re.compile(
    r"(?i)(?:api[_-]?key|apikey|secret|token|passw(?:or)?d|credential|auth(?!or(?:s|ed|ity|ities|ship)?\b))[\w.-]*[\"']?[ \t]*\Z"
)

# --- e-mail: found from the '@' (a fast literal search), the local part then matched backwards --
_EMAIL_DOMAIN = re.compile(r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}(?![\w-]|\.[A-Za-z0-9])")
_EMAIL_LOCAL = re.compile(r"(?<![\w+-])[\w+-](?:[\w.+-]{0,62}[\w+-])?\Z")

# --- numbers: each pattern starts with the character it must start with (then a look-behind on
# what precedes it), so the regex engine's fast first-character scan applies --------------------
_CARD = re.compile(r"\d(?<![\w-]\d)(?<!\d[ -]\d)(?:[ -]?\d){12,18}(?!\w|[ -]\d)")
_IPV4 = re.compile(r"\d(?<![\w.]\d)\d{0,2}\.\d{1,3}\.\d{1,3}\.\d{1,3}(?!\w|\.\d)")
_VERSION_BEFORE = re.compile(
    r"(?i)(?:\b(?:version|release|build|ver\.?|section|v)[ \t]*|[a-z][/-])\Z"
)  # "Firefox/2.0.0.11", "libfoo-1.2.0.1"
# IPv6 from its first colon (a literal scan): the rest of the address; the group before the
# colon (up to 4 hex digits) is then taken in by `_redact_ipv6`.
_IPV6_REST = re.compile(r":(?=[0-9A-Fa-f]{0,4}:)[0-9A-Fa-f:]{1,38}(?:(?<=:)(?:\d{1,3}\.){3}\d{1,3})?(?![\w:]|\.\w)")
_HEX = frozenset("0123456789abcdefABCDEF")
_NUMBER_GATE = re.compile(r"\d[\d.() -]{5}\d")  # 7+ characters of digits and separators
# +CC then either the rest in one run, or groups that each follow a separator (a trunk "(0)" may
# sit before the first): every digit run has one parse, so no backtracking blow-up
_PHONE_INTL = re.compile(
    r"\+(?<![\w+]\+)[1-9](?:\d{7,14}|\d{0,2}(?:[ .-]?\(\d{1,4}\)\d{0,4})?(?:[ .-]\d{1,10}){1,6})(?![\w-]|\.\d)"
)
_PHONE_NANP = re.compile(
    r"(?:\((?<![\w+.-]\()[2-9]\d\d\)[ ]?"  # (415) 555-0132
    r"|1(?<![\w+.-]1)[ .-](?:\([2-9]\d\d\)[ ]?|[2-9]\d\d[ .-])"  # 1-415-555-0132
    r"|[2-9](?<![\w+.-][2-9])\d\d[ .-])"  # 415-555-0132, 415.555.0132, 415 555 0132
    r"[2-9]\d\d[ .-]\d{4}(?![\w-]|\.\d)"
)


@dataclass(frozen=True)
class PiiConfig:
    """Which kinds of PII `redact` replaces. Checked on creation."""

    enabled: bool = False  # the whole stage
    kinds: tuple[str, ...] = PII_KINDS  # a subset of PII_KINDS

    def __post_init__(self) -> None:
        if isinstance(self.kinds, (list, set, frozenset)):
            object.__setattr__(self, "kinds", tuple(self.kinds))
        self.check()

    def check(self) -> None:
        """Raise UserError (one line: the key, the value, the fix) for a bad setting."""
        if not isinstance(self.enabled, bool):
            raise UserError(f"pii.enabled {self.enabled!r} must be true or false")
        if not isinstance(self.kinds, tuple) or not all(isinstance(k, str) for k in self.kinds):
            raise UserError(f"pii.kinds {self.kinds!r} must be a list of kinds from {', '.join(PII_KINDS)}; e.g. [email, secret]")
        for kind in self.kinds:
            if kind not in PII_KINDS:
                raise UserError(f"pii.kinds: {kind!r} is not a PII kind; use some of {', '.join(PII_KINDS)}")

    @classmethod
    def from_dict(cls, d: dict | None) -> PiiConfig:
        """From a config mapping (e.g. the YAML `pii:` section); unknown keys are errors."""
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise UserError(f"pii must be a mapping of settings, not {type(d).__name__}; e.g. {{enabled: true}}")
        for key in d:
            if key not in ("enabled", "kinds"):
                raise UserError(f"pii.{key} is not a setting; valid keys: enabled, kinds")
        kinds = d.get("kinds", PII_KINDS)
        if isinstance(kinds, str):
            raise UserError(f"pii.kinds {kinds!r} must be a list, e.g. [{kinds}]")
        return cls(enabled=d.get("enabled", False), kinds=tuple(kinds) if isinstance(kinds, (list, tuple)) else kinds)


def redact(text: str, cfg: PiiConfig) -> tuple[str, dict[str, int]]:
    """`text` with each PII occurrence of the kinds in `cfg` replaced by its placeholder, and
    {kind: replacements} for the kinds found (the text itself and {} when there are none)."""
    counts: dict[str, int] = {}
    if not cfg.enabled:
        return text, counts
    redactors, numeric = _plan(cfg.kinds)
    # One look for a run of 7+ digits and separators, shared by the cards, phones and IPv4.
    numbers = numeric and any(map(text.__contains__, "0123456789")) and _NUMBER_GATE.search(text) is not None
    for kind, redactor in redactors:
        text, n = redactor(text, numbers)
        if n:
            counts[kind] = n
    return text, counts


@lru_cache(maxsize=64)
def _plan(kinds: tuple[str, ...]) -> tuple[tuple[tuple[str, Callable], ...], bool]:
    """The redactors to run for `kinds`, in order, and whether any of them needs digits."""
    return tuple((k, _REDACTORS[k]) for k in _ORDER if k in kinds), any(k in kinds for k in _NUMERIC)


def _sub(pattern: re.Pattern, text: str, placeholder: str, valid: Callable[[re.Match], bool] | None = None) -> tuple[str, int]:
    """Replace the matches that `valid` accepts (all when None); return the text and how many."""
    if valid is None:
        return pattern.subn(placeholder, text)
    n = 0

    def replace(m: re.Match) -> str:
        nonlocal n
        if valid(m):
            n += 1
            return placeholder
        return m.group()

    out = pattern.sub(replace, text)
    return (out, n) if n else (text, 0)


def _redact_secret(text: str, numbers: bool) -> tuple[str, int]:
    total = 0
    if "PRIVATE KEY" in text:
        text, n = _sub(_KEY_BLOCK if "-----END" in text else _KEY_BLOCK_NO_END, text, PLACEHOLDERS["secret"])
        total += n
    if any(map(text.__contains__, _TOKEN_GATES)):
        for gate, group in _TOKEN_GROUPS:
            if gate in text:
                for marker, pattern in group:
                    if marker in text:
                        text, n = _sub(pattern, text, PLACEHOLDERS["secret"])
                        total += n
    if "=" in text or ":" in text:
        text, n = _redact_assigned(text)
        total += n
    return text, total


def _redact_assigned(text: str) -> tuple[str, int]:
    """`name = "value"`: replace the value when the name says secret and the value looks random."""
    first = _ASSIGNED.search(text)
    if first is None:
        return text, 0
    n = 0
    parts = []
    last = 0
    for m in _ASSIGNED.finditer(text, first.start()):
        value = m.group(2)
        if not _random_looking(value) or not _SECRET_NAME.search(text, max(0, m.start() - 64), m.start()):
            continue
        parts += (text[last : m.start(2)], PLACEHOLDERS["secret"])
        last = m.end(2)
        n += 1
    if not n:
        return text, 0
    parts.append(text[last:])
    return "".join(parts), n


def _random_looking(value: str) -> bool:
    """16+ characters with a letter and a digit and >= 3 bits of Shannon entropy per character."""
    if value.isalpha() or value.isdigit() or not any(c.isdigit() for c in value) or not any(c.isalpha() for c in value):
        return False
    size = len(value)
    entropy = -sum(c / size * math.log2(c / size) for c in Counter(value).values())
    return entropy >= 3.0


def _redact_email(text: str, numbers: bool) -> tuple[str, int]:
    if "@" not in text:
        return text, 0
    parts, last, n = [], 0, 0
    for m in _EMAIL_DOMAIN.finditer(text):
        local = _EMAIL_LOCAL.search(text, max(last, m.start() - 64), m.start())
        if local is not None:
            parts += (text[last : local.start()], PLACEHOLDERS["email"])
            last = m.end()
            n += 1
    if not n:
        return text, 0
    parts.append(text[last:])
    return "".join(parts), n


def _card(m: re.Match) -> bool:
    """Grouped as cards are (one kind of separator, groups of 3+ digits), a network's leading
    digits, and the Luhn checksum."""
    number = m.group()
    groups = re.split("[ -]", number)
    if len(groups) > 1 and (min(map(len, groups)) < 3 or (" " in number and "-" in number)):
        return False
    digits = [int(c) for c in number if c != " " and c != "-"]
    if not 13 <= len(digits) <= 19:
        return False
    first4 = digits[0] * 1000 + digits[1] * 100 + digits[2] * 10 + digits[3]
    if not (3 <= digits[0] <= 6 or 2221 <= first4 <= 2720):
        return False
    checksum = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        checksum += d
    return checksum % 10 == 0


def _redact_card(text: str, numbers: bool) -> tuple[str, int]:
    if not numbers:
        return text, 0
    return _sub(_CARD, text, PLACEHOLDERS["credit_card"], _card)


def _global_ip(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_global
    except ValueError:  # e.g. an octet over 255, or a leading zero
        return False


def _ipv4(m: re.Match) -> bool:
    """A global IPv4 address, not a four-part version number ("version 1.2.3.4")."""
    return _global_ip(m.group()) and not _VERSION_BEFORE.search(m.string, max(0, m.start() - 16), m.start())


def _redact_ip(text: str, numbers: bool) -> tuple[str, int]:
    total = 0
    if "::" in text or text.count(":") >= 7:
        text, total = _redact_ipv6(text)
    if numbers and "." in text:
        text, n = _sub(_IPV4, text, PLACEHOLDERS["ip"], _ipv4)
        total += n
    return text, total


def _redact_ipv6(text: str) -> tuple[str, int]:
    """Global IPv6 addresses with at least three groups (so slices like a[1::2] stay)."""
    parts, last, n = [], 0, 0
    for m in _IPV6_REST.finditer(text):
        start = m.start()
        while start > m.start() - 4 and start > last and text[start - 1] in _HEX:
            start -= 1
        if start > 0 and (text[start - 1].isalnum() or text[start - 1] in ":._"):
            continue  # inside a longer word or colon run
        address = text[start : m.end()]
        if sum(1 for group in address.split(":") if group) >= 3 and _global_ip(address):
            parts += (text[last:start], PLACEHOLDERS["ip"])
            last = m.end()
            n += 1
    if not n:
        return text, 0
    parts.append(text[last:])
    return "".join(parts), n


def _intl_phone(m: re.Match) -> bool:
    return 8 <= sum(c.isdigit() for c in m.group()) <= 15


def _redact_phone(text: str, numbers: bool) -> tuple[str, int]:
    if not numbers:
        return text, 0
    total = 0
    if "+" in text:
        text, total = _sub(_PHONE_INTL, text, PLACEHOLDERS["phone"], _intl_phone)
    text, n = _sub(_PHONE_NANP, text, PLACEHOLDERS["phone"])
    return text, total + n


_REDACTORS = {
    "secret": _redact_secret,
    "email": _redact_email,
    "credit_card": _redact_card,
    "ip": _redact_ip,
    "phone": _redact_phone,
}
