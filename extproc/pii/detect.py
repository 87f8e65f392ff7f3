"""Finding personal data and secrets in text.

Each entity type is a candidate scan (a regex compiled once, by hand: this is the hot path) followed
by a validator that cuts false positives with the real rules, from well-kept libraries where they
exist: `phonenumbers` (Google's libphonenumber metadata) decides whether digits are a phone number of
some country, `python-stdnum`'s IBAN registry gives each country's length and format, `ipaddress`
parses addresses. The IBAN, Luhn and US SSN checks are written here (every candidate pays for them,
and stdnum's are 5-10x slower) and tested against stdnum's as the oracle. Scans are skipped outright
when the text lacks what every candidate of the type needs (an "@", a digit, a ":"), so plain prose
costs a few passes of C code.

Overlaps are settled by specificity: a secret or a card number wins over a phone number made of the
same digits, an IBAN over the digits inside it, an e-mail over an IP address in its domain.
"""

from __future__ import annotations

import bisect
import functools
import ipaddress
import itertools
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import resources
from typing import Final

import phonenumbers
from phonenumbers import phonenumberutil as _phone_util
from phonenumbers import re_util as _phone_re_util

ENTITY_TYPES: Final = ("EMAIL", "PHONE", "CREDIT_CARD", "IBAN", "US_SSN", "IP_ADDRESS", "SECRET")
# Higher wins when two findings overlap.
_PRIORITY: Final = {"SECRET": 7, "CREDIT_CARD": 6, "IBAN": 5, "EMAIL": 4, "US_SSN": 3, "IP_ADDRESS": 2, "PHONE": 1}


@dataclass(frozen=True, slots=True)
class Finding:
    type: str
    start: int
    end: int


# -- EMAIL ----------------------------------------------------------------------------------------

_EMAIL = re.compile(
    r"(?<![A-Za-z0-9._%+\-/])"
    r"([A-Za-z0-9_%+\-][A-Za-z0-9_%+\-']*(?:\.[A-Za-z0-9_%+\-']+)*)"
    r"@((?:[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\.)+([A-Za-z]{2,24}))"
    r"(?![A-Za-z0-9\-]|\.[A-Za-z0-9])"
)
# "icon@2x.png", "image@3x.webp": asset names, not addresses.
_FILE_EXTENSIONS: Final = frozenset(
    [
        "png",
        "jpg",
        "jpeg",
        "gif",
        "svg",
        "webp",
        "bmp",
        "ico",
        "tif",
        "tiff",
        "pdf",
        "js",
        "mjs",
        "ts",
        "css",
        "scss",
        "html",
        "htm",
        "json",
        "yaml",
        "yml",
        "xml",
        "txt",
        "md",
        "py",
        "rb",
        "go",
        "rs",
        "java",
        "kt",
        "c",
        "h",
        "cpp",
        "hpp",
        "cs",
        "php",
        "sh",
        "zip",
        "gz",
        "tar",
        "mp3",
        "mp4",
        "mov",
        "avi",
        "wav",
        "woff",
        "woff2",
        "ttf",
        "otf",
        "map",
        "lock",
    ]
)


def _emails(text: str, found: list[Finding]) -> None:
    at = text.find("@")
    while at != -1:
        # The regex only around each "@" (a local part is at most 64 characters).
        lo = max(0, at - 65)
        m = _EMAIL.search(text, lo, min(len(text), at + 256))
        while m is not None and m.end() <= at:
            m = _EMAIL.search(text, m.end(), min(len(text), at + 256))
        if m is not None and m.start() <= at < m.end():
            if m.group(3).lower() not in _FILE_EXTENSIONS:
                found.append(Finding("EMAIL", m.start(), m.end()))
            at = text.find("@", m.end())
        else:
            at = text.find("@", at + 1)


# -- numbers: CREDIT_CARD, US_SSN, IPv4, PHONE -------------------------------------------------------
#
# One pass finds every run of digits written with the separators these use; each run is then split
# at spaces into tokens and windows of tokens are classified (longest first), so a card number, a
# phone number and an address in one run are told apart, and most runs (a year, a count) are
# dismissed by their digit count alone. Faster than one regex per type: every such regex would have
# to look at every digit of the text again.

# Runs of at least 7 characters (the shortest entity here: an IPv4 address like 1.1.1.1), so years,
# sizes and counts are skipped inside the regex engine.
# ...and where an IBAN may start: a country code and two check digits, then its account part.
# Both branches start with a digit, so the scan skips to digits in C (2-3x faster than starting the
# IBAN branch at its letters): the IBAN one matches its two check digits (group 1: the second) after
# two capital letters, which start the candidate.
_NUM = re.compile(r"\d(?:(?<=[A-Z]{2}\d)(\d)(?=[ \-]?[A-Z0-9])|[\d \-./()\u00a0]{5,}\d)")
_GLUE = re.compile(r"[A-Za-z_\u00c0-\u024f]")
_SPACE_SPLIT = re.compile(r"[ \u00a0]+")
# A group of a grouped digit run (card numbers are written in groups of 4 to 6).
_GROUP = re.compile(r"\d{2,6}")
_NOT_DIGITS = str.maketrans("", "", " -./()\u00a0")
_MAX_WINDOW = 7


def _card_brand_ok(digits: str) -> bool:
    """The number has the length of a brand with its issuer prefix (a random Luhn-valid number
    mostly does not)."""
    n = len(digits)
    p2, p3, p4, p6 = int(digits[:2]), int(digits[:3]), int(digits[:4]), int(digits[:6])
    if digits[0] == "4":
        return n in (13, 16, 19)  # Visa
    if 51 <= p2 <= 55 or 2221 <= p4 <= 2720:
        return n == 16  # Mastercard
    if p2 in (34, 37):
        return n == 15  # Amex
    if digits.startswith("6011") or 644 <= p3 <= 649 or p2 == 65 or 622126 <= p6 <= 622925:
        return 16 <= n <= 19  # Discover
    if 3528 <= p4 <= 3589:
        return 16 <= n <= 19  # JCB
    if 300 <= p3 <= 305 or p2 in (36, 38, 39) or p4 == 3095:
        return 14 <= n <= 19  # Diners Club
    if p2 in (62, 81):
        return 16 <= n <= 19  # UnionPay
    if p2 in (50, 56, 57, 58, 63, 67, 68, 69) or p4 in (6304, 6759, 6761, 6762, 6763):
        return 12 <= n <= 19  # Maestro
    if 2200 <= p4 <= 2204:
        return n == 16  # Mir
    return False


# How card numbers are grouped when they are: fours (the last group shorter for 13-19 digits), or
# Amex / Diners 4-6-5 and 4-6-4.
_CARD_GROUPS = re.compile(r"\d{4}(?:([ \-\u00a0])\d{4}(?:\1\d{4}){0,2}\1\d{1,5}|([ \-\u00a0])\d{6}\2\d{4,5})")


# A digit in an even place from the right counts as the digit sum of its double.
_LUHN_DOUBLED: Final = str.maketrans("0123456789", "0246813579")


def luhn_valid(digits: str) -> bool:
    """`stdnum.luhn.is_valid(digits)` in ~1.5 µs instead of ~9 (it looks each digit up in its
    alphabet with str.index and sums divmods): every number with a card's shape is checked."""
    if not digits or not digits.isascii() or not digits.isdigit():
        return False
    return sum(map(int, digits[-1::-2] + digits[-2::-2].translate(_LUHN_DOUBLED))) % 10 == 0


def _is_card(raw: str, digits: str) -> bool:
    if not 13 <= len(digits) <= 19:
        return False
    if raw != digits and _CARD_GROUPS.fullmatch(raw) is None:
        return False
    return _card_brand_ok(digits) and luhn_valid(digits)


class _Near:
    """A case-insensitive list of words looked for in a short window of the text (what precedes or
    surrounds a candidate number). Python's re is 4-8x slower on such alternations with (?i) than
    without, so the window is lowercased and matched case-sensitively (the patterns are written in
    lowercase). One character before the window is kept, so \\b and lookbehinds see what precedes it,
    as they do in `pattern.search(text, pos, endpos)`."""

    __slots__ = ("pattern", "regex")

    def __init__(self, pattern: str) -> None:
        body = pattern.removeprefix("(?i)")
        letters = re.sub(r"\\[A-Z]|A-Z", "", body)  # escapes such as \\S, and ranges, may be capitals
        assert pattern.startswith("(?i)") and letters == letters.lower(), "write the words in lowercase"
        self.pattern = pattern
        # A word that must not follow a letter, `\\bcall` or `(?<![a-z])numer`, is written
        # `c(?<!\\wc)all` / `n(?<![a-z]n)umer`: the same test once its first letter matched, so that
        # re tries the alternative only where that letter is (another 2-5x).
        body = re.sub(r"\\b([^\W\d_])(?![?*+{])", r"\1(?<!\\w\1)", body)
        body = re.sub(r"\(\?<!\[a-z\]\)([^\W\d_])(?![?*+{])", r"\1(?<![a-z]\1)", body)
        self.regex = re.compile(body)

    def search(self, text: str, start: int, end: int) -> bool:
        before = max(0, start - 1)
        return self.regex.search(text[before:end].lower(), start - before) is not None


_SSN_SHAPE = re.compile(r"(\d{3})([- ]?)(\d{2})\2(\d{4})")
_SSN_CONTEXT = _Near(
    r"(?i)(?:(?<![a-z])ssns?(?![a-z])|(?<![a-z])ss#|social[\s\-_]*security|(?<![a-z])social(?![a-z])|"
    r"(?<![a-z])ss\s*no(?![a-z])|socsec|taxpayer[\s_]+id|(?<![a-z])itin(?![a-z])|(?<![a-z])tin(?![a-z])|"
    r"n[uú]mero\s+de\s+seguro\s+social|sozialversicherung)"
)


# Numbers the SSA voided after they were printed in advertising and examples (python-stdnum's list).
_SSN_VOID: Final = frozenset(("078051120", "457555462", "219099999"))


def ssn_valid(number: str) -> bool:
    """`stdnum.us.ssn.is_valid(number)` for nine characters without separators, in ~0.5 µs instead
    of ~5 (a regex, three groups and exceptions): the same rules, no area 000, 666 or 9xx, no
    group 00, no serial 0000, none of the voided numbers."""
    if len(number) != 9 or not number.isascii() or not number.isdigit():
        return False
    if number.startswith(("000", "666", "9")) or number[3:5] == "00" or number.endswith("0000"):
        return False
    return number not in _SSN_VOID


def _is_ssn(text: str, start: int, raw: str) -> bool:
    m = _SSN_SHAPE.fullmatch(raw)
    if m is None or not ssn_valid(m.group(1) + m.group(3) + m.group(4)):
        return False
    # Nine bare digits are an SSN only where the text says so.
    if m.group(2):
        return True
    # Nine bare digits: "SSN" (or the like) before it in the line or table, or just after it.
    end = start + len(raw)
    return _SSN_CONTEXT.search(text, max(0, start - 300), min(len(text), end + 80))


_IPV4 = re.compile(r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?:\.(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)){3}")
# Preceded by these (case-insensitive), a dotted quad is a version number.
_VERSION_BEFORE = _Near(
    r"(?i)(?:\bv|\bversion\s*[:=]?\s*|\bver\.?\s*|\brelease\s+|\bbuild\s+|\bv\.\s*|==|>=|<=|~=|\^|[A-Za-z]/)$"
)


def _is_ipv4(text: str, start: int, raw: str) -> bool:
    return _IPV4.fullmatch(raw) is not None and not _VERSION_BEFORE.search(text, max(0, start - 16), start)


_PHONE_CONTEXT = _Near(
    r"(?i)(?:phone|\btel\b|\btel\.|telephone|mobile|\bcell|\bcall|\bfax|whatsapp|contact|\bsms\b|text me|reach|dial|"
    r"hotline|toll[\s\-]?free|\bring\b|\bm:|\bt:|\bp:|\bph\.?|\bmob\.?|téléphone|portable|appel|telefon|handy|anruf|ruf|"
    r"erreichbar|móvil|celular|teléfono|telefono|llam|llám|ligue|ligar|contato|chiam|cellulare|bel |bellen|zadzwo|"
    r"dzwo|kontakt|komórk|ringe|ring\s|bel\s|(?<![a-z])numer|(?<![a-z])numero|(?<![a-z])número|(?<![a-z])numéro|(?<![a-z])nummer|電話|携帯|手机|电话|拨打|联系|फ़ोन|फोन|कॉल|मोबाइल|мобильный|телефон|звон)"
)
# Regions tried for numbers written without a country code (most common first).
NATIONAL_REGIONS: Final = (
    "US",
    "GB",
    "DE",
    "FR",
    "IN",
    "ES",
    "IT",
    "NL",
    "BR",
    "AU",
    "CA",
    "JP",
    "CN",
    "MX",
    "CH",
    "PL",
    "PT",
    "SE",
    "BE",
    "AT",
    "IE",
    "ZA",
    "KR",
    "RU",
    "TR",
    "AR",
    "SG",
    "NZ",
)
_DATE_LIKE = re.compile(r"\d{4}[\-./]\d{1,2}[\-./]\d{1,2}|\d{1,2}[\-./]\d{1,2}[\-./]\d{2,4}")


# libphonenumber's metadata has thousands of patterns; without its own cache they fall out of the re
# module's 512 entries and are compiled again and again (~0.7 ms each): keep them.
_phone_re_util.enable_pattern_cache()

_ORIGINAL_DIGITS_ONLY: Final = _phone_util.normalize_digits_only
_ASCII_NON_DIGITS: Final = str.maketrans("", "", "".join(chr(c) for c in range(128) if not chr(c).isdigit()))


def _normalize_digits_only(number: str, keep_non_digits: bool = False) -> str:
    """libphonenumber's digit normalizer, with a fast path for ASCII text (the usual case): the
    library's own reads one character at a time through `unicodedata.digit` and builds the result by
    string concatenation, ~27% of what a parse costs; `parse` calls it twice, and a candidate that is
    not a valid number is parsed once per region tried. In ASCII only 0-9 are digits, so deleting the
    rest is the same answer; anything else goes to the library's own."""
    if number.isascii():
        return number if keep_non_digits else number.translate(_ASCII_NON_DIGITS)
    result: str = _ORIGINAL_DIGITS_ONLY(number, keep_non_digits)
    return result


# parse() and the helpers it calls look the name up in their module at each call.
_phone_util.normalize_digits_only = _normalize_digits_only


def warm_up() -> None:
    """Load the phone metadata of every region tried and compile its patterns now (server start), not
    on the first request that holds a number."""
    for region in NATIONAL_REGIONS:
        example = phonenumbers.example_number(region)
        if example is not None:
            _parse_phone(phonenumbers.format_number(example, phonenumbers.PhoneNumberFormat.NATIONAL), region)
            _parse_phone(phonenumbers.format_number(example, phonenumbers.PhoneNumberFormat.E164), None)
    _iban_formats()


def _parse_phone(candidate: str, region: str | None) -> bool:
    try:
        number = phonenumbers.parse(candidate, region)
    except phonenumbers.NumberParseException:
        return False
    return bool(phonenumbers.is_valid_number(number))


def _is_phone(text: str, start: int, raw: str, digits: str, international: bool) -> bool:
    if not 7 <= len(digits) <= 15 or _DATE_LIKE.fullmatch(raw):
        return False
    if raw.count("(") != raw.count(")"):
        return False
    if international:
        return _parse_phone("+" + raw if not raw.startswith(("+", "(")) else raw, None)
    if raw.startswith("00") and _parse_phone("+" + raw[2:], None):
        return True
    context = _PHONE_CONTEXT.search(text, max(0, start - 60), start)
    formatted = raw != digits
    if not formatted and (not context or len(digits) > 11):
        return False  # a bare run of digits: an id, an IMEI, an amount, a timestamp
    if any(_DATE_LIKE.fullmatch(part) for part in raw.split()):
        return False  # a date and a time
    if "." in raw and not context and raw.count(".") < 2:
        return False  # a decimal number
    if _placeholder_digits(digits) or _NOT_PHONE_BEFORE.search(text, max(0, start - 24), start):
        return False
    if _NOT_PHONE_LAYOUT.fullmatch(raw) or _IBAN_NEAR.search(text, max(0, start - 40), start):
        return False  # an SSN-shaped number, or digits of an account number
    if context:
        return any(_parse_phone(raw, region) for region in NATIONAL_REGIONS)
    # No phone word nearby: only numbers written the way that country writes them.
    if "(" in raw or raw[0] == "0":
        return any(_parse_phone(raw, region) for region in NATIONAL_REGIONS)
    return _NANP_LAYOUT.fullmatch(raw) is not None and (_parse_phone(raw, "US") or _parse_phone(raw, "CA"))


# North American numbers as they are written: 415-555-0132, 415.555.0132, 415 555 0132, 1-415-555-0132.
_NANP_LAYOUT = re.compile(r"(?:1[ .\-])?\d{3}([ .\-])\d{3}\1\d{4}")
# Digits after these are an ISBN, an order or a part number, not a phone number.
_NOT_PHONE_BEFORE = _Near(
    r"(?i)(?:isbn(?:-1[03])?|issn|imei|part\s+(?:no\.?|number|#)|sku|order\s+(?:no\.?|#)|zip(?:\s*code)?|postcode|"
    r"postal\s*code|cep|plz|tracking(?:\s+(?:no\.?|number|#))?|routing(?:\s+(?:no\.?|number|#))?|"
    r"account(?:\s+(?:no\.?|number|#))?|mandate)[\s:#]*$"
)


# An SSN, a US ZIP+4, a Brazilian CEP: shapes no phone number is written in.
_NOT_PHONE_LAYOUT = re.compile(r"\d{3}-\d{2}-\d{4}|\d{5}-\d{3,4}")
_IBAN_NEAR = _Near(r"(?i)\biban\b")


def _placeholder_digits(digits: str) -> bool:
    """999-999-9999, 123-456-7890, 000 000 0000: what forms show, not anyone's number."""
    return len(set(digits)) <= 2 or digits in "012345678901234567890" or digits in "98765432109876543210"


def _numbers(text: str, found: list[Finding], types: frozenset[str]) -> None:
    want_card, want_ssn = "CREDIT_CARD" in types, "US_SSN" in types
    want_ip, want_phone = "IP_ADDRESS" in types, "PHONE" in types
    want_iban = "IBAN" in types
    skip_to = 0
    for m in _NUM.finditer(text):
        iban_branch = m.group(1) is not None
        base = m.start() - 2 if iban_branch else m.start()
        if base < skip_to:
            continue  # inside an IBAN: its digits are not a card or phone number
        if iban_branch:
            # A country code and check digits (the same pass finds them: one scan instead of two).
            end = _iban_at(text, base, found) if want_iban and (base == 0 or not text[base - 1].isalnum()) else -1
            if end == -1:
                # Not an IBAN: the rest of this identifier ("XEH830845911", "1ZZVDR640357300180") is
                # not a number of its own either.
                end = m.end()
                while end < len(text) and text[end].isalnum():
                    end += 1
            skip_to = end
            continue
        if not (want_card or want_ssn or want_ip or want_phone):
            continue
        span = m.group()
        # Fewer than 7 digits can only be an IPv4 address (1.2.3.4): most runs (years, sizes,
        # amounts) end here.
        if len(span.translate(_NOT_DIGITS)) < 7 and span.count(".") < 3:
            continue
        # Digits glued to Latin letters are part of an identifier (a hex id, a UUID, "v2", "abc123");
        # scripts without spaces (Chinese, Japanese) put numbers right next to words.
        if base > 0 and _GLUE.match(text, base - 1):
            continue
        if base > 1 and text[base - 1] in "-_/#" and text[base - 2].isascii() and text[base - 2].isalpha():
            continue  # "INV-2021-0471", "ORD-2020-335845": a code, not a number of its own
        after = m.end()
        if after < len(text) and _GLUE.match(text, after):
            continue
        # Tokens: (start, end) offsets in the text of the space-separated parts of the run.
        tokens: list[tuple[int, int]] = []
        pos = 0
        for sep in _SPACE_SPLIT.finditer(span):
            if sep.start() > pos:
                tokens.append((base + pos, base + sep.start()))
            pos = sep.end()
        if pos < len(span):
            tokens.append((base + pos, base + len(span)))
        # A dotted quad is never part of a longer number ("ping -c 3 10.0.0.1").
        stops = {k for k, (a, b) in enumerate(tokens) if text.count(".", a, b) == 3}
        i = 0
        while i < len(tokens):
            hit = None
            last = min(len(tokens), i + _MAX_WINDOW) - 1
            for k in range(i, last + 1):
                if k in stops:
                    last = max(i, k - 1) if k > i else i
                    break
            for j in range(last, i - 1, -1):
                start, end = tokens[i][0], tokens[j][1]
                # Parentheses and trailing dots belong to a number only when balanced / inside it.
                while end > start and text[end - 1] in ".-/(":
                    end -= 1
                while start < end and text[start] in ".-/)":
                    start += 1
                if text[start] == "(" and ")" not in text[start:end]:
                    start += 1
                if start > 0 and text[start - 1] == "(" and text[start:end].count(")") > text[start:end].count("("):
                    start -= 1  # "(888) 205-3187": the run started inside the parentheses
                if end > start and text[end - 1] == ")" and "(" not in text[start:end]:
                    end -= 1
                raw = text[start:end]
                digits = raw.translate(_NOT_DIGITS)
                if len(digits) < 7 and raw.count(".") < 3:
                    # Nothing is this short but a dotted quad; the shorter windows left hold fewer
                    # digits and dots still.
                    break
                international = start > 0 and text[start - 1] == "+"
                if want_card and not international and _is_card(raw, digits):
                    # Inside a longer run of digit groups (a tracking number) a card-shaped part is not one.
                    if not (i > 0 and _GROUP.fullmatch(text, *tokens[i - 1])) and not (
                        j + 1 < len(tokens) and _GROUP.fullmatch(text, *tokens[j + 1])
                    ):
                        hit = ("CREDIT_CARD", start, end)
                elif want_ip and j == i and _is_ipv4(text, start, raw):
                    hit = ("IP_ADDRESS", start, end)
                elif want_ssn and j - i <= 2 and _is_ssn(text, start, raw):
                    hit = ("US_SSN", start, end)
                elif want_phone and i == 0 and _is_phone(text, start, raw, digits, international):
                    hit = ("PHONE", start - 1 if international else start, end)
                if hit is not None:
                    break
            if hit is None:
                i += 1
                continue
            found.append(Finding(*hit))
            while i < len(tokens) and tokens[i][0] < hit[2]:
                i += 1


# -- IBAN -----------------------------------------------------------------------------------------


@functools.cache
def _iban_formats() -> dict[str, tuple[int, re.Pattern[str]]]:
    """Country code -> (IBAN length, its BBAN's format), from python-stdnum's copy of the SWIFT
    registry, read the way stdnum reads it (`4!n6!c`: four digits, then six letters or digits)."""
    out: dict[str, tuple[int, re.Pattern[str]]] = {}
    classes = {"n": "[0-9]", "a": "[A-Z]", "c": "[A-Za-z0-9]"}
    text = resources.files("stdnum").joinpath("iban.dat").read_text(encoding="utf-8")
    for line in text.splitlines():
        m = re.match(r'^([A-Z]{2}) .*bban="([^"]+)"', line)
        if m:
            parts = re.findall(r"([1-9][0-9]*)!([nac])", m.group(2))
            pattern = "".join(f"{classes[kind]}{{{count}}}" for count, kind in parts)
            out[m.group(1)] = (4 + sum(int(count) for count, _ in parts), re.compile(pattern))
    return out


# Letters as ISO 7064's MOD 97-10 reads them: A = 10 ... Z = 35.
_IBAN_LETTERS: Final = str.maketrans({c: str(ord(c) - 55) for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"})


def iban_valid(candidate: str) -> bool:
    """What `stdnum.iban.is_valid(candidate, check_country=False)` answers for an upper-case
    candidate of its country's length without separators, in ~2 µs instead of ~19: stdnum finds the
    country in its registry by a prefix-tree walk and converts each character with int(c, 36). The
    same checks: the BBAN's registered format, then the MOD 97-10 checksum."""
    entry = _iban_formats().get(candidate[:2])
    if entry is None or len(candidate) != entry[0] or entry[1].fullmatch(candidate, 4) is None:
        return False
    # The BBAN is ASCII letters and digits by now; the check digits may be any Unicode digit, which
    # int() reads as stdnum's int(c, 36) does, or a letter (translated).
    try:
        return int((candidate[4:] + candidate[:4]).translate(_IBAN_LETTERS)) % 97 == 1
    except ValueError:
        return False


def _iban_at(text: str, start: int, found: list[Finding]) -> int:
    """Where an IBAN-shaped account number starting at `start` (a known country code, exactly that
    country's length) ends, or -1. Only a valid one is an IBAN finding; an invalid one is still an
    account number attempt, whose digits are not to be read as a phone or card number."""
    entry = _iban_formats().get(text[start : start + 2])
    if entry is None or (start > 0 and text[start - 1].isalnum()):
        return -1
    want, n = entry[0], len(text)
    # Exactly the country's length in characters, in groups separated by single spaces or dashes.
    chars = [text[start : start + 4]]
    count, i, end = 4, start + 4, start + 4
    while count < want and i < n:
        c = text[i]
        if c in " -" and i + 1 < n and text[i + 1].isalnum() and text[i - 1].isalnum():
            i += 1
            continue
        if not c.isalnum():
            break
        chars.append(c)
        count += 1
        i += 1
        end = i
    if count != want or (end < n and text[end].isalnum()):
        return -1
    candidate = "".join(chars)
    # The SWIFT length and format and the mod-97 checksum; not the national check digits (many
    # systems' test and generated IBANs carry random ones, and they are no less an account number).
    if candidate.upper() == candidate and iban_valid(candidate):
        found.append(Finding("IBAN", start, end))
    return end


# -- IPv6 -----------------------------------------------------------------------------------------

_IPV6 = re.compile(r"[0-9A-Fa-f:.]+")
_ZONE = re.compile(r"%[A-Za-z0-9_.\-]{1,32}")
_HEX = frozenset("0123456789abcdefABCDEF")


def _ipv6(text: str, found: list[Finding]) -> None:
    """Candidates around each colon that has a hex digit or another colon on both sides (found with
    str.find, so JSON's `"key": value` colons cost almost nothing), parsed by `ipaddress`. A zone
    (`fe80::1%eth0`) belongs to the address; a port after `]:` does not."""
    n = len(text)
    i = text.find(":")
    while i != -1:
        before = text[i - 1] if i > 0 else ""
        after = text[i + 1] if i + 1 < n else ""
        if not ((before in _HEX or before == ":") and (after in _HEX or after == ":")) or (not before and not after):
            i = text.find(":", i + 1)
            continue
        start = i
        while start > 0 and (text[start - 1] in _HEX or text[start - 1] == ":"):
            start -= 1
        m = _IPV6.match(text, start)
        assert m is not None
        end = m.end()
        i = text.find(":", max(end, i + 1))
        # Sentence punctuation after the address: a final "." or a single ":" ("at fe80::1: ...").
        while end > start and text[end - 1] == ".":
            end -= 1
        if end - start >= 2 and text[end - 1] == ":" and text[end - 2] != ":":
            end -= 1
        value = text[start:end]
        if value.count(":") < 2 or (start > 0 and (_GLUE.match(text, start - 1) or text[start - 1] in "_.")):
            continue
        if end < n and (_GLUE.match(text, end) or text[end].isdigit()):
            continue
        zone = _ZONE.match(text, end) if end < n and text[end] == "%" else None
        try:
            ipaddress.IPv6Address(value)
        except ValueError:
            continue
        if _looks_like_code(text, start, end) or not any(c.isdigit() for c in value):
            continue
        found.append(Finding("IP_ADDRESS", start, zone.end() if zone is not None else end))


def _looks_like_code(text: str, start: int, end: int) -> bool:
    """`a::b` between identifiers (C++ / Rust paths, Ruby constants) is not an address."""
    groups = [g for g in text[start:end].split(":") if g]
    return len(groups) <= 2 and end < len(text) and text[end] in "(<;"


# -- SECRET ---------------------------------------------------------------------------------------

# (literal prefix, the whole token from there). Found with str.find (C speed), then matched there.
_SECRET_PATTERNS: Final = (
    ("sk-", r"sk-ant-(?:api|admin|sid)\d{2}-[A-Za-z0-9_\-]{20,}"),  # Anthropic
    ("sk-", r"sk-(?:proj|svcacct|admin|None)-[A-Za-z0-9_\-]{20,}"),  # OpenAI project / service / admin
    ("sk-", r"sk-gw-[A-Za-z0-9_\-]{32}"),  # this gateway's own keys
    ("sk-", r"sk-[A-Za-z0-9]{20,}"),  # OpenAI legacy
    ("sk_", r"sk_(?:live|test)_[A-Za-z0-9]{16,}"),  # Stripe
    ("rk_", r"rk_(?:live|test)_[A-Za-z0-9]{16,}"),
    ("AKIA", r"AKIA[A-Z0-9]{16}"),  # AWS access key ids
    ("ASIA", r"ASIA[A-Z0-9]{16}"),
    ("AGPA", r"AGPA[A-Z0-9]{16}"),
    ("AIDA", r"AIDA[A-Z0-9]{16}"),
    ("AROA", r"AROA[A-Z0-9]{16}"),
    ("ANPA", r"ANPA[A-Z0-9]{16}"),
    ("ghp_", r"ghp_[A-Za-z0-9]{36,255}"),  # GitHub
    ("gho_", r"gho_[A-Za-z0-9]{36,255}"),
    ("ghu_", r"ghu_[A-Za-z0-9]{36,255}"),
    ("ghs_", r"ghs_[A-Za-z0-9]{36,255}"),
    ("ghr_", r"ghr_[A-Za-z0-9]{36,255}"),
    ("github_pat_", r"github_pat_[A-Za-z0-9_]{60,255}"),
    ("xox", r"xox[abposr]-(?:\d-)?\d{6,}-[A-Za-z0-9\-]{8,}"),  # Slack (workspace / user ids, then the secret)
    ("xapp-", r"xapp-\d-[A-Za-z0-9]+-\d+-[A-Za-z0-9]+"),
    ("AIza", r"AIza[0-9A-Za-z_\-]{35}"),  # Google API keys
    ("glpat-", r"glpat-[0-9A-Za-z_\-]{20,}"),  # GitLab personal access tokens
    # JWTs: a JSON header and payload (both start with '{"', i.e. "eyJ"), then the signature.
    ("eyJ", r"eyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]*"),
)
_SECRET_RES: Final = tuple((prefix, re.compile(pattern)) for prefix, pattern in _SECRET_PATTERNS)
# Where one may start: one pass per group of prefixes, each regex starting with a literal so the
# engine skips to it in C (a str.find per prefix was ~20 passes over the text; a regex starting with a
# character class is slower still). Each hit is tried against the patterns of its prefixes, in order.
_SECRET_STARTS: Final = tuple(
    (re.compile(scan), tuple((prefix, pattern) for prefix, pattern in _SECRET_RES if re.match(scan, prefix)))
    for scan in (
        r"sk[-_]",
        r"rk_",
        r"A(?:KIA|SIA|GPA|IDA|ROA|NPA|Iza)",
        r"g(?:h[pousr]_|ithub_pat_|lpat-)",
        r"x(?:ox|app-)",
        r"eyJ",
    )
)
assert sum(len(group) for _, group in _SECRET_STARTS) == len(_SECRET_RES)
_TOKEN_CHAR = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
PEM_BLOCK = re.compile(
    r"-----BEGIN ((?:[A-Z0-9]+ )*)PRIVATE KEY(?: BLOCK)?-----[\s\S]*?-----END \1PRIVATE KEY(?: BLOCK)?-----"
)
_BEARER = re.compile(r"(?i:bearer)[ \t:]+([A-Za-z0-9\-._~+/]{16,}=*)(?![A-Za-z0-9\-._~+/=])")


def _has_entropy(token: str) -> bool:
    """A bearer token is random: many different characters, digits or both cases, not a word or a
    placeholder ("<token>", "xxxxxxxx")."""
    if len(set(token)) < 10:
        return False
    return any(c.isdigit() for c in token) or (any(c.isupper() for c in token) and any(c.islower() for c in token))


def _placeholder_secret(token: str, prefix_end: int) -> bool:
    """`sk-proj-XXXXXXXX…`, `ghp_xxxx…`: the shape of a key with nothing secret in it."""
    return len(set(token[prefix_end:].replace("-", "").replace("_", ""))) <= 3


def _secrets(text: str, found: list[Finding]) -> None:
    n = len(text)
    for scan, group in _SECRET_STARTS:
        for hit in scan.finditer(text):
            i = hit.start()
            if i > 0 and text[i - 1] in _TOKEN_CHAR:
                continue
            for prefix, pattern in group:
                if not text.startswith(prefix, i):
                    continue
                m = pattern.match(text, i)
                if (
                    m is not None
                    and (m.end() == n or text[m.end()] not in _TOKEN_CHAR)
                    and not _placeholder_secret(m.group(), len(prefix) + 4)
                ):
                    found.append(Finding("SECRET", i, m.end()))
                    break
    if "-----BEGIN" in text:
        for m in PEM_BLOCK.finditer(text):
            found.append(Finding("SECRET", m.start(), m.end()))
    # "Bearer", "bearer", "BEARER": one pass per case of the rest of the word.
    for rest in ("earer", "EARER"):
        i = text.find(rest, 1)
        while i != -1:
            if text[i - 1] in "Bb":
                m = _BEARER.match(text, i - 1)
                if m is not None and (i == 1 or not text[i - 2].isalnum()) and _has_entropy(m.group(1)):
                    found.append(Finding("SECRET", m.start(1), m.end(1)))
            i = text.find(rest, i + 5)


# -- the detector ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CustomDetector:
    """A detector from config: `name` (the entity type), a regex, optionally a validator."""

    name: str
    pattern: re.Pattern[str]
    validator: Callable[[str], bool] | None = None

    def scan(self, text: str, found: list[Finding]) -> None:
        for m in self.pattern.finditer(text):
            if m.end() > m.start() and (self.validator is None or self.validator(m.group())):
                found.append(Finding(self.name, m.start(), m.end()))


_HAS_DIGIT = re.compile(r"\d")


class Detector:
    """Built-in types (all, or those named) plus custom detectors."""

    def __init__(self, types: Iterable[str] = ENTITY_TYPES, custom: Iterable[CustomDetector] = ()) -> None:
        self.builtin = frozenset(types) & frozenset(ENTITY_TYPES)
        self.custom = tuple(custom)
        self.types = tuple(t for t in ENTITY_TYPES if t in self.builtin) + tuple(c.name for c in self.custom)

    def find(self, text: str) -> list[Finding]:
        """Entities in `text`, ordered by position, never overlapping."""
        if not text:
            return []
        found: list[Finding] = []
        b = self.builtin
        if "SECRET" in b:
            _secrets(text, found)
        if "EMAIL" in b and "@" in text:
            _emails(text, found)
        if _HAS_DIGIT.search(text) is not None:
            if b & _NUMBER_TYPES:
                _numbers(text, found, b)
            if "IP_ADDRESS" in b and ":" in text:
                _ipv6(text, found)
        for c in self.custom:
            c.scan(text, found)
        if len(found) < 2:
            return found
        found.sort(key=lambda f: f.start)
        if all(a.end <= b.start for a, b in itertools.pairwise(found)):
            return found  # nothing overlaps (the usual case)
        # Most specific first, then longest; keep what does not overlap something kept. Kept spans
        # never overlap, so in start order their ends are in order too: an overlap can only be with
        # the neighbours of where the new one would go. (Comparing each with every kept one was
        # quadratic: a prompt of 8,000 email addresses took 1.8 s of the event loop.)
        found.sort(key=lambda f: (-_PRIORITY.get(f.type, 8), -(f.end - f.start), f.start))
        starts: list[int] = []
        kept: list[Finding] = []
        for f in found:
            i = bisect.bisect_right(starts, f.start)
            if (i == 0 or kept[i - 1].end <= f.start) and (i == len(kept) or f.end <= kept[i].start):
                starts.insert(i, f.start)
                kept.insert(i, f)
        return kept


_NUMBER_TYPES: Final = frozenset(("CREDIT_CARD", "US_SSN", "IP_ADDRESS", "PHONE", "IBAN"))


@functools.cache
def default_detector() -> Detector:
    return Detector()
