"""Deterministic generator of the PII/secret redaction corpus in this folder.

    .venv/bin/python tests/pii_corpus/generate.py           # (re)write the *.jsonl files
    .venv/bin/python tests/pii_corpus/generate.py --check   # exit 1 when the committed files differ

Only the standard library and `random.Random(SEED)` are used, so a run gives the same bytes on any
machine (CPython >= 3.11). Every value is made up: names, domains and companies are fictional,
numbers are random with valid checksums. Before writing, the generator audits its own output: each
labeled span must be valid for its type and no unlabeled part of any text (negatives included) may
contain something one of the types' validators would accept. When the `phonenumbers` package is
importable, every PHONE value is also checked to be a valid number of its country and every
unlabeled part of every text is scanned for phone numbers (US, GB, DE, FR, IN, ES, JP, CN).
See README.md for the format and the labeling rules.
"""

# ruff: noqa: RUF001
# (the multilingual templates use full-width and Devanagari punctuation on purpose)

from __future__ import annotations

import argparse
import base64
import binascii
import collections
import datetime as dt
import importlib
import ipaddress
import itertools
import json
import random
import re
import string
import sys
import unicodedata
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SEED = 20240611
HERE = Path(__file__).resolve().parent
TYPES = ("EMAIL", "PHONE", "CREDIT_CARD", "IBAN", "US_SSN", "IP_ADDRESS", "SECRET")
KINDS = ("sentence", "code", "log", "json", "chat", "email", "csv", "markdown")
POSITIVES_PER_TYPE = 420
NEGATIVES = 1500

ALNUM = string.ascii_letters + string.digits
UPPER_ALNUM = string.ascii_uppercase + string.digits
B64URL = ALNUM + "-_"
HEX = "0123456789abcdef"
BASE32 = string.ascii_uppercase + "234567"


# --------------------------------------------------------------------------------------------
# Checksums and validators (also used by the audit)
# --------------------------------------------------------------------------------------------


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def luhn_complete(partial: str) -> str:
    """Append the check digit that makes `partial` Luhn-valid."""
    for d in "0123456789":
        if luhn_ok(partial + d):
            return partial + d
    raise AssertionError("unreachable")


def card_brand(digits: str) -> str | None:
    """The brand whose prefix and length `digits` has, or None."""
    n = len(digits)
    p2, p3, p4 = int(digits[:2]), int(digits[:3]), int(digits[:4])
    if digits[0] == "4" and n in (13, 16, 19):
        return "Visa"
    if (51 <= p2 <= 55 or 2221 <= p4 <= 2720) and n == 16:
        return "Mastercard"
    if p2 in (34, 37) and n == 15:
        return "Amex"
    if (p4 == 6011 or 644 <= p3 <= 649 or p2 == 65) and n in (16, 19):
        return "Discover"
    if (300 <= p3 <= 305 or p2 in (36, 38, 39) or p4 == 3095) and n in (14, 16):
        return "Diners Club"
    if 3528 <= p4 <= 3589 and 16 <= n <= 19:
        return "JCB"
    if p2 == 62 and 16 <= n <= 19:
        return "UnionPay"
    if p4 in (5018, 5020, 5038, 5893, 6304, 6759, 6761, 6762, 6763) and 12 <= n <= 19:
        return "Maestro"
    return None


# Country -> BBAN structure (SWIFT IBAN registry): n digits, a upper-case letters, c alphanumerics.
IBAN_BBAN: dict[str, str] = {
    "AD": "4n4n12c", "AE": "3n16n", "AT": "5n11n", "BE": "3n7n2n", "BG": "4a4n2n8c", "BR": "8n5n10n1a1c",
    "CH": "5n12c", "CY": "3n5n16c", "CZ": "4n6n10n", "DE": "8n10n", "DK": "4n9n1n", "EE": "2n2n11n1n",
    "ES": "4n4n1n1n10n", "FI": "3n11n", "FR": "5n5n11c2n", "GB": "4a6n8n", "GR": "3n4n16c", "HR": "7n10n",
    "HU": "3n4n1n15n1n", "IE": "4a6n8n", "IL": "3n3n13n", "IS": "4n2n6n10n", "IT": "1a5n5n12c", "KW": "4a22c",
    "KZ": "3n13c", "LI": "5n12c", "LT": "5n11n", "LU": "3n13c", "LV": "4a13c", "MC": "5n5n11c2n",
    "MT": "4a5n18c", "MU": "4a2n2n12n3n3a", "NL": "4a10n", "NO": "4n6n1n", "PL": "8n16n", "PT": "4n4n11n2n",
    "QA": "4a21c", "RO": "4a16c", "SA": "2n18c", "SE": "3n16n1n", "SI": "5n8n2n", "SK": "4n6n10n",
    "TR": "5n1n16c", "UA": "6n19c",
}  # fmt: skip
IBAN_LENGTH: dict[str, int] = {
    "AD": 24, "AE": 23, "AT": 20, "BE": 16, "BG": 22, "BR": 29, "CH": 21, "CY": 28, "CZ": 24, "DE": 22,
    "DK": 18, "EE": 20, "ES": 24, "FI": 18, "FR": 27, "GB": 22, "GR": 27, "HR": 21, "HU": 28, "IE": 22,
    "IL": 23, "IS": 26, "IT": 27, "KW": 30, "KZ": 20, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "MC": 27,
    "MT": 31, "MU": 30, "NL": 18, "NO": 15, "PL": 28, "PT": 25, "QA": 29, "RO": 24, "SA": 24, "SE": 24,
    "SI": 19, "SK": 24, "TR": 26, "UA": 29,
}  # fmt: skip


def iban_mod97(compact: str) -> int:
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(ch, 36)) for ch in rearranged)) % 97


def iban_ok(text: str) -> bool:
    compact = text.replace(" ", "").upper()
    if not re.fullmatch(r"[A-Z]{2}\d{2}[A-Z0-9]+", compact):
        return False
    return IBAN_LENGTH.get(compact[:2]) == len(compact) and iban_mod97(compact) == 1


def ssn_ok(text: str) -> bool:
    m = re.fullmatch(r"(\d{3})([- ]?)(\d{2})\2(\d{4})", text)
    if not m:
        return False
    area, group, serial = int(m.group(1)), int(m.group(3)), int(m.group(4))
    return area not in (0, 666) and area < 900 and group != 0 and serial != 0


def ip_ok(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


EMAIL_RE = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+")
REAL_TLDS = [
    "com", "net", "org", "edu", "gov", "io", "ai", "dev", "app", "co", "us", "uk", "de", "fr", "es", "it", "nl", "be",
    "ch", "at", "se", "no", "dk", "fi", "pl", "pt", "ie", "jp", "cn", "in", "br", "au", "mx", "ca", "nz", "za", "sg",
    "kr", "tw", "hk", "ru", "ua", "cz", "sk", "hu", "ro", "gr", "tr", "il", "ae", "sa", "eu", "info", "biz", "xyz",
    "tech", "cloud", "systems", "bank", "shop", "site", "online", "email", "me", "tv", "cc", "ly", "gg", "lu", "mc",
    "is", "lt", "lv", "ee", "hr", "si", "bg", "cy", "mt",
]  # fmt: skip


def email_ok(text: str) -> bool:
    if text.count("@") != 1 or not EMAIL_RE.fullmatch(text):
        return False
    domain = text.split("@")[1]
    return "." in domain and domain.rsplit(".", 1)[1].lower() in REAL_TLDS


# --------------------------------------------------------------------------------------------
# Fictional filler data
# --------------------------------------------------------------------------------------------

FIRST = [
    "James", "Mary", "Liam", "Olivia", "Noah", "Emma", "Sofia", "Mateo", "Lucas", "Chloe", "Hannah", "Lukas", "Anna",
    "Felix", "Lea", "Jonas", "Camille", "Louis", "Manon", "Hugo", "Lucía", "Martina", "Pablo", "Alejandro",
    "Valentina", "Aarav", "Priya", "Rohan", "Ananya", "Vikram", "Diya", "Yuki", "Haruto", "Sakura", "Ren", "Wei",
    "Mei", "Jun", "Fatima", "Omar", "Aisha", "Yusuf", "Zainab", "Kwame", "Amara", "Chidi", "Ngozi", "Sven", "Ingrid",
    "Astrid", "Mikko", "Aino", "Giulia", "Marco", "Chiara", "João", "Ana", "Pedro", "Beatriz", "Olga", "Dmitri",
    "Katarzyna", "Piotr", "Tomás", "Siobhan", "Declan", "Isabelle", "Noor", "Kenji", "Aiko", "Minh", "Linh", "Zoë",
    "Björn", "Søren", "Émile",
]  # fmt: skip
LAST = [
    "Smith", "Johnson", "Garcia", "Miller", "Davis", "Martinez", "Brown", "Wilson", "Anderson", "Taylor", "Thomas",
    "Moore", "Müller", "Schmidt", "Schneider", "Fischer", "Weber", "Meyer", "Wagner", "Becker", "Dubois", "Martin",
    "Bernard", "Petit", "Durand", "Leroy", "Moreau", "Fernández", "López", "González", "Rodríguez", "Sánchez",
    "Pérez", "Sharma", "Patel", "Gupta", "Singh", "Iyer", "Reddy", "Nair", "Tanaka", "Suzuki", "Takahashi",
    "Watanabe", "Sato", "Wang", "Zhang", "Liu", "Chen", "Yang", "Okafor", "Mensah", "Adeyemi", "Nilsson", "Lindqvist",
    "Virtanen", "Rossi", "Russo", "Bianchi", "Silva", "Santos", "Oliveira", "Kowalski", "Nowak", "Novak", "Murphy",
    "Kelly", "Nguyen", "Tran", "Kim", "Park", "Haddad", "Khan", "Øster", "Jäger",
]  # fmt: skip
COMPANIES = [
    "Globex", "Initech", "Acme Corp", "Umbrella", "Hooli", "Contoso", "Fabrikam", "Northwind Traders",
    "Tailspin Toys", "Wayne Enterprises", "Stark Industries", "Cyberdyne", "Soylent", "Wonka Industries",
    "Vandelay Industries", "Pied Piper", "Dunder Mifflin", "Tyrell Corp", "Oscorp", "Aperture Science",
    "Massive Dynamic", "Prestige Worldwide", "Blue Sun", "Monarch Solutions", "Virtucon",
]  # fmt: skip
DOC_DOMAINS = ("example.com", "example.org", "example.net", "mail.example.com", "eu.example.com")
DOMAINS = [
    "globex.com", "initech.io", "acme-corp.com", "umbrella.net", "hooli.xyz", "contoso.com", "fabrikam.de",
    "northwind.co.uk", "tailspintoys.fr", "wayne-ent.com", "starkindustries.ai", "cyberdyne.io", "soylent.co.jp",
    "wonka.es", "vandelay.com", "piedpiper.dev", "dundermifflin.us", "tyrellcorp.cn", "oscorp.in", "aperture.com.br",
    "massive-dynamic.it", "students.stateu.edu", "cs.uni-nord.de", "post.globex.nl", "eu.contoso.com",
    "mail.virtucon.ch", "monarch.com.au", "blue-sun.co.za",
]  # fmt: skip
CITIES = [
    "Berlin", "Paris", "Madrid", "Lisbon", "Rome", "Vienna", "Zurich", "Amsterdam", "Brussels", "Dublin", "London",
    "Manchester", "New York", "San Francisco", "Chicago", "Austin", "Seattle", "Toronto", "Sydney", "Mumbai",
    "Bengaluru", "Tokyo", "Osaka", "Shanghai", "Beijing", "São Paulo", "Mexico City", "Stockholm", "Warsaw",
    "Singapore", "Cape Town", "Dubai",
]  # fmt: skip
PATHS = [
    "/v1/chat/completions", "/v1/messages", "/v1/embeddings", "/v1/models", "/api/v2/orders", "/api/users/me",
    "/healthz", "/login", "/static/app.js", "/favicon.ico", "/api/v1/invoices", "/graphql", "/oauth/token",
    "/metrics", "/admin/settings", "/wp-login.php",
]  # fmt: skip
UAS = (
    "curl/8.5.0",
    "python-requests/2.31.0",
    "OpenAI/Python 1.30.1",
    "Anthropic/Python 0.28.0",
    "Go-http-client/2.0",
    "okhttp/4.12.0",
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.6367.91 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_4) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.4 "
    "Safari/605.1.15",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:125.0) Gecko/20100101 Firefox/125.0",
    "node-fetch/1.0 (+https://github.com/bitinn/node-fetch)",
)
SERVICES = ["auth", "billing", "gateway", "checkout", "notifier", "profile", "search", "payments", "crm", "worker"]
LOGMSGS = [
    "profile updated", "contact saved", "record created", "lookup ok", "sync finished", "webhook delivered",
    "validation failed", "retrying request", "cache miss", "request completed",
]  # fmt: skip
SUBJECTS = [
    "Re: contract renewal", "Invoice overdue", "Your account", "Quick question", "Fwd: onboarding docs",
    "Meeting notes", "Access request", "Re: Re: shipping update", "Payment details", "Welcome aboard",
]  # fmt: skip
PRODUCTS = ["laptop stand", "noise-cancelling headphones", "standing desk", "espresso machine", "mechanical keyboard"]
PACKAGES = ["requests", "numpy", "pandas", "lodash", "react", "express", "django", "flask", "fastapi", "pydantic"]
HOSTS = ["api-gw-1", "web-02", "db-prod-3", "worker-7", "bastion", "edge-lb", "cache-01", "ingest-4"]

MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
WEEKDAYS = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]


def ascii_fold(s: str) -> str:
    out = unicodedata.normalize("NFKD", s.replace("ø", "o").replace("Ø", "O").replace("ß", "ss"))
    return "".join(ch for ch in out if ch in string.ascii_letters)


# --------------------------------------------------------------------------------------------
# Phone numbers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Phone:
    region: str
    nat: str
    intl: str
    e164: str


def _grp(digits: str, sizes: tuple[int, ...], sep: str = " ") -> str:
    out, i = [], 0
    for n in sizes:
        out.append(digits[i : i + n])
        i += n
    assert i == len(digits), (digits, sizes)
    return sep.join(out)


US_NPA = [
    "201", "202", "203", "206", "212", "213", "214", "215", "216", "303", "305", "310", "312", "313", "314", "404",
    "408", "412", "415", "425", "503", "512", "602", "612", "617", "646", "702", "713", "718", "720", "773", "786",
    "801", "816", "858", "917", "919", "925", "949", "971",
]  # fmt: skip
CA_NPA = ["416", "604", "514", "613", "403", "647", "778", "902"]
TOLL_FREE = ["800", "888", "877", "866", "855", "844", "833"]


GB_MOBILE = [
    "40", "41", "42", "43", "44", "47", "48", "49", "51", "53", "54", "55", "57", "71", "72", "73", "74", "77", "90",
    "92", "94", "95", "96", "97", "98", "99",
]  # fmt: skip
FR_PREFIX = [
    "12", "13", "14", "15", "16", "17", "18", "20", "22", "23", "24", "30", "32", "33", "34", "41", "42", "43", "44",
    "45", "47", "48", "49", "50", "51", "53", "55", "56", "60", "61", "62", "64", "65", "66", "67", "68", "73", "74",
    "75", "76", "77", "78",
]  # fmt: skip
AU_LAND = ["20", "21", "22", "29", "30", "31", "32", "38", "39", "70", "73", "74", "75", "87", "88"]
AU_MOBILE = [f"{i:02d}" for i in range(40)]
SG_PREFIX = [
    "61", "62", "63", "64", "65", "81", "82", "83", "84", "85", "86", "87", "88", "89", "90", "91", "92", "93", "94",
    "95", "96", "97", "98",
]  # fmt: skip


class PhoneMaker:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def d(self, n: int, first: str = "0123456789") -> str:
        return self.rng.choice(first) + "".join(self.rng.choice(string.digits) for _ in range(n - 1))

    def pick(self, *opts: str) -> str:
        return self.rng.choice(opts)

    def make(self, region: str) -> Phone:
        return getattr(self, "_" + region)()  # type: ignore[no-any-return]

    def _nanp(self, region: str, npa: str) -> Phone:
        r = self.rng
        if r.random() < 0.18:
            nxx, line = "555", "01" + self.d(2)
        else:
            while True:
                nxx = self.d(3, "23456789")
                if nxx[1:] != "11" and nxx not in {"555", "950", "958", "959"}:
                    break
            line = self.d(4)
        nat = self.pick(f"({npa}) {nxx}-{line}", f"{npa}-{nxx}-{line}", f"{npa}.{nxx}.{line}", f"{npa} {nxx} {line}")
        intl = self.pick(
            f"+1 {npa} {nxx} {line}", f"+1 ({npa}) {nxx}-{line}", f"+1-{npa}-{nxx}-{line}", f"+1 {npa}-{nxx}-{line}"
        )
        return Phone(region, nat, intl, f"+1{npa}{nxx}{line}")

    def _US(self) -> Phone:
        return self._nanp("US", self.rng.choice(US_NPA))

    def _CA(self) -> Phone:
        return self._nanp("CA", self.rng.choice(CA_NPA))

    def _USTF(self) -> Phone:
        npa = self.rng.choice(TOLL_FREE)
        nxx, line = self.d(3, "2345678"), self.d(4)
        nat = self.pick(f"1-{npa}-{nxx}-{line}", f"({npa}) {nxx}-{line}", f"{npa}-{nxx}-{line}")
        return Phone("US", nat, f"+1 {npa} {nxx} {line}", f"+1{npa}{nxx}{line}")

    def _GB(self) -> Phone:
        k = self.rng.randrange(4)
        if k == 0:  # London, Ofcom drama range
            sub = "79460" + self.d(3)
            nat, intl = f"020 {_grp(sub, (4, 4))}", f"+44 20 {_grp(sub, (4, 4))}"
        elif k == 1:
            sub = self.d(1, "378") + self.d(7)
            nat, intl = f"020 {_grp(sub, (4, 4))}", f"+44 20 {_grp(sub, (4, 4))}"
        elif k == 2:  # mobile
            sub = "7" + self.pick(*GB_MOBILE) + self.d(7)
            nat, intl = f"0{_grp(sub, (4, 6))}", f"+44 {_grp(sub, (4, 6))}"
        else:  # Manchester drama range
            sub = "1614960" + self.d(3)
            nat, intl = f"0{_grp(sub, (3, 3, 4))}", f"+44 {_grp(sub, (3, 3, 4))}"
        return Phone("GB", nat, intl, "+44" + intl[4:].replace(" ", ""))

    def _DE(self) -> Phone:
        k = self.rng.randrange(3)
        if k == 0:
            area = self.pick("30", "40", "69", "89")
            sub = self.d(8, "2345679")
        elif k == 1:
            area = self.pick("221", "211", "711", "351")
            sub = self.d(7, "2345679")
        else:
            area = self.pick("151", "152", "157", "160", "162", "170", "171", "172", "175", "176", "177", "178", "179")
            sub = self.d(8 if area != "160" else 7, "123456789")
        nat = self.pick(f"0{area} {sub}", f"0{area}/{sub}", f"(0{area}) {sub}", f"0{area}-{sub}")
        intl = self.pick(f"+49 {area} {sub}", f"+49 (0){area} {sub}", f"+49-{area}-{sub}", f"0049 {area} {sub}")
        return Phone("DE", nat, intl, f"+49{area}{sub}")

    def _FR(self) -> Phone:
        sub = self.pick(*FR_PREFIX) + self.d(7)
        pairs = _grp(sub[1:], (2, 2, 2, 2))
        nat = self.pick(
            f"0{sub[0]} {pairs}", f"0{sub[0]}.{pairs.replace(' ', '.')}", f"0{sub[0]}-{pairs.replace(' ', '-')}"
        )
        intl = self.pick(f"+33 {sub[0]} {pairs}", f"+33 (0){sub[0]} {pairs}", f"+33 {sub[0]}{pairs.replace(' ', '')}")
        return Phone("FR", nat, intl, f"+33{sub}")

    def _ES(self) -> Phone:
        sub = self.pick("91", "93", "95", "96") + self.d(7) if self.rng.random() < 0.5 else "6" + self.d(8)
        nat = self.pick(_grp(sub, (3, 3, 3)), _grp(sub, (3, 2, 2, 2)) if sub[0] == "6" else _grp(sub, (2, 3, 2, 2)))
        return Phone("ES", nat, f"+34 {_grp(sub, (3, 3, 3))}", f"+34{sub}")

    def _IT(self) -> Phone:
        if self.rng.random() < 0.5:
            sub = self.pick("06", "02") + self.d(8, "234589")
            nat, intl = _grp(sub, (2, 4, 4)), "+39 " + _grp(sub, (2, 4, 4))
        else:
            sub = "3" + self.pick("20", "28", "33", "35", "39", "47", "49", "88", "93") + self.d(7)
            nat, intl = _grp(sub, (3, 3, 4)), "+39 " + _grp(sub, (3, 3, 4))
        return Phone("IT", nat, intl, f"+39{sub}")

    def _NL(self) -> Phone:
        if self.rng.random() < 0.5:
            area, sub = self.pick("20", "10", "30", "70"), self.d(7, "2345678")
            nat = self.pick(f"0{area} {_grp(sub, (3, 4))}", f"0{area}-{sub}")
            intl = f"+31 {area} {_grp(sub, (3, 4))}"
        else:
            area, sub = "6", self.d(8, "1234")
            nat = self.pick(f"06-{sub}", f"06 {_grp(sub, (2, 2, 2, 2))}")
            intl = f"+31 6 {sub}"
        return Phone("NL", nat, intl, f"+31{area}{sub}")

    def _CH(self) -> Phone:
        area = self.pick("44", "22", "31", "61", "76", "77", "78", "79")
        sub = self.d(7, "2345678")
        g = _grp(sub, (3, 2, 2))
        return Phone("CH", f"0{area} {g}", f"+41 {area} {g}", f"+41{area}{sub}")

    def _IN(self) -> Phone:
        if self.rng.random() < 0.7:
            sub = self.pick("98", "99", "97", "96", "94", "93", "91", "90", "88", "87", "86", "81", "80", "70", "63")
            sub += self.d(8)
            nat = self.pick(_grp(sub, (5, 5)), "0" + _grp(sub, (5, 5)))
            intl = self.pick(f"+91 {_grp(sub, (5, 5))}", f"+91-{_grp(sub, (5, 5), '-')}", f"+91 {sub}")
        else:
            area = self.pick("22", "11", "80", "44")
            sub = area + self.d(8, "2346")
            nat = f"0{area} {_grp(sub[2:], (4, 4))}"
            intl = f"+91 {area} {_grp(sub[2:], (4, 4))}"
        return Phone("IN", nat, intl, f"+91{sub}")

    def _JP(self) -> Phone:
        if self.rng.random() < 0.5:
            area, a, b = self.pick("3", "6"), self.d(4, "23456789"), self.d(4)
        else:
            area, a, b = self.pick("90", "80", "70"), self.d(4, "123456789"), self.d(4)
        nat = f"0{area}-{a}-{b}"
        intl = self.pick(f"+81 {area}-{a}-{b}", f"+81 {area} {a} {b}")
        return Phone("JP", nat, intl, f"+81{area}{a}{b}")

    def _CN(self) -> Phone:
        if self.rng.random() < 0.6:
            sub = self.pick("138", "139", "136", "135", "150", "151", "158", "186", "187", "188", "177", "199")
            sub += self.d(8)
            nat = self.pick(_grp(sub, (3, 4, 4)), _grp(sub, (3, 4, 4), "-"), sub)
            intl = self.pick("+86 " + _grp(sub, (3, 4, 4)), "+86 " + sub)
        else:
            area = self.pick("10", "21")
            sub = area + self.d(8, "234567")
            nat = self.pick(f"0{area}-{sub[2:]}", f"0{area} {_grp(sub[2:], (4, 4))}")
            intl = f"+86 {area} {_grp(sub[2:], (4, 4))}"
        return Phone("CN", nat, intl, f"+86{sub}")

    def _BR(self) -> Phone:
        area = self.pick("11", "21", "31", "41", "51", "61", "71", "81")
        if self.rng.random() < 0.6:
            sub = "9" + self.d(8, "6789")
            a, b = sub[:5], sub[5:]
        else:
            sub = self.d(8, "2345")
            a, b = sub[:4], sub[4:]
        nat = f"({area}) {a}-{b}"
        intl = self.pick(f"+55 {area} {a}-{b}", f"+55 ({area}) {a}-{b}", f"+55 {area} {a} {b}")
        return Phone("BR", nat, intl, f"+55{area}{sub}")

    def _AU(self) -> Phone:
        if self.rng.random() < 0.5:
            pre = self.pick(*AU_LAND)
            area, sub = pre[0], pre[1] + self.d(7)
            nat = self.pick(f"(0{area}) {_grp(sub, (4, 4))}", f"0{area} {_grp(sub, (4, 4))}")
            intl = f"+61 {area} {_grp(sub, (4, 4))}"
            full = area + sub
        else:
            full = "4" + self.pick(*AU_MOBILE) + self.d(6)
            nat, intl = "0" + _grp(full, (3, 3, 3)), "+61 " + _grp(full, (3, 3, 3))
        return Phone("AU", nat, intl, f"+61{full}")

    def _MX(self) -> Phone:
        sub = self.pick("55", "33", "81") + self.d(8, "123456789")
        g = _grp(sub, (2, 4, 4))
        return Phone("MX", g, f"+52 {g}", f"+52{sub}")

    def _SE(self) -> Phone:
        if self.rng.random() < 0.5:
            sub = self.d(7, "123456789")
            nat, intl = f"08-{_grp(sub, (3, 2, 2))}", f"+46 8 {_grp(sub, (3, 2, 2))}"
            full = "8" + sub
        else:
            full = self.pick("70", "72", "73", "76") + self.d(7)
            nat, intl = f"0{full[:2]}-{_grp(full[2:], (3, 2, 2))}", f"+46 {full[:2]} {_grp(full[2:], (3, 2, 2))}"
        return Phone("SE", nat, intl, f"+46{full}")

    def _PL(self) -> Phone:
        if self.rng.random() < 0.5:
            full = "22" + self.d(7, "2345678")
            g = _grp(full, (2, 3, 2, 2))
        else:
            full = self.pick("50", "51", "53", "57", "60", "66", "69", "72", "73", "78", "79", "88") + self.d(7)
            g = _grp(full, (3, 3, 3))
        return Phone("PL", g, f"+48 {g}", f"+48{full}")

    def _IE(self) -> Phone:
        if self.rng.random() < 0.5:
            sub = self.d(7, "2345678")
            nat, intl, full = f"(01) {_grp(sub, (3, 4))}", f"+353 1 {_grp(sub, (3, 4))}", "1" + sub
        else:
            full = self.pick("83", "85", "86", "87", "89") + self.d(7, "2345678")
            nat, intl = f"0{full[:2]} {_grp(full[2:], (3, 4))}", f"+353 {full[:2]} {_grp(full[2:], (3, 4))}"
        return Phone("IE", nat, intl, f"+353{full}")

    def _SG(self) -> Phone:
        full = self.pick(*SG_PREFIX) + self.d(6)
        g = _grp(full, (4, 4))
        return Phone("SG", g, f"+65 {g}", f"+65{full}")

    def _ZA(self) -> Phone:
        area = self.pick("21", "11", "31", "82", "83", "72", "76")
        sub = self.d(7, "2345678")
        g = _grp(sub, (3, 4))
        return Phone("ZA", f"0{area} {g}", f"+27 {area} {g}", f"+27{area}{sub}")

    def _AE(self) -> Phone:
        if self.rng.random() < 0.5:
            full = self.pick("2", "4") + self.d(7, "2345678")
            intl, nat = f"+971 {full[0]} {_grp(full[1:], (3, 4))}", f"0{full[0]} {_grp(full[1:], (3, 4))}"
        else:
            full = self.pick("50", "52", "55", "56") + self.d(7)
            intl, nat = f"+971 {full[:2]} {_grp(full[2:], (3, 4))}", f"0{full[:2]} {_grp(full[2:], (3, 4))}"
        return Phone("AE", nat, intl, f"+971{full}")


PHONE_REGIONS = [
    "US", "CA", "GB", "DE", "FR", "ES", "IT", "NL", "CH", "IN", "JP", "CN", "BR", "AU", "MX", "SE", "PL", "IE", "SG",
    "ZA", "AE",
]  # fmt: skip


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


@dataclass
class Span:
    type: str
    start: int
    end: int
    region: str | None = None  # PHONE only: the country it was made for (audit; not written)


@dataclass
class Record:
    id: str
    text: str
    entities: list[Span]
    kind: str

    def to_json(self) -> str:
        ents = [{"type": s.type, "start": s.start, "end": s.end} for s in sorted(self.entities, key=lambda s: s.start)]
        obj = {"id": self.id, "text": self.text, "entities": ents, "kind": self.kind}
        return json.dumps(obj, ensure_ascii=False)


@dataclass
class Value:
    text: str
    type: str | None  # None: filler, not an entity
    meta: str = ""
    region: str | None = None


# --------------------------------------------------------------------------------------------
# Value generators
# --------------------------------------------------------------------------------------------

PEM_DER_PREFIX: dict[str, list[tuple[str, int]]] = {
    # label -> (DER prefix in hex, total DER length): a real key's header bytes, random remainder.
    "RSA PRIVATE KEY": [("308204a40201000282010100", 1192), ("3082025d02010002818100", 609)],
    "PRIVATE KEY": [
        ("308204be020100300d06092a864886f70d0101010500048204a8308204a40201000282010100", 1218),
        ("308187020100301306072a8648ce3d020106082a8648ce3d030107046d306b0201010420", 138),
        ("302e020100300506032b657004220420", 48),
    ],
    "EC PRIVATE KEY": [("307702010104", 121)],
    "ENCRYPTED PRIVATE KEY": [("30820516304006092a864886f70d01050d3033301b06092a864886f70d01050c", 1306)],
    "OPENSSH PRIVATE KEY": [
        (
            b"openssh-key-v1\x00\x00\x00\x00\x04none\x00\x00\x00\x04none\x00\x00\x00\x00\x00\x00\x00\x01"
            b"\x00\x00\x00\x33\x00\x00\x00\x0bssh-ed25519\x00\x00\x00\x20".hex(),
            399,
        )
    ],
}

BEARER_CONTEXT_KEYS = ("access_token", "token", "auth_token")
SECRET_KEYS: dict[str, tuple[str, ...]] = {
    "openai": ("openai_api_key", "openai_key", "api_key"),
    "anthropic": ("anthropic_api_key", "anthropic_key", "claude_api_key"),
    "aws": ("aws_access_key_id", "access_key_id", "aws_key_id"),
    "github": ("github_token", "gh_token", "git_token"),
    "slack": ("slack_bot_token", "slack_token", "slack_app_token"),
    "jwt": ("id_token", "access_token", "jwt"),
    "bearer": BEARER_CONTEXT_KEYS,
}
SECRET_LABELS: dict[str, tuple[str, ...]] = {
    "openai": ("OpenAI key", "OpenAI API key", "API key"),
    "anthropic": ("Anthropic API key", "Claude API key", "API key"),
    "aws": ("AWS access key ID", "Access key ID", "AWS key"),
    "github": ("GitHub token", "GitHub PAT", "Personal access token"),
    "slack": ("Slack token", "Slack bot token", "Bot token"),
    "jwt": ("ID token", "Access token", "JWT"),
    "bearer": ("Access token", "Bearer token", "Token"),
}
TYPE_KEYS: dict[str, tuple[str, ...]] = {
    "EMAIL": ("email", "contact_email", "user_email", "billing_email", "reply_to", "owner_email"),
    "PHONE": ("phone", "mobile", "phone_number", "contact_phone", "tel", "emergency_phone"),
    "CREDIT_CARD": ("card_number", "pan", "cc_number", "payment_card", "card_no"),
    "IBAN": ("iban", "account_iban", "payout_iban", "bank_iban", "debtor_iban"),
    "US_SSN": ("ssn", "social_security_number", "applicant_ssn", "ssn_number", "tin_ssn"),
    "IP_ADDRESS": ("ip", "client_ip", "remote_addr", "source_ip", "host_ip", "peer_addr"),
}
TYPE_LABELS: dict[str, tuple[str, ...]] = {
    "EMAIL": ("Email", "E-mail", "Email address", "Contact email"),
    "PHONE": ("Phone", "Mobile", "Tel.", "Phone number"),
    "CREDIT_CARD": ("Card number", "Credit card", "Card", "PAN"),
    "IBAN": ("IBAN", "Account (IBAN)", "Bank account IBAN"),
    "US_SSN": ("SSN", "Social Security No.", "SSN (US)", "Social security number"),
    "IP_ADDRESS": ("IP", "IP address", "Client IP", "Source IP"),
}

TEST_CARDS = [
    "4242424242424242", "4111111111111111", "4000056655665556", "5555555555554444", "2223003122003222",
    "5105105105105100", "378282246310005", "371449635398431", "6011111111111117", "6011000990139424",
    "3056930009020004", "36227206271667", "3566002020360505", "6200000000000005", "6759649826438453",
]  # fmt: skip


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _base62(n: int, width: int) -> str:
    out = ""
    while n:
        n, r = divmod(n, 62)
        out = (string.digits + string.ascii_letters)[r] + out
    return out.rjust(width, "0")


class Gen:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.phones = PhoneMaker(self.rng)
        self.last: dict[str, Value] = {}
        self.last_phone: Phone | None = None
        self.main_type: str | None = None
        self.main_meta = ""
        self.doc_key: str | None = None
        self.doc_label: str | None = None
        self.base_time = dt.datetime(2024, 1, 8, 7, 0, 0, tzinfo=dt.UTC)

    # small helpers ------------------------------------------------------------------------
    def r(self, alphabet: str, n: int) -> str:
        return "".join(self.rng.choice(alphabet) for _ in range(n))

    def pick(self, seq: tuple[str, ...] | list[str]) -> str:
        return self.rng.choice(seq)

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def rbytes(self, n: int) -> bytes:
        return bytes(self.rng.randrange(256) for _ in range(n))

    def when(self) -> dt.datetime:
        return self.base_time + dt.timedelta(seconds=self.rng.randrange(0, 400 * 86400))

    # entities -----------------------------------------------------------------------------
    def email(self, var: str) -> Value:
        first, last = ascii_fold(self.pick(FIRST)).lower(), ascii_fold(self.pick(LAST)).lower()
        if var == "sa":
            proj = self.pick(("globex-prod", "initech-ml", "acme-data-431", "hooli-ci"))
            user = self.pick(("deployer", "ci-runner", "etl", "vertex-sa"))
            return Value(f"{user}@{proj}.iam.gserviceaccount.com", "EMAIL")
        r = self.rng
        tag = self.pick(("news", "billing", "shop", "test", "github"))
        role = self.pick(("info", "support", "billing", "noreply", "jobs", "privacy", "sales", "hello", "security"))
        local = self.pick([
            f"{first}.{last}", f"{first}{last}", f"{first[0]}.{last}", f"{first}_{last}", f"{first}-{last}",
            f"{first}+{tag}", f"{first}.{last}{r.randrange(1, 99)}", f"{last}{first[0]}",
            f"{first}{r.randrange(1970, 2006)}", f"{first[0]}{last[0]}{r.randrange(10, 999)}", role,
            f"{first}.{last}", f"{last}.{first}", f"{first}",
        ])  # fmt: skip
        doc = var == "doc" or (var != "org" and self.chance(0.35))
        domain = self.pick(DOC_DOMAINS) if doc else self.pick(DOMAINS)
        addr = f"{local}@{domain}"
        if self.chance(0.07):
            addr = f"{local.title()}@{domain.title()}"
        return Value(addr, "EMAIL")

    def phone(self, var: str) -> Value:
        region, style, last = "", "", False
        for tok in var.split("_") if var else []:
            if tok in ("nat", "intl", "e164", "any"):
                style = tok
            elif tok == "last":
                last = True
            elif tok:
                region = tok
        if last:
            assert self.last_phone is not None
            ph = self.last_phone
            return Value(getattr(ph, style or "nat"), "PHONE", ph.region, ph.region)
        if not region:
            region = "US" if self.chance(0.35) else self.pick(PHONE_REGIONS)
        ph = self.phones.make(region)
        self.last_phone = ph
        if not style:
            # Without a country named by the context only NANP numbers may be written nationally.
            nanp = region in ("US", "CA", "USTF")
            style = self.pick(("nat", "nat", "intl", "e164")) if nanp else self.pick(("intl", "intl", "e164"))
        elif style == "any":
            style = self.pick(("nat", "intl", "intl", "e164"))
        return Value(getattr(ph, style), "PHONE", ph.region, ph.region)

    def card(self, var: str) -> Value:
        opts = set(var.split("_"))
        if "test" in opts or self.chance(0.04):
            digits = self.pick(TEST_CARDS)
        else:
            brand = self.pick(
                ("visa",) * 5 + ("mc",) * 4 + ("amex", "amex", "discover", "diners", "jcb", "unionpay", "maestro")
            )
            r = self.rng
            if brand == "visa":
                prefix, n = "4", self.pick(("16",) * 8 + ("13", "19"))
            elif brand == "mc":
                prefix, n = (str(r.randint(51, 55)) if self.chance(0.6) else str(r.randint(2221, 2720))), "16"
            elif brand == "amex":
                prefix, n = self.pick(("34", "37")), "15"
            elif brand == "discover":
                prefix, n = self.pick(("6011", "65", str(r.randint(644, 649)))), "16"
            elif brand == "diners":
                prefix, n = self.pick(("36", "38", str(r.randint(300, 305)))), "14"
            elif brand == "jcb":
                prefix, n = str(r.randint(3528, 3589)), "16"
            elif brand == "unionpay":
                prefix, n = self.pick(("6212", "6222", "6228", "6259", "6270", "6282")), self.pick(("16", "16", "19"))
            else:
                prefix, n = (
                    self.pick(("5018", "5020", "5038", "6304", "6759", "6761", "6762", "6763")),
                    self.pick(("16", "19")),
                )
            digits = luhn_complete(prefix + self.r(string.digits, int(n) - len(prefix) - 1))
        assert luhn_ok(digits) and card_brand(digits), digits
        brand_name = card_brand(digits) or ""
        fmts = sorted(opts & {"compact", "space", "dash"})
        fmt = fmts[0] if fmts else self.pick(("space", "space", "compact", "dash"))
        if fmt != "compact":
            sep = " " if fmt == "space" else "-"
            sizes = {13: (4, 4, 5), 14: (4, 6, 4), 15: (4, 6, 5), 16: (4, 4, 4, 4), 19: (4, 4, 4, 4, 3)}[len(digits)]
            return Value(_grp(digits, sizes, sep), "CREDIT_CARD", brand_name)
        return Value(digits, "CREDIT_CARD", brand_name)

    def iban_compact(self, country: str) -> str:
        bban = ""
        for count, cls in re.findall(r"(\d+)([nac])", IBAN_BBAN[country]):
            if cls == "c":  # alphanumeric fields: mostly digits, as real account numbers are
                field = list(self.r(string.digits, int(count)))
                for _ in range(self.rng.choice((0, 0, 0, 1, 2, 3))):
                    field[self.rng.randrange(len(field))] = self.rng.choice(string.ascii_uppercase)
                bban += "".join(field)
            else:
                bban += self.r(string.digits if cls == "n" else string.ascii_uppercase, int(count))
        check = 98 - iban_mod97(country + "00" + bban)
        compact = f"{country}{check:02d}{bban}"
        assert iban_ok(compact) and len(compact) == IBAN_LENGTH[country], compact
        return compact

    def iban(self, var: str) -> Value:
        country, fmt = "", ""
        for tok in var.split("_") if var else []:
            if tok in ("compact", "grouped"):
                fmt = tok
            elif tok:
                country = tok
        if var == "doc":
            compact = self.pick(("GB82WEST12345698765432", "DE89370400440532013000", "FR1420041010050500013M02606"))
            country = compact[:2]
        else:
            if not country:
                common = ("DE", "DE", "FR", "GB", "ES", "IT", "NL", "BE", "CH", "AT", "IE", "PT", "PL")
                country = self.pick(common) if self.chance(0.6) else self.pick(sorted(IBAN_BBAN))
            compact = self.iban_compact(country)
        fmt = fmt or self.pick(("grouped", "grouped", "compact"))
        text = compact if fmt == "compact" else " ".join(compact[i : i + 4] for i in range(0, len(compact), 4))
        return Value(text, "IBAN", country)

    def ssn(self, var: str) -> Value:
        while True:
            area = self.rng.randint(1, 899)
            if area != 666:
                break
        group, serial = self.rng.randint(1, 99), self.rng.randint(1, 9999)
        fmt = "dash"
        if var == "ctx":
            fmt = self.pick(("dash", "dash", "dash", "space", "bare", "bare"))
        elif var in ("dash", "space", "bare"):
            fmt = var
        sep = {"dash": "-", "space": " ", "bare": ""}[fmt]
        return Value(f"{area:03d}{sep}{group:02d}{sep}{serial:04d}", "US_SSN", fmt)

    def ipv4(self) -> str:
        r = self.rng
        k = r.randrange(10)
        if k < 4:
            while True:
                a = r.randint(1, 223)
                if a not in (10, 127, 169, 172, 192, 100):
                    break
            return f"{a}.{r.randint(0, 255)}.{r.randint(0, 255)}.{r.randint(1, 254)}"
        if k == 4:
            return f"10.{r.randint(0, 255)}.{r.randint(0, 255)}.{r.randint(1, 254)}"
        if k == 5:
            return f"192.168.{r.randint(0, 255)}.{r.randint(1, 254)}"
        if k == 6:
            return f"172.{r.randint(16, 31)}.{r.randint(0, 255)}.{r.randint(1, 254)}"
        if k == 7:
            return f"{self.pick(('192.0.2', '198.51.100', '203.0.113'))}.{r.randint(1, 254)}"
        if k == 8:
            return self.pick(("127.0.0.1", "127.0.0.1", "0.0.0.0", "8.8.8.8", "1.1.1.1", "9.9.9.9"))
        return f"100.{r.randint(64, 127)}.{r.randint(0, 255)}.{r.randint(1, 254)}"

    def ipv6(self, kind: str = "") -> str:
        r = self.rng
        kind = kind or self.pick(
            ("global", "global", "doc", "doc", "ula", "link", "full", "full_upper", "mapped", "loop")
        )
        if kind == "loop":
            return "::1"
        if kind == "mapped":
            return f"::ffff:{self.ipv4()}"
        if kind in ("global", "full", "full_upper"):
            value = (r.randrange(0x2001, 0x2C00) << 112) | r.getrandbits(112)
        elif kind == "doc":
            value = (
                (0x20010DB8 << 96)
                | (r.getrandbits(32) << 64 if self.chance(0.5) else 0)
                | r.getrandbits(16 * r.randint(1, 4))
            )
        elif kind == "ula":
            value = (0xFD << 120) | (r.getrandbits(56) << 64) | r.getrandbits(64 if self.chance(0.5) else 16)
        else:  # link-local
            value = (0xFE80 << 112) | r.getrandbits(64)
        addr = ipaddress.IPv6Address(value)
        if kind == "full":
            return addr.exploded
        if kind == "full_upper":
            return addr.exploded.upper()
        return addr.compressed

    def ip(self, var: str) -> Value:
        if var == "v4" or (not var and self.chance(0.6)):
            return Value(self.ipv4(), "IP_ADDRESS", "v4")
        if var == "v6zone":
            return Value(f"{self.ipv6('link')}%{self.pick(('eth0', 'en0', 'wlan0', 'ens3', '2'))}", "IP_ADDRESS", "v6")
        if var in ("mapped", "loop", "doc", "link", "full", "global"):
            return Value(self.ipv6(var), "IP_ADDRESS", "v6")
        return Value(self.ipv6(), "IP_ADDRESS", "v6")

    # secrets ------------------------------------------------------------------------------
    def github_token(self, prefix: str) -> str:
        body = self.r(ALNUM, 30)
        return f"{prefix}{body}{_base62(binascii.crc32(body.encode()), 6)}"

    def jwt(self) -> str:
        alg = self.pick(("HS256", "RS256", "ES256", "RS256"))
        header: dict[str, Any] = {"alg": alg, "typ": "JWT"}
        if alg != "HS256" and self.chance(0.6):
            header["kid"] = self.r(HEX, 16) if self.chance(0.5) else self.r(B64URL, 27)
        iat = int(self.when().timestamp())
        payload: dict[str, Any] = {
            "iss": self.pick(
                ("https://auth.globex.io/", "https://login.contoso.com/v2", "initech-sso", "https://id.hooli.xyz")
            ),
            "sub": self.pick((self.r(string.digits, 10), "user_" + self.r(ALNUM, 16), self.r(HEX, 24))),
            "aud": self.pick(("api", "gateway", "https://api.globex.io", "web")),
            "iat": iat,
            "exp": iat + int(self.pick(("900", "3600", "86400"))),
        }
        if self.chance(0.5):
            payload["scope"] = self.pick(("read write", "openid profile", "chat:write", "admin"))
        sig = self.rbytes({"HS256": 32, "RS256": 256, "ES256": 64}[alg])
        return ".".join(
            (_b64url(json.dumps(header, separators=(",", ":")).encode()),
             _b64url(json.dumps(payload, separators=(",", ":")).encode()), _b64url(sig))
        )  # fmt: skip

    def pem(self, newline: str = "\n") -> str:
        label = self.pick(("RSA PRIVATE KEY", "PRIVATE KEY", "PRIVATE KEY", "EC PRIVATE KEY", "OPENSSH PRIVATE KEY",
                           "ENCRYPTED PRIVATE KEY"))  # fmt: skip
        prefix_hex, total = self.rng.choice(PEM_DER_PREFIX[label])
        prefix = bytes.fromhex(prefix_hex)
        body = base64.b64encode(prefix + self.rbytes(total - len(prefix))).decode()
        width = 70 if label == "OPENSSH PRIVATE KEY" else 64
        lines = [body[i : i + width] for i in range(0, len(body), width)]
        head = [f"-----BEGIN {label}-----"]
        if label == "RSA PRIVATE KEY" and self.chance(0.2):
            head += ["Proc-Type: 4,ENCRYPTED", f"DEK-Info: AES-128-CBC,{self.r(HEX.upper(), 32)}", ""]
        return newline.join([*head, *lines, f"-----END {label}-----"])

    def bearer_token(self) -> str:
        k = self.rng.randrange(8)
        if k == 0:
            return self.jwt()
        if k == 1:
            return "ya29.a0" + self.r(B64URL, self.rng.randint(120, 180))
        if k == 2:
            return self.r(ALNUM, self.rng.choice((32, 40, 48)))
        if k == 3:
            return self.r(HEX, 64)
        if k == 4:
            return self.r(B64URL, 43)
        if k == 5:
            return "sk-" + self.r(ALNUM, 20) + "T3BlbkFJ" + self.r(ALNUM, 20)
        if k == 6:
            return f"{self.r(ALNUM, 8)}.{self.r(B64URL, 32)}"
        return "pat_" + self.r(ALNUM, 40)

    def secret(self, var: str) -> Value:
        kinds = ("openai", "openai", "anthropic", "aws", "github", "slack", "jwt")
        family = var or self.pick(kinds)
        r = self.rng
        if family == "openai":
            k = r.randrange(4)
            if k == 0:
                text = "sk-" + self.r(ALNUM, 20) + "T3BlbkFJ" + self.r(ALNUM, 20)
            elif k == 1:
                text = "sk-" + self.r(ALNUM, 48)
            elif k == 2:
                text = "sk-proj-" + self.r(B64URL, 74) + "T3BlbkFJ" + self.r(B64URL, 73) + "A"
            else:
                kind = self.pick(("svcacct", "admin", "proj"))
                n = 58 if kind == "admin" else 74
                text = f"sk-{kind}-" + self.r(B64URL, n) + "T3BlbkFJ" + self.r(B64URL, n - 1) + "A"
        elif family == "anthropic":
            kind = "api03" if self.chance(0.85) else "admin01"
            text = f"sk-ant-{kind}-" + self.r(B64URL, 93) + "AA"
        elif family == "aws":
            text = (
                (self.pick(("AKIA", "AKIA", "ASIA")) + self.r(BASE32, 16))
                if self.chance(0.95)
                else "AKIAIOSFODNN7EXAMPLE"
            )
        elif family == "github":
            if self.chance(0.25):
                text = "github_pat_" + self.r(UPPER_ALNUM, 22) + "_" + self.r(ALNUM, 59)
            else:
                text = self.github_token(self.pick(("ghp_", "ghp_", "gho_", "ghu_", "ghs_", "ghr_")))
        elif family == "slack":
            k = r.randrange(4)
            if k == 0:
                text = (
                    f"xoxb-{self.r(string.digits, r.randint(10, 13))}-{self.r(string.digits, 13)}-{self.r(ALNUM, 24)}"
                )
            elif k == 1:
                ids = "-".join(self.r(string.digits, r.randint(10, 13)) for _ in range(3))
                text = f"xoxp-{ids}-{self.r(HEX, 32)}"
            elif k == 2:
                ids = "-".join(self.r(string.digits, r.randint(10, 13)) for _ in range(3))
                text = f"xoxa-2-{ids}-{self.r(HEX, 32)}"
            else:
                text = f"xapp-1-A{self.r(UPPER_ALNUM, 10)}-{self.r(string.digits, 13)}-{self.r(HEX, 64)}"
        elif family == "jwt":
            text = self.jwt()
        elif family == "pem":
            text = self.pem()
        elif family == "pemjson":
            text, family = self.pem("\\n"), "pem"
        elif family == "bearer":
            text = self.bearer_token()
        else:
            raise ValueError(f"unknown secret variant {var!r}")
        return Value(text, "SECRET", family)

    def entity(self, etype: str, var: str) -> Value:
        if var == "same":
            return self.last[etype]
        fn: dict[str, Callable[[str], Value]] = {
            "EMAIL": self.email, "PHONE": self.phone, "CREDIT_CARD": self.card, "IBAN": self.iban,
            "US_SSN": self.ssn, "IP_ADDRESS": self.ip, "SECRET": self.secret,
        }  # fmt: skip
        v = fn[etype](var)
        self.last[etype] = v
        return v

    def compact(self, etype: str) -> Value:
        """A value without inner spaces (URLs, query strings)."""
        var = {"PHONE": "e164", "CREDIT_CARD": "compact", "IBAN": "compact", "US_SSN": "dash", "IP_ADDRESS": "v4"}
        if etype == "SECRET":
            return self.entity("SECRET", self.main_meta if self.main_meta in SECRET_KEYS else "")
        return self.entity(etype, var.get(etype, ""))

    # fillers (never entities) -------------------------------------------------------------
    def key(self, style: str) -> str:
        if self.doc_key is None:
            if self.main_type == "SECRET":
                self.doc_key = self.pick(SECRET_KEYS.get(self.main_meta, ("api_key", "token", "secret")))
            else:
                self.doc_key = self.pick(TYPE_KEYS[self.main_type or "EMAIL"])
        base = self.doc_key
        if style == "env":
            return base.upper()
        if style == "camel":
            head, *rest = base.split("_")
            return head + "".join(w.title() for w in rest)
        if style == "kebab":
            return base.replace("_", "-")
        return base

    def label(self) -> str:
        if self.doc_label is None:
            if self.main_type == "SECRET":
                self.doc_label = self.pick(SECRET_LABELS.get(self.main_meta, ("API key", "Token", "Secret")))
            else:
                self.doc_label = self.pick(TYPE_LABELS[self.main_type or "EMAIL"])
        return self.doc_label

    def bic(self) -> str:
        country = self.last["IBAN"].meta if "IBAN" in self.last else self.pick(("DE", "FR", "GB"))
        return self.r(string.ascii_uppercase, 4) + country + self.r(UPPER_ALNUM, 2) + self.pick(("", "XXX", "500"))

    def filler(self, name: str, var: str) -> str:
        r, t = self.rng, self.when()
        simple: dict[str, Callable[[], str]] = {
            "first": lambda: self.pick(FIRST),
            "last": lambda: self.pick(LAST),
            "name": lambda: f"{self.pick(FIRST)} {self.pick(LAST)}",
            "company": lambda: self.pick(COMPANIES),
            "city": lambda: self.pick(CITIES),
            "date": lambda: t.strftime("%Y-%m-%d"),
            "dmy": lambda: t.strftime("%d.%m.%Y"),
            "mdy": lambda: t.strftime("%m/%d/%Y"),
            "time": lambda: t.strftime("%H:%M:%S"),
            "hm": lambda: t.strftime("%H:%M"),
            "iso": lambda: t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{r.randrange(1000):03d}Z",
            "nginxts": lambda: f"{t.day:02d}/{MONTHS[t.month - 1]}/{t.year}:{t.strftime('%H:%M:%S')} +0000",
            "syslog": lambda: f"{MONTHS[t.month - 1]} {t.day:2d} {t.strftime('%H:%M:%S')}",
            "rfcdate": lambda: (
                f"{WEEKDAYS[t.weekday()]}, {t.day} {MONTHS[t.month - 1]} {t.year} {t.strftime('%H:%M:%S')} +0100"
            ),
            "n": lambda: str(r.randint(2, 9999)),
            "port": lambda: str(r.choice((22, 80, 443, 3000, 5432, 6379, 8080, 8443, 9090, r.randint(30000, 65000)))),
            "pid": lambda: str(r.randint(300, 65000)),
            "uuid": lambda: str(uuid.UUID(int=r.getrandbits(128), version=4)),
            "hex": lambda: self.r(HEX, 8),
            "sha": lambda: self.r(HEX, 40),
            "status": lambda: self.pick(
                ("200", "200", "200", "201", "204", "301", "400", "401", "403", "404", "429", "500")
            ),
            "bytes": lambda: str(r.randint(0, 48000)),
            "secs": lambda: f"{r.random() * 2:.3f}",
            "path": lambda: self.pick(PATHS),
            "method": lambda: self.pick(("GET", "GET", "POST", "PUT", "DELETE")),
            "ua": lambda: self.pick(UAS),
            "svc": lambda: self.pick(SERVICES),
            "logmsg": lambda: self.pick(LOGMSGS),
            "subject": lambda: self.pick(SUBJECTS),
            "order": lambda: "ORD-" + self.r(UPPER_ALNUM, 6),
            "invoice": lambda: f"INV-{t.year}-{r.randint(100, 9999):04d}",
            "amount": lambda: self.pick(("$", "€", "£")) + f"{r.randint(5, 4999)}.{r.randint(0, 99):02d}",
            "pkg": lambda: self.pick(PACKAGES),
            "bic": self.bic,
            "brand": lambda: self.last["CREDIT_CARD"].meta if "CREDIT_CARD" in self.last else "Visa",
            "product": lambda: self.pick(PRODUCTS),
            "host": lambda: self.pick(HOSTS),
            "ticket": lambda: f"#{r.randint(10000, 99999)}",
            "handle": lambda: ascii_fold(self.pick(FIRST)).lower() + self.pick(("", "_dev", "42", ".ops", "-eng")),
            "label": self.label,
            "exp": lambda: f"{r.randint(1, 12):02d}/{r.randint(25, 31)}",
            "cvv": lambda: self.r(string.digits, 3),
            "region": lambda: self.pick(("us-east-1", "eu-west-1", "eu-central-1", "ap-northeast-1")),
        }
        if name == "key":
            return self.key(var)
        return simple[name]()

    # templates ----------------------------------------------------------------------------
    def _main(self, name: str, var: str, ssn_ctx: bool) -> Value:
        assert self.main_type is not None
        if name == "Vc":
            return self.compact(self.main_type)
        if not var and self.main_type == "US_SSN" and ssn_ctx:
            var = "ctx"
        if not var and self.main_type == "SECRET" and self.main_meta in SECRET_KEYS and "SECRET" in self.last:
            var = self.main_meta if self.main_meta != "bearer" else ""
        return self.entity(self.main_type, var)

    def render(self, tpl: str, main: str | None) -> tuple[str, list[Span]]:
        self.main_type, self.main_meta = main, ""
        self.doc_key = self.doc_label = None
        self.last.clear()
        words = SLOT_RE.sub(lambda m: "ssn" if m.group(1) in ("key", "label") else " ", tpl)
        ssn_ctx = bool(re.search(r"ssn|social|seguro|sécurité|社会", words, re.IGNORECASE))
        slots = list(SLOT_RE.finditer(tpl))
        pending: Value | None = None
        first = next((m for m in slots if m.group(1) in ("V", "Vc")), None)
        if main is not None and first is not None:
            pending = self._main(first.group(1), first.group(2) or "", ssn_ctx)
            self.main_meta = pending.meta
        out: list[str] = []
        spans: list[Span] = []
        n, pos = 0, 0
        for m in slots:
            lit = tpl[pos : m.start()]
            out.append(lit)
            n += len(lit)
            pos = m.end()
            name, var = m.group(1), m.group(2) or ""
            if name in ("V", "Vc"):
                if pending is not None:
                    v, pending = pending, None
                else:
                    v = self._main(name, var, ssn_ctx)
            elif name in ENTITY_SLOTS:
                v = self.entity(ENTITY_SLOTS[name], var)
            elif name in NEG_FILLERS:
                v = Value(NEG_FILLERS[name](self), None)
            else:
                v = Value(self.filler(name, var), None)
            if v.type is not None:
                assert main is not None, f"negative template with an entity slot: {tpl!r}"
                spans.append(Span(v.type, n, n + len(v.text), v.region))
            out.append(v.text)
            n += len(v.text)
        out.append(tpl[pos:])
        return "".join(out), spans


SLOT_RE = re.compile(r"\[\[([A-Za-z][A-Za-z0-9]*)(?::([A-Za-z0-9_]+))?\]\]")
ENTITY_SLOTS = {
    "EMAIL": "EMAIL", "PHONE": "PHONE", "CARD": "CREDIT_CARD", "IBAN": "IBAN", "SSN": "US_SSN",
    "IP": "IP_ADDRESS", "SECRET": "SECRET",
}  # fmt: skip


# --------------------------------------------------------------------------------------------
# Positive templates. [[V]] is the file's own type, [[Vc]] the same without inner spaces,
# [[EMAIL]] [[PHONE]] [[CARD]] [[IBAN]] [[SSN]] [[IP]] [[SECRET]] other entities (":variant"
# picks a format), lower-case slots are fillers that are never entities.
# --------------------------------------------------------------------------------------------

Template = tuple[str, str]  # (kind, template)

GENERIC: list[Template] = [
    ("json", '{"id": [[n]], "name": "[[name]]", "[[key]]": "[[V]]", "created_at": "[[iso]]"}'),
    ("json", '{\n  "user": {\n    "id": "[[uuid]]",\n    "[[key]]": "[[V]]",\n    "verified": true\n  }\n}'),
    ("json", '[{"[[key]]": "[[V]]", "primary": true}, {"[[key]]": "[[V]]", "primary": false}]'),
    ("json", '{"event":"[[svc]].updated","data":{"[[key:camel]]":"[[V]]","updatedBy":"[[handle]]"}}'),
    ("json", '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"My [[label]] is [[V]], please update my '
             'profile."}]}'),
    ("json", '{"model": "claude-3-5-sonnet-latest", "max_tokens": 512, "messages": [{"role": "user", '
             '"content": "[[label]]: [[V]]. Can you check whether this is right?"}]}'),
    ("csv", "id,name,[[key]],city\n[[n]],[[name]],[[V]],[[city]]\n[[n]],[[name]],[[V]],[[city]]"),
    ("csv", '"[[name]]","[[V]]","[[date]]","active"'),
    ("csv", "[[key]];name;created\n[[V]];[[name]];[[dmy]]"),
    ("csv", "name,[[key]]\n[[name]],[[V]]\n[[name]],[[V]]\n[[name]],[[V]]"),
    ("markdown", "| Name | [[label]] | Since |\n|------|------|------|\n| [[name]] | [[V]] | [[date]] |\n"
                 "| [[name]] | [[V]] | [[date]] |"),
    ("markdown", "- **[[label]]:** `[[V]]`"),
    ("markdown", "## Contact\n\n* Owner: [[name]]\n* [[label]]: [[V]]\n* Team: [[svc]]"),
    ("code", '[[key]]: "[[V]]"'),
    ("code", "contact:\n  name: [[name]]\n  [[key]]: [[V]]\n  city: [[city]]"),
    ("code", "[[key:env]]=[[Vc]]"),
    ("code", '[[key]] = "[[V]]"'),
    ("code", "config['[[key]]'] = '[[V]]'"),
    ("code", "const [[key:camel]] = '[[V]]';"),
    ("code", "INSERT INTO contacts (name, [[key]]) VALUES ('[[name]]', '[[V]]');"),
    ("code", "<[[key:camel]]>[[V]]</[[key:camel]]>"),
    ("code", 'curl -s "https://app.globex.io/api/lookup?[[key]]=[[Vc]]&limit=10"'),
    ("log", "[[iso]] INFO  [[svc]] [[logmsg]] [[key]]=[[Vc]] request_id=[[uuid]]"),
    ("log", '{"ts":"[[iso]]","level":"info","[[key]]":"[[V]]","msg":"[[logmsg]]"}'),
    ("log", '[[syslog]] [[host]] [[svc]][[[pid]]]: [[logmsg]] for [[key]]="[[V]]"'),
    ("chat", "[[first]]: my [[label]] is [[V]]"),
    ("chat", "[[label]]? sure, it's [[V]]"),
    ("chat", "> [[first]] wrote: can you confirm the [[label]]?\nyes: [[V]]"),
    ("sentence", "[[label]]: [[V]]"),
    ("sentence", "[[V]]"),
    ("sentence", "The [[label]] we have on file is ([[V]])."),
    ("sentence", 'Use "[[V]]" as the [[label]].'),
    ("sentence", "Updated [[label]] for [[name]] → [[V]]"),
    ("email", "From: [[name]] <[[EMAIL]]>\nTo: [[EMAIL]]\nSubject: [[subject]]\n\nHi [[first]],\n\n"
              "[[label]]: [[V]]\n\nThanks,\n[[first]]"),
]  # fmt: skip

SPECIFIC: dict[str, list[Template]] = {}

SPECIFIC["EMAIL"] = [
    ("sentence", "Please send the signed contract to [[V]] by Friday."),
    ("sentence", "[[V]] is the best way to reach me."),
    ("sentence", "You can reach our billing team at [[V]]."),
    ("sentence", "Contact: [[name]] ([[V]])"),
    ("sentence", 'For press inquiries write to "[[V]]"; we answer within two days.'),
    ("sentence", "I forwarded the thread to [[V]], [[EMAIL]] and [[EMAIL]]."),
    ("sentence", "Questions? Email us at <[[V]]>."),
    ("sentence", "[[first]]'s new address is [[V]]"),
    ("sentence", "Unsubscribe by replying to [[V]]!"),
    ("sentence", "My work email is [[V]] and my phone is [[PHONE]]."),
    ("sentence", "Reply-to was set to [[V]]? No, it should be [[EMAIL]]."),
    ("sentence", "Recipients: [[V]];[[EMAIL]];[[EMAIL]]"),
    ("sentence", "The invite went to '[[V]]' instead of '[[EMAIL]]'."),
    ("sentence", "Ask the on-call ([[V]]) before deploying."),
    ("markdown", "- **Maintainer:** [[name]] <[[V]]>"),
    ("markdown", "[Email us](mailto:[[V]]) or open an issue."),
    ("markdown", "[[[V]]](mailto:[[V:same]])"),
    ("markdown", "Security issues: please report privately to **[[V]]**."),
    ("code", 'git config --global user.email "[[V]]"'),
    ("code", "ADMIN_EMAIL=[[V]]"),
    ("code", 'DEFAULT_FROM_EMAIL = "[[V]]"'),
    ("code", "send_mail(subject, body, '[[V]]', ['[[EMAIL]]'])"),
    ("code", 'const recipients = ["[[V]]", "[[EMAIL]]"];'),
    ("code", 'git commit --author="[[name]] <[[V]]>" -m "Fix typo in README"'),
    ("code", "  - name: [[name]]\n    email: [[V]]\n    role: admin"),
    ("code", "commit [[sha]]\nAuthor: [[name]] <[[V]]>\nDate:   [[rfcdate]]\n\n    Fix flaky retry test"),
    ("code", '<a href="mailto:[[V]]?subject=Order%20[[order]]">Contact support</a>'),
    ("code", "SELECT id, name FROM users WHERE email = '[[V]]';"),
    ("code", "curl -X POST https://api.globex.io/v1/invites -H 'Content-Type: application/json' -d "
             "'{\"email\":\"[[V]]\"}'"),
    ("code", "# TODO([[V]]): remove after the migration"),
    ("code", "setup(name='[[pkg]]-utils', version='0.3.1', author_email='[[V]]')"),
    ("code", 'user = User.objects.create(username="[[handle]]", email="[[V]]")'),
    ("log", "[[iso]] INFO  auth: login succeeded user=[[V]] ip=[[IP]]"),
    ("log", "[[syslog]] mx1 postfix/smtp[[[pid]]]: 4F2A1C0B3E: to=<[[V]]>, relay=mx.globex.io[[[IP:v4]]]:25, "
            "delay=0.42, dsn=2.0.0, status=sent (250 2.0.0 OK)"),
    ("log", '{"level":"warn","ts":"[[iso]]","msg":"password reset requested","email":"[[V]]"}'),
    ("log", "WARN [[iso]] bounce for [[V]]: 550 5.1.1 user unknown"),
    ("log", "[[syslog]] mx1 postfix/qmgr[[[pid]]]: 9B1F2A3C4D: from=<[[V]]>, size=[[bytes]], nrcpt=1 (queue active)"),
    ("json", '{"to": "[[V]]", "subject": "Your invoice [[invoice]]", "template": "invoice_v2"}'),
    ("json", '{"messages":[{"role":"user","content":"Write a polite reminder to [[V]] about the overdue invoice"}]}'),
    ("json", '{"customer": {"email": "[[V]]", "phone": "[[PHONE]]", "plan": "pro"}}'),
    ("chat", "[[first]]: hey can you add [[V]] to the channel?"),
    ("chat", "hi, i cant log in, my account is [[V]] pls help"),
    ("chat", "lol just email me at [[V]]"),
    ("chat", "[[[hm]]] <[[handle]]> ping [[V]] about the outage"),
    ("email", "From: [[name]] <[[V]]>\nTo: [[EMAIL]]\nSubject: Re: Q3 forecast\nDate: [[rfcdate]]\n\n"
              "Hi [[first]],\n\nsee attached.\n\nBest,\n[[first]]"),
    ("email", 'From: "[[name]]" <[[V]]>\nReply-To: [[EMAIL]]\nCc: [[EMAIL]], [[EMAIL]]\n'
              "Subject: Invoice [[invoice]]\n\nPlease find the invoice attached."),
    ("email", "On [[rfcdate]], [[name]] <[[V]]> wrote:\n> Can we move the meeting to Thursday?"),
    ("email", "To: [[V]]\nSubject: Your password was changed\n\nIf this wasn't you, contact [[EMAIL]] immediately."),
    ("sentence", "Bitte schicken Sie die Unterlagen an [[V]]."),
    ("sentence", "Bei Fragen erreichen Sie uns unter [[V]] oder telefonisch unter [[PHONE:DE_nat]]."),
    ("sentence", "Merci d'écrire à [[V]] pour toute question."),
    ("sentence", "Mon adresse e-mail : [[V]]"),
    ("chat", "Escríbeme a [[V]], por favor."),
    ("sentence", "Correo: [[V]] | Teléfono: [[PHONE:ES_nat]]"),
    ("sentence", "कृपया अपनी रिपोर्ट [[V]] पर भेजें।"),
    ("chat", "मेरा ईमेल [[V]] है, धन्यवाद।"),
    ("sentence", "ご不明な点は[[V]]までお問い合わせください。"),
    ("sentence", "メールアドレス：[[V]]"),
    ("sentence", "请发送邮件至[[V]]，我们会尽快回复。"),
    ("sentence", "联系邮箱：[[V]]（工作日）"),
]  # fmt: skip

SPECIFIC["PHONE"] = [
    ("sentence", "Call me at [[V]] after 5pm."),
    ("sentence", "[[PHONE:US_nat]] is my cell, text anytime."),
    ("sentence", "Our office number is [[PHONE:US_nat]] (ext. 204)."),
    ("sentence", "The hotline ([[V]]) is open 24/7."),
    ("sentence", "Reach the London front desk on [[PHONE:GB_nat]], or from abroad on [[PHONE:last_intl]]."),
    ("sentence", "Fax: [[V]]"),
    ("sentence", "Emergency contact: [[name]], [[V]]."),
    ("sentence", "If you're in Germany, dial [[PHONE:DE_nat]]; from elsewhere use [[PHONE:last_intl]]."),
    ("sentence", "Toll-free: [[PHONE:USTF_nat]]"),
    ("sentence", "My number changed from [[V]] to [[PHONE]]."),
    ("sentence", "Questions about your order? Call [[PHONE:USTF]] or email [[EMAIL]]."),
    ("sentence", "Please call our Sydney office on [[PHONE:AU_nat]]."),
    ("sentence", "Our Toronto team: [[PHONE:CA_nat]]"),
    ("sentence", "Dial [[PHONE:e164]] for the conference bridge, PIN 4471#."),
    ("sentence", "Call [[PHONE:SG_nat]] (Singapore office) or [[PHONE:IE_nat]] (Dublin office)."),
    ("chat", "call me on [[V]] pls"),
    ("chat", "[[first]]: can u ring [[V]]?"),
    ("chat", "my whatsapp is [[PHONE:e164]]"),
    ("chat", "new number: [[PHONE:US_nat]] - save it!"),
    ("code", "TWILIO_FROM_NUMBER=[[PHONE:e164]]"),
    ("code", 'client.messages.create(to="[[PHONE:e164]]", from_="[[PHONE:US_e164]]", body="Your code is 482913")'),
    ("code", 'phone: "[[V]]"'),
    ("code", '<a href="tel:[[PHONE:e164]]">[[PHONE:last_intl]]</a>'),
    ("code", "const SUPPORT_PHONE = '[[V]]';"),
    ("code", "UPDATE customers SET phone = '[[V]]' WHERE id = [[n]];"),
    ("log", "[[iso]] INFO sms.send to=[[PHONE:e164]] status=queued sid=SM[[sha]]"),
    ("log", "[[iso]] WARN verify: OTP mismatch for [[PHONE:e164]] (attempt 3/5)"),
    ("log", "[[syslog]] pbx asterisk[[[pid]]]: -- Call from [[V]] answered on SIP/1001"),
    ("log", '{"ts":"[[iso]]","event":"call.missed","from":"[[PHONE:e164]]","to":"[[PHONE:e164]]"}'),
    ("json", '{"customer":{"name":"[[name]]","phone":"[[V]]"}}'),
    ("json", '{"contacts": [{"type": "mobile", "value": "[[PHONE:e164]]"}, {"type": "work", "value": '
             '"[[PHONE:intl]]"}]}'),
    ("csv", "name,phone,country\n[[name]],[[PHONE:DE_intl]],DE\n[[name]],[[PHONE:FR_intl]],FR\n"
            "[[name]],[[PHONE:US_nat]],US"),
    ("csv", "[[name]];[[PHONE:FR_nat]];Lyon"),
    ("markdown", "| Office | Phone |\n|---|---|\n| Berlin | [[PHONE:DE_nat]] |\n| Paris | [[PHONE:FR_nat]] |\n"
                 "| Tokyo | [[PHONE:JP_nat]] |"),
    ("markdown", "**Support:** [[PHONE:USTF_nat]] (Mon–Fri)"),
    ("email", "--\n[[name]]\nSenior Account Manager, [[company]]\nT: [[V]] | M: [[PHONE]]\n[[EMAIL]]"),
    ("email", "Subject: Callback request\n\nHi,\n\nplease call me back at [[PHONE:US_nat]] between 9 and 11.\n\n"
              "[[first]]"),
    ("sentence", "Rufen Sie mich bitte unter [[PHONE:DE_nat]] zurück."),
    ("sentence", "Tel.: [[PHONE:DE_intl]], Fax: [[PHONE:DE_intl]]"),
    ("sentence", "Unsere Zentrale in München erreichen Sie unter [[PHONE:DE_nat]]."),
    ("sentence", "Appelez-moi au [[PHONE:FR_nat]] demain matin."),
    ("sentence", "Notre standard : [[PHONE:FR_intl]]"),
    ("chat", "Llámame al [[PHONE:ES_nat]] cuando puedas."),
    ("sentence", "Teléfono de contacto en México: [[PHONE:MX_nat]]"),
    ("sentence", "Il mio numero è [[PHONE:IT_nat]]."),
    ("sentence", "Bel ons kantoor in Amsterdam op [[PHONE:NL_nat]]."),
    ("sentence", "Unser Büro in Zürich: [[PHONE:CH_nat]]"),
    ("sentence", "मुझे [[PHONE:IN_intl]] पर कॉल करें।"),
    ("chat", "मेरा मोबाइल नंबर [[PHONE:IN_nat]] है।"),
    ("sentence", "お電話は[[PHONE:JP_nat]]までお願いします。"),
    ("sentence", "東京本社：[[PHONE:JP_nat]]"),
    ("sentence", "请拨打[[PHONE:CN_nat]]联系我们。"),
    ("sentence", "联系电话：[[PHONE:CN_intl]]"),
    ("sentence", "Ligue para [[PHONE:BR_nat]] em São Paulo."),
    ("sentence", "Ring me on [[PHONE:GB_nat]] when you land in Manchester."),
    ("sentence", "Ring vårt kontor i Stockholm på [[PHONE:SE_nat]]."),
    ("sentence", "Zadzwoń do biura w Warszawie: [[PHONE:PL_nat]]"),
    ("sentence", "Call the Dubai office on [[PHONE:AE_nat]] (UAE) or [[PHONE:ZA_intl]] (Cape Town)."),
]  # fmt: skip

SPECIFIC["CREDIT_CARD"] = [
    ("sentence", "My card number is [[V]], expiry [[exp]], CVV [[cvv]]."),
    ("sentence", "Charge it to [[V]] please"),
    ("sentence", "[[V]] was declined twice today."),
    ("sentence", "Card: [[V]] ([[brand]])"),
    ("sentence", "Payment failed for card [[V]]: insufficient funds."),
    ("sentence", "I used [[V]] for order [[order]] but got charged twice."),
    ("sentence", "Use the test card [[CARD:test]] with any future date and any CVC."),
    ("sentence", "Cards on file: [[V]], [[CARD]]"),
    ("sentence", "Replace the old card ([[V]]) with the new one: [[CARD]]."),
    ("sentence", "Refund the [[amount]] to [[brand]] card [[V]]."),
    ("code", 'card = {"number": "[[Vc]]", "exp_month": 12, "exp_year": 2027, "cvc": "[[cvv]]"}'),
    ("code", 'stripe.PaymentMethod.create(type="card", card={"number": "[[Vc]]", "exp_month": 8, "exp_year": 2026})'),
    ("code", "TEST_CARD_NUMBER=[[CARD:test_compact]]"),
    ("code", "it('accepts a valid card', () => {\n  expect(isValidCard('[[V]]')).toBe(true);\n});"),
    ("code", "assert luhn_ok(\"[[Vc]]\")"),
    ("code", "UPDATE payment_methods SET pan = '[[Vc]]' WHERE customer_id = [[n]];"),
    ("log", "[[iso]] ERROR payment: gateway rejected pan=[[Vc]] reason=do_not_honor"),
    ("log", "DEBUG checkout payload: cardNumber=[[Vc]]&expiry=[[exp]]&holder=[[name]]"),
    ("log", '{"ts":"[[iso]]","level":"error","msg":"charge failed","card":"[[V]]","amount":"[[amount]]"}'),
    ("log", "[[syslog]] [[host]] billing[[[pid]]]: card [[V]] tokenized as tok_[[hex]]"),
    ("json", '{"payment_method": {"type": "card", "card": {"number": "[[V]]", "exp": "[[exp]]"}}}'),
    ("json", '{"messages": [{"role": "user", "content": "Is [[V]] a valid [[brand]] number?"}]}'),
    ("csv", "customer,card,exp\n[[name]],[[V]],[[exp]]\n[[name]],[[V]],[[exp]]"),
    ("markdown", "| Brand | Number | Result |\n|---|---|---|\n| [[brand]] | [[V]] | approved |"),
    ("chat", "here's my card [[V]] exp [[exp]]"),
    ("chat", "[[first]]: can you rerun the charge on [[V]]?"),
    ("chat", "card no [[Vc]] pls dont share lol"),
    ("email", "Subject: Payment details\n\nHi, please charge [[V]] for the renewal.\nExpiry [[exp]].\n\nThanks, "
              "[[first]]"),
    ("email", "From: [[name]] <[[EMAIL]]>\nSubject: Booking [[order]]\n\nGuaranteed with card [[V]] (exp. [[exp]])."),
    ("sentence", "Meine Kreditkartennummer lautet [[V]]."),
    ("sentence", "Numéro de carte : [[V]]"),
    ("chat", "El número de mi tarjeta es [[V]]."),
    ("sentence", "मेरा कार्ड नंबर [[V]] है।"),
    ("sentence", "カード番号：[[V]]"),
    ("sentence", "信用卡号：[[V]]，有效期至2027年"),
    ("sentence", "Il numero della carta è [[V]]."),
]  # fmt: skip

SPECIFIC["IBAN"] = [
    ("sentence", "Please transfer the amount to IBAN [[V]] (BIC [[bic]])."),
    ("sentence", "Bankverbindung: [[name]], IBAN: [[IBAN:DE]], BIC: [[bic]]"),
    ("sentence", "[[V]] is the account for refunds."),
    ("sentence", "Veuillez effectuer le virement sur le compte [[IBAN:FR]]."),
    ("sentence", "Número de cuenta (IBAN): [[IBAN:ES]]"),
    ("sentence", "Coordinate bancarie: IBAN [[IBAN:IT]]"),
    ("sentence", "Rekeningnummer: [[IBAN:NL]]"),
    ("sentence", "Old IBAN [[V]] is closed; please use [[IBAN]] from now on."),
    ("sentence", "Pay the invoice [[invoice]] ([[amount]]) to [[V]]."),
    ("sentence", "The example IBAN [[IBAN:doc]] shows the format."),
    ("sentence", "Überweisung an [[IBAN:DE_grouped]] ist eingegangen."),
    ("sentence", "Virement SEPA reçu de [[IBAN:BE]]."),
    ("sentence", "Il bonifico su [[IBAN:IT_compact]] risulta eseguito."),
    ("sentence", "Konto: [[IBAN:AT]]; Verwendungszweck: [[invoice]]"),
    ("sentence", "Wire to [[IBAN:GB]] (sort code on request)."),
    ("code", "<DbtrAcct><Id><IBAN>[[Vc]]</IBAN></Id></DbtrAcct>"),
    ("code", "<CdtrAcct>\n  <Id>\n    <IBAN>[[Vc]]</IBAN>\n  </Id>\n</CdtrAcct>"),
    ("code", 'assert is_valid_iban("[[V]]")'),
    ("code", "PAYOUT_IBAN=[[Vc]]"),
    ("code", "payout:\n  iban: [[V]]\n  bic: [[bic]]"),
    ("log", "[[iso]] INFO payout.created iban=[[Vc]] amount=[[amount]] currency=EUR"),
    ("log", "[[iso]] WARN sepa: mandate [[hex]] debtor [[V]] returned AC04 (account closed)"),
    ("log", '{"ts":"[[iso]]","level":"info","msg":"refund issued","iban":"[[V]]"}'),
    ("json", '{"beneficiary": {"name": "[[name]]", "iban": "[[V]]", "bic": "[[bic]]"}}'),
    ("json", '{"messages":[{"role":"user","content":"Check this IBAN for me: [[V]]"}]}'),
    ("csv", "name,iban,amount\n[[name]],[[V]],[[amount]]\n[[name]],[[V]],[[amount]]"),
    ("markdown", "| Entity | IBAN |\n|---|---|\n| [[company]] GmbH | [[IBAN:DE]] |\n| [[company]] SAS | [[IBAN:FR]] |"),
    ("chat", "can you send it to [[V]]? thx"),
    ("chat", "[[first]]: iban is [[Vc]]"),
    ("email", "Subject: Bank details\n\nDear [[name]],\n\nour new bank account:\nIBAN: [[V]]\nBIC: [[bic]]\n\n"
              "Kind regards,\n[[company]]"),
    ("email", "From: [[name]] <[[EMAIL]]>\nSubject: Rechnung [[invoice]]\n\nBitte überweisen Sie den Betrag auf "
              "[[IBAN:DE]]."),
    ("sentence", "海外送金先IBAN：[[V]]"),
    ("sentence", "收款账户IBAN：[[V]]"),
    ("sentence", "हमारा IBAN [[V]] है।"),
    ("sentence", "Mi IBAN es [[IBAN:ES]], gracias."),
    ("sentence", "IBAN do beneficiário: [[IBAN:PT]]"),
]  # fmt: skip

SPECIFIC["US_SSN"] = [
    ("sentence", "My SSN is [[V:ctx]]."),
    ("sentence", "SSN: [[V:ctx]]"),
    ("sentence", "The Social Security number [[V:ctx]] on the W-2 doesn't match our records."),
    ("sentence", "Applicant [[name]], DOB [[mdy]], SSN [[V:ctx]]"),
    ("sentence", "[[V]] - that's the social on file for [[name]]."),
    ("sentence", "Her social security number ([[V:ctx]]) was entered twice."),
    ("sentence", "Please verify SSN [[V:ctx]] against the IRS letter."),
    ("sentence", "Employee [[n]] – SSN [[V:ctx]] – hired [[mdy]]"),
    ("sentence", "SSNs received: [[V]], [[SSN]], [[SSN]]."),
    ("sentence", "Last year's return used [[V]] but this year's shows [[SSN]]."),
    ("code", 'ssn = "[[V]]"'),
    ("code", "UPDATE employees SET ssn = '[[V]]' WHERE id = [[n]];"),
    ("code", "assert validate_ssn('[[V]]') is True"),
    ("code", "APPLICANT_SSN=[[V:ctx]]"),
    ("code", "applicant:\n  name: [[name]]\n  ssn: \"[[V:ctx]]\"\n  dob: [[date]]"),
    ("log", "[[iso]] WARN kyc: ssn mismatch input=[[V]] record=[[SSN]]"),
    ("log", '{"ts":"[[iso]]","level":"debug","msg":"credit check","ssn":"[[V:ctx]]","score":712}'),
    ("log", "[[syslog]] [[host]] hr-sync[[[pid]]]: imported employee [[n]] (ssn=[[V:ctx]])"),
    ("json", '{"applicant":{"name":"[[name]]","ssn":"[[V:ctx]]","dob":"[[date]]"}}'),
    ("json", '{"messages":[{"role":"user","content":"Fill the form: name [[name]], SSN [[V:ctx]], phone '
             '[[PHONE:US_nat]]"}]}'),
    ("csv", "employee_id,name,ssn,state\n[[n]],[[name]],[[V:ctx]],CA\n[[n]],[[name]],[[V:ctx]],TX"),
    ("markdown", "| Name | SSN | Status |\n|---|---|---|\n| [[name]] | [[V:ctx]] | verified |"),
    ("chat", "my social is [[V]] do u need anything else"),
    ("chat", "[[first]]: ssn [[V:ctx]] for the background check"),
    ("chat", "ok the SSN is [[V:ctx]]"),
    ("email", "Subject: W-9\n\nName: [[name]]\nTIN (SSN): [[V:ctx]]\nAddress: on file\n\nThanks"),
    ("email", "From: [[name]] <[[EMAIL]]>\nTo: [[EMAIL]]\nSubject: Payroll correction\n\n"
              "My SSN was entered as [[V]] but it is [[SSN]]."),
    ("chat", "Mi número de Seguro Social es [[V:ctx]]."),
    ("sentence", "Numéro de sécurité sociale américain (SSN) : [[V]]"),
    ("sentence", "US-Sozialversicherungsnummer (SSN): [[V]]"),
    ("sentence", "美国社会安全号码（SSN）：[[V:ctx]]"),
    ("sentence", "米国社会保障番号（SSN）：[[V]]"),
    ("sentence", "मेरा SSN [[V:ctx]] है।"),
]  # fmt: skip

SPECIFIC["IP_ADDRESS"] = [
    ("log", '[[IP:v4]] - - [[[nginxts]]] "[[method]] [[path]] HTTP/1.1" [[status]] [[bytes]] "-" "[[ua]]"'),
    ("log", '[[IP:v6]] - - [[[nginxts]]] "POST /v1/chat/completions HTTP/2.0" [[status]] [[bytes]] "-" "[[ua]]"'),
    ("log", '[[V]] - [[handle]] [[[nginxts]]] "GET [[path]] HTTP/1.1" 200 [[bytes]] rt=[[secs]] '
            "upstream=[[IP:v4]]:[[port]]"),
    ("log", "[[syslog]] bastion sshd[[[pid]]]: Accepted publickey for deploy from [[V:v4]] port [[port]] ssh2"),
    ("log", "[[syslog]] bastion sshd[[[pid]]]: Failed password for invalid user admin from [[V]] port [[port]] ssh2"),
    ("log", "[[iso]] ERROR db: connection refused to [[IP:v4]]:5432"),
    ("log", "dial tcp [[[IP:v6]]]:443: connect: network is unreachable"),
    ("log", "[[iso]] INFO server listening on [[IP:v4]]:[[port]]"),
    ("log", "Listening on http://[[[IP:loop]]]:3000"),
    ("log", '{"remote_addr":"[[V]]","method":"POST","path":"/v1/messages","status":429,"ts":"[[iso]]"}'),
    ("log", "[[syslog]] fw kernel: [UFW BLOCK] IN=eth0 OUT= SRC=[[IP:v4]] DST=[[IP:v4]] PROTO=TCP SPT=[[port]] DPT=22"),
    ("log", "[[iso]] WARN ratelimit: client [[IP:mapped]] exceeded 60 req/min"),
    ("log", "[[syslog]] router dhcpd[[[pid]]]: DHCPACK on [[IP:v4]] to [[handle]]-laptop via eth1"),
    ("log", "[[iso]] DEBUG ndp: neighbor [[IP:v6zone]] reachable"),
    ("log", "time=[[iso]] level=info msg=\"accepted connection\" peer=[[IP:v4]]:[[port]] local=[[IP:v4]]:443"),
    ("code", "ping -c 3 [[V:v4]]"),
    ("code", "ssh -i ~/.ssh/id_ed25519 ubuntu@[[V:v4]]"),
    ("code", "database:\n  host: [[V]]\n  port: 5432\n  name: orders"),
    ("code", "REDIS_HOST=[[V:v4]]"),
    ("code", "server {\n    listen 80;\n    allow [[IP:v4]];\n    deny all;\n}"),
    ("code", "iptables -A INPUT -s [[V:v4]] -j DROP"),
    ("code", "const API_BASE = 'http://[[V:v4]]:[[port]]/api';"),
    ("code", "curl -6 'https://[[[IP:v6]]]/healthz'"),
    ("code", "nameserver [[IP:v4]]\nnameserver [[IP:v6]]"),
    ("code", "upstream backend {\n    server [[IP:v4]]:8080;\n    server [[IP:v4]]:8080;\n}"),
    ("code", "X-Forwarded-For: [[V]], [[IP]], [[IP:v4]]"),
    ("json", '{"ip": "[[V]]", "country": "DE", "asn": 3320}'),
    ("json", '{"allowlist": ["[[IP:v4]]", "[[IP:v4]]", "[[IP:v6]]"]}'),
    ("csv", "timestamp,src_ip,dst_ip,bytes\n[[iso]],[[IP:v4]],[[IP:v4]],[[bytes]]\n"
            "[[iso]],[[IP:v6]],[[IP:v6]],[[bytes]]"),
    ("markdown", "| Host | Address |\n|---|---|\n| [[host]] | [[IP:v4]] |\n| [[host]] | [[IP:v6]] |"),
    ("chat", "the server at [[V]] is down again"),
    ("chat", "[[first]]: can you whitelist [[V:v4]]? it's our office"),
    ("sentence", "Block [[V]] at the firewall, it has been scanning us all night."),
    ("sentence", "Our DNS resolvers are [[IP:v4]] and [[IP:v4]]."),
    ("sentence", "The printer is at [[IP:v4]], the NAS at [[IP:v4]]."),
    ("sentence", "Requests from [[IP:full]] were throttled."),
    ("sentence", "The link-local address [[IP:v6zone]] is only valid on that interface."),
    ("email", "Subject: Suspicious login\n\nWe noticed a sign-in from [[V]] on [[rfcdate]].\nIf this wasn't you, "
              "reset your password."),
    ("sentence", "Der Server [[V]] antwortet nicht mehr."),
    ("sentence", "Adresse IP du client : [[V]]"),
    ("sentence", "La IP [[V]] fue bloqueada por el firewall."),
    ("sentence", "サーバー[[V:v4]]に接続できません。"),
    ("sentence", "来自[[V]]的请求被拒绝。"),
    ("sentence", "सर्वर का IP पता [[V]] है।"),
]  # fmt: skip

SPECIFIC["SECRET"] = [
    ("code", "OPENAI_API_KEY=[[SECRET:openai]]"),
    ("code", 'client = OpenAI(api_key="[[SECRET:openai]]")'),
    ("code", 'client = anthropic.Anthropic(api_key="[[SECRET:anthropic]]")'),
    ("code", "export ANTHROPIC_API_KEY=[[SECRET:anthropic]]"),
    ("code", "export AWS_ACCESS_KEY_ID=[[SECRET:aws]]\nexport AWS_DEFAULT_REGION=[[region]]"),
    ("code", "[default]\naws_access_key_id = [[SECRET:aws]]\nregion = [[region]]"),
    ("code", 'curl https://api.openai.com/v1/models -H "Authorization: Bearer [[SECRET:openai]]"'),
    ("code", "curl https://api.anthropic.com/v1/messages -H 'x-api-key: [[SECRET:anthropic]]' "
             "-H 'anthropic-version: 2023-06-01'"),
    ("code", "curl -H 'Authorization: Bearer [[V:bearer]]' https://api.globex.io/v2/orders"),
    ("code", "GET /api/v2/orders HTTP/1.1\nHost: api.globex.io\nAuthorization: Bearer [[V:bearer]]\nAccept: "
             "application/json"),
    ("code", "const slack = new WebClient('[[SECRET:slack]]');"),
    ("code", "stringData:\n  GITHUB_TOKEN: [[SECRET:github]]"),
    ("code", "env:\n  GH_TOKEN: [[SECRET:github]]\n  NODE_ENV: production"),
    ("code", "git clone https://[[SECRET:github]]@github.com/globex/private-repo.git"),
    ("code", "headers = {\"Authorization\": \"Bearer [[V:bearer]]\", \"Content-Type\": \"application/json\"}"),
    ("code", "fetch(url, { headers: { Authorization: `Bearer [[V:bearer]]` } })"),
    ("code", "```bash\nexport OPENAI_API_KEY=[[SECRET:openai]]\n```"),
    ("code", "[[SECRET:pem]]"),
    ("code", "$ cat ~/.ssh/id_ed25519\n[[SECRET:pem]]"),
    ("code", 'SSL_KEY = """\n[[SECRET:pem]]\n"""'),
    ("code", "SLACK_APP_TOKEN=[[SECRET:slack]]\nSLACK_SIGNING_SECRET_FILE=/run/secrets/slack"),
    ("code", "provider \"aws\" {\n  access_key = \"[[SECRET:aws]]\"\n  region     = \"[[region]]\"\n}"),
    ("log", "[[iso]] DEBUG http: > Authorization: Bearer [[V:bearer]]"),
    ("log", "[[iso]] ERROR openai: 401 invalid api key [[SECRET:openai]]"),
    ("log", '{"ts":"[[iso]]","level":"debug","headers":{"authorization":"Bearer '
            '[[V:bearer]]","x-request-id":"[[uuid]]"}}'),
    ("log", "[[syslog]] [[host]] app[[[pid]]]: using AWS key [[SECRET:aws]] for s3://globex-backups"),
    ("log", "[[iso]] WARN github: token [[SECRET:github]] expires in 3 days"),
    ("log", '[[IP:v4]] - - [[[nginxts]]] "GET /callback?access_token=[[SECRET:jwt]] HTTP/1.1" 302 0'),
    ("json", '{"id_token": "[[SECRET:jwt]]", "token_type": "Bearer", "expires_in": 3600}'),
    ("json", '{"type": "service_account", "project_id": "globex-prod", "private_key_id": "[[sha]]", '
             '"private_key": "[[SECRET:pemjson]]\\n", "client_email": "[[EMAIL:sa]]"}'),
    ("json", '{"anthropic": {"api_key": "[[SECRET:anthropic]]"}, "openai": {"api_key": "[[SECRET:openai]]"}}'),
    ("json", '{"messages":[{"role":"user","content":"why does my key [[V]] return 401?"}]}'),
    ("csv", "service,token,owner\nslack,[[SECRET:slack]],[[handle]]\ngithub,[[SECRET:github]],[[handle]]"),
    ("markdown", "| Service | Key |\n|---|---|\n| OpenAI | `[[SECRET:openai]]` |\n| AWS | `[[SECRET:aws]]` |"),
    ("markdown", "> **Note:** the bot token `[[SECRET:slack]]` was revoked on [[date]]."),
    ("chat", "oops i pasted my key [[V]] in the channel, rotating now"),
    ("chat", "[[first]]: here's the staging token [[V]]"),
    ("chat", "this is the key i'm using:\n[[SECRET:pem]]\nwhat's wrong with it?"),
    ("chat", "try with Authorization: Bearer [[V:bearer]]"),
    ("sentence", "The token [[V]] was revoked on [[date]]."),
    ("sentence", "[[V]] leaked in a public gist; rotate it."),
    ("sentence", "Here is the key, don't share it:\n[[SECRET:pem]]\nThanks!"),
    ("email", "Subject: staging credentials\n\nHi [[first]],\n\nAWS: [[SECRET:aws]]\nGitHub: [[SECRET:github]]\n\n"
              "Cheers"),
    ("sentence", "https://app.globex.io/callback#access_token=[[SECRET:jwt]]&token_type=bearer&expires_in=3600"),
    ("chat", "[[first]]: can you check why ssh rejects this?\n```\n[[SECRET:pem]]\n```"),
    ("email", "Subject: server key\n\nInline as requested:\n\n[[SECRET:pem]]\n\nPlease delete this mail after use."),
    ("code", "kubectl create secret tls web --cert=web.crt --key=/dev/stdin <<'EOF'\n[[SECRET:pem]]\nEOF"),
    ("json", '{"host": "[[host]]", "user": "deploy", "ssh_private_key": "[[SECRET:pemjson]]"}'),
    ("log", '[[IP:v4]] - - [[[nginxts]]] "POST /v1/chat/completions HTTP/1.1" 401 [[bytes]] "-" "[[ua]]" '
            'auth="Bearer [[V:bearer]]"'),
    ("code", "http GET https://api.globex.io/v2/me 'Authorization:Bearer [[V:bearer]]'"),
    ("chat", 'the curl works with -H "authorization: bearer [[V:bearer]]" but not from python'),
    ("sentence", "Authorization: Bearer [[V:bearer]]"),
    ("sentence", "Mein API-Schlüssel lautet [[V]], bitte nicht weitergeben."),
    ("sentence", "Voici ma clé API : [[V]]"),
    ("chat", "Mi token de GitHub es [[SECRET:github]]"),
    ("sentence", "APIキー：[[V]]"),
    ("sentence", "这是我的密钥：[[V]]，请勿外传。"),
    ("sentence", "मेरी API कुंजी [[V]] है।"),
]  # fmt: skip


# --------------------------------------------------------------------------------------------
# Hard negatives: look-alikes that are none of the types (README.md, "Negatives")
# --------------------------------------------------------------------------------------------


def _digits(g: Gen, n: int, first: str = "123456789") -> str:
    return g.rng.choice(first) + g.r(string.digits, n - 1)


def _not_card(g: Gen, make: Callable[[], str]) -> str:
    """A digit string that is not a Luhn-valid number with a card brand's prefix and length."""
    while True:
        s = make()
        d = re.sub(r"\D", "", s)
        if not (12 <= len(d) <= 19 and luhn_ok(d) and card_brand(d)):
            return s


def _luhn_fail(g: Gen, n: int, first: str = "123456789") -> str:
    while True:
        s = _digits(g, n, first)
        if not luhn_ok(s):
            return s


def n_order16(g: Gen) -> str:
    return _luhn_fail(g, 16)


def n_cardlike(g: Gen) -> str:
    """Brand-prefixed 16 digits, grouped like a card, failing Luhn."""
    s = _luhn_fail(g, 16, "4556")
    return _grp(s, (4, 4, 4, 4), g.pick((" ", "-")))


def n_ts16(g: Gen) -> str:
    while True:
        s = str(int(g.when().timestamp()) * 1_000_000 + g.rng.randrange(1_000_000))
        if not luhn_ok(s):
            return s


def n_ts13(g: Gen) -> str:
    return _not_card(g, lambda: str(int(g.when().timestamp()) * 1000 + g.rng.randrange(1000)))


def n_epoch(g: Gen) -> str:
    return str(int(g.when().timestamp()))


def n_imei(g: Gen) -> str:
    return luhn_complete(g.pick(("35", "86", "01")) + g.r(string.digits, 12))


def n_ups(g: Gen) -> str:
    return "1Z" + g.r(UPPER_ALNUM, 6) + g.r(string.digits, 10)


def n_usps(g: Gen) -> str:
    return "9400" + g.r(string.digits, 18)


def n_badiban(g: Gen) -> str:
    # no digit run inside that would pass as a card number, as can happen with grouped digits
    return _clean(g, lambda: _badiban(g))


def _clean(g: Gen, make: Callable[[], str]) -> str:
    while True:
        s = make()
        if not any(unlabeled_problems(s)):
            return s


def _badiban(g: Gen) -> str:
    country = g.pick(("DE", "FR", "GB", "ES", "IT", "NL", "BE", "AT", "CH", "PL", "PT", "IE"))
    good = g.iban_compact(country)
    if g.chance(0.5):
        while True:
            bad = good[:2] + f"{g.rng.randint(2, 98):02d}" + good[4:]
            if iban_mod97(bad) != 1:
                break
    else:  # one BBAN digit mistyped: mod 97 catches every single-character error
        i = g.rng.randrange(4, len(good))
        while True:
            ch = g.rng.choice(string.digits if good[i].isdigit() else string.ascii_uppercase)
            bad = good[:i] + ch + good[i + 1 :]
            if ch != good[i] and iban_mod97(bad) != 1:
                break
    return bad if g.chance(0.4) else " ".join(bad[i : i + 4] for i in range(0, len(bad), 4))


def n_bic(g: Gen) -> str:
    return (
        g.r(string.ascii_uppercase, 4)
        + g.pick(("DE", "FR", "GB", "NL", "IT"))
        + g.r(UPPER_ALNUM, 2)
        + g.pick(("", "XXX"))
    )


def n_badssn(g: Gen) -> str:
    r = g.rng
    area, group, serial = r.randint(1, 899), r.randint(1, 99), r.randint(1, 9999)
    k = r.randrange(5)
    if k == 0:
        area = 0
    elif k == 1:
        area = 666
    elif k == 2:
        area, group = r.randint(900, 999), r.randint(1, 49)  # 9xx with group < 50: not an ITIN either
    elif k == 3:
        group = 0
    else:
        serial = 0
    return f"{area:03d}-{group:02d}-{serial:04d}"


def n_nine(g: Gen) -> str:
    return _digits(g, 9, "12345")


def n_vquad(g: Gen) -> str:
    r = g.rng
    return f"v{r.randint(0, 12)}.{r.randint(0, 30)}.{r.randint(0, 30)}.{r.randint(0, 200)}"


def n_winver(g: Gen) -> str:
    return f"10.0.{g.pick(('19041', '19045', '22000', '22621', '22631', '26100'))}.{g.rng.randint(1, 4500)}"


def n_semver(g: Gen) -> str:
    r = g.rng
    base = f"{r.randint(0, 20)}.{r.randint(0, 40)}.{r.randint(0, 30)}"
    return base + g.pick(("", "", "", "-rc.1", "-beta.2", "+build.7", "-alpha"))


def n_badip(g: Gen) -> str:
    r = g.rng
    # one octet above 255, the others short: no 10-digit run that a dotted phone layout could claim
    octs = [r.randint(1, 99), r.randint(0, 99), r.randint(0, 99), r.randint(1, 99)]
    octs[r.randrange(4)] = r.randint(256, 999)
    return ".".join(map(str, octs))


def n_oid(g: Gen) -> str:
    return "1.3.6.1.4.1." + ".".join(str(g.rng.randint(1, 40000 if i == 0 else 30)) for i in range(g.rng.randint(3, 6)))


def n_uuid(g: Gen) -> str:
    return str(uuid.UUID(int=g.rng.getrandbits(128), version=4))


def n_sha(g: Gen) -> str:
    return g.r(HEX, 40)


def n_sha256(g: Gen) -> str:
    return g.r(HEX, 64)


def n_md5(g: Gen) -> str:
    return g.r(HEX, 32)


def n_shortsha(g: Gen) -> str:
    return g.r(HEX, 7)


def n_mac(g: Gen) -> str:
    parts = [g.r("0123456789ABCDEF", 2) for _ in range(6)]
    return (":" if g.chance(0.7) else "-").join(parts) if g.chance(0.5) else ":".join(parts).lower()


def n_float(g: Gen) -> str:
    return g.pick(("3.14159", "2.71828", "1.41421356", "0.5772", "6.022e23", "1.5e-10", "9.81", "299792.458"))


def n_price(g: Gen) -> str:
    r = g.rng
    return g.pick((
        f"${r.randint(1, 9)},{r.randint(100, 999)}.{r.randint(0, 99):02d}",
        f"€ {r.randint(1, 999)},{r.randint(0, 99):02d}",
        f"£{r.randint(1, 99)}.{r.randint(0, 99):02d}", f"¥{r.randint(1, 99)},{r.randint(100, 999)}",
    ))  # fmt: skip


def n_isbn13(g: Gen) -> str:
    def make() -> str:
        body = "978" + g.r(string.digits, 9)
        check = (10 - sum(int(c) * (1 if i % 2 == 0 else 3) for i, c in enumerate(body)) % 10) % 10
        s = body + str(check)
        return f"{s[:3]}-{s[3]}-{s[4:6]}-{s[6:12]}-{s[12]}"

    return _not_card(g, make)


def n_isbn10(g: Gen) -> str:
    body = g.r(string.digits, 9)
    check = sum((10 - i) * int(c) for i, c in enumerate(body)) % 11
    c = (11 - check) % 11
    s = body + ("X" if c == 10 else str(c))
    return f"{s[0]}-{s[1:4]}-{s[4:9]}-{s[9]}"


def n_b64(g: Gen) -> str:
    head = g.pick(
        ("iVBORw0KGgoAAAANSUhEUgAA", "UEsDBBQAAAAIA", "JVBERi0xLjcKJ", "H4sIAAAAAAAA", "R0lGODlhAQABAIAAA", "")
    )
    raw = base64.b64encode(g.rbytes(g.rng.randint(30, 120))).decode()
    return head + raw


def n_eyj(g: Gen) -> str:
    obj = {"user": g.pick(("anon", "guest", "u" + g.r(string.digits, 5))), "theme": g.pick(("dark", "light")),
           "ts": int(g.when().timestamp())}  # fmt: skip
    return base64.b64encode(json.dumps(obj).encode()).decode()


def n_apiid(g: Gen) -> str:
    return g.pick((
        "chatcmpl-" + g.r(ALNUM, 29), "msg_01" + g.r(ALNUM, 22), "req_" + g.r(ALNUM, 24), "cus_" + g.r(ALNUM, 14),
        "evt_" + g.r(ALNUM, 24), "file-" + g.r(ALNUM, 24), "asst_" + g.r(ALNUM, 24), "run_" + g.r(ALNUM, 24),
        "org-" + g.r(ALNUM, 24), "batch_" + g.r(HEX, 32), "toolu_01" + g.r(ALNUM, 22), "pi_" + g.r(ALNUM, 24),
    ))  # fmt: skip


def n_handle(g: Gen) -> str:
    return ascii_fold(g.pick(FIRST)).lower() + g.pick(("", "_dev", "42", "-eng", "_k", "2000"))


def n_retina(g: Gen) -> str:
    return g.pick(("logo", "icon", "avatar", "hero", "btn-close", "sprite")) + g.pick(
        ("@2x.png", "@3x.png", "@2x.webp", "@1.5x.jpg")
    )


def n_pkgver(g: Gen) -> str:
    r = g.rng
    name = g.pick(
        ("lodash", "react", "react-dom", "express", "@types/node", "@babel/core", "typescript", "vite", "@nestjs/core")
    )
    return f"{name}@{r.randint(1, 20)}.{r.randint(0, 30)}.{r.randint(0, 40)}"


def n_localuser(g: Gen) -> str:
    user = g.pick(("root", "admin", "postgres", "deploy", "ubuntu", "git"))
    return f"{user}@{g.pick(('localhost', 'db-prod-3', 'pg-primary', 'build-01', 'ip-10-0-1-23', 'raspberrypi'))}"


def n_digest(g: Gen) -> str:
    return f"{g.pick(('nginx', 'redis', 'python', 'postgres', 'ghcr.io/globex/api'))}@sha256:{g.r(HEX, 64)}"


def n_skword(g: Gen) -> str:
    return g.pick((
        "scikit-learn", "sk-learn", "task-queue", "risk-based", "desk-booking", "disk-usage", "ask-me-anything",
        "mask-image", "whisk-it", "dusk-mode", "kiosk-mode", "sk-SK", "husk-sdk",
    ))  # fmt: skip


def n_placeholder(g: Gen) -> str:
    return g.pick((
        "sk-...", "sk-xxxx", "sk-YOUR_KEY_HERE", "<OPENAI_API_KEY>", "$OPENAI_API_KEY", "${ANTHROPIC_API_KEY}",
        "{{ secrets.GITHUB_TOKEN }}", "ghp_XXXXXXXX", "AKIA****************", "xoxb-your-token",
        "your-api-key-here", "sk-ant-...", "<your-token>", "os.environ['OPENAI_API_KEY']", "changeme",
    ))  # fmt: skip


def n_pubblock(g: Gen) -> str:
    label = g.pick(("PUBLIC KEY", "CERTIFICATE", "CERTIFICATE REQUEST", "RSA PUBLIC KEY"))
    body = base64.b64encode(
        bytes.fromhex("30820122300d06092a864886f70d01010105000382010f00") + g.rbytes(g.rng.randint(100, 280))
    ).decode()
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return "\n".join([f"-----BEGIN {label}-----", *lines, f"-----END {label}-----"])


def n_sshpub(g: Gen) -> str:
    key = base64.b64encode(b"\x00\x00\x00\x0bssh-ed25519\x00\x00\x00\x20" + g.rbytes(32)).decode()
    return f"ssh-ed25519 {key} {n_localuser(g).split('@')[0]}@{g.pick(('build-01', 'laptop', 'ci-runner-7'))}"


def n_hexcolor(g: Gen) -> str:
    return "#" + g.r(HEX, 6)


def n_coord(g: Gen) -> str:
    r = g.rng
    return f"{r.uniform(-60, 70):.4f}, {r.uniform(-170, 170):.4f}"


def n_pin(g: Gen) -> str:
    return g.r(string.digits, 4)


def n_otp(g: Gen) -> str:
    return g.r(string.digits, 6)


def n_errcode(g: Gen) -> str:
    return "0x" + g.pick(("80070005", "80004005", "C0000005", "8007000E", "800F081F", "00000709"))


def n_zip(g: Gen) -> str:
    return g.pick(("10115", "75008", "28013", "94107", "10001", "60614", "80331", "1010", "SW1A 1AA", "EC1A 1BB"))


def n_badphone(g: Gen) -> str:
    return g.pick(("123-456-7890", "000-000-0000", "(000) 000-0000", "999-999-9999"))


def n_dotted(g: Gen) -> str:
    r = g.rng
    return g.pick((f"{r.randint(1, 12)}.{r.randint(1, 9)}.{r.randint(1, 9)}", f"§ {r.randint(1, 20)}.{r.randint(1, 9)}",
                   f"{r.randint(1, 28):02d}.{r.randint(1, 12):02d}.{r.randint(2020, 2026)}",
                   f"{r.randint(192, 199)}.{r.randint(100, 199)}.{r.randint(1, 9)}"))  # fmt: skip


def n_invoice(g: Gen) -> str:
    return f"INV-{g.rng.randint(2019, 2025)}-{g.rng.randint(1, 99999):05d}"


NEG_FILLERS: dict[str, Callable[[Gen], str]] = {k[2:]: v for k, v in list(globals().items()) if k.startswith("n_")}

NEGATIVE_TEMPLATES: list[Template] = [
    # digit runs that fail Luhn or have no card brand
    ("sentence", "Your order [[order16]] has shipped and should arrive on [[date]]."),
    ("sentence", "Order number: [[order16]]"),
    ("chat", "hey, order [[order16]] still hasn't arrived, any update?"),
    ("email", "Subject: Shipping confirmation\n\nHi [[first]],\n\nyour parcel is on its way. "
              "Tracking number: [[ups]].\nOrder reference [[order16]].\n\nThanks for shopping with us!"),
    ("sentence", "UPS tracking [[ups]] shows the package in [[city]]."),
    ("sentence", "USPS tracking: [[usps]]"),
    ("log", "[[iso]] INFO shipping label created tracking=[[usps]] carrier=usps"),
    ("sentence", "Reference [[cardlike]] was not found in our system."),
    ("log", "[[iso]] DEBUG event_ts=[[ts16]] worker=[[host]] lag_us=[[n]]"),
    ("json", '{"event": "page_view", "ts_us": [[ts16]], "session": "[[uuid]]"}'),
    ("log", '{"ts":[[ts13]],"level":"info","msg":"batch flushed","rows":[[n]]}'),
    ("code", "created_at_ms = [[ts13]]\nupdated_at_ms = [[ts13]]"),
    ("csv", "invoice,amount,due\n[[invoice]],[[price]],[[date]]\n[[invoice]],[[price]],[[date]]"),
    ("sentence", "Invoice [[invoice]] for [[price]] is due on [[date]]."),
    ("sentence", "Device IMEI: [[imei]] (dual SIM)."),
    ("json", '{"device": {"model": "Pixel 8", "imei": "[[imei]]", "os": "Android 14"}}'),
    ("sentence", "ISBN [[isbn13]] (hardcover), ISBN-10 [[isbn10]]."),
    ("markdown", "| Title | ISBN |\n|---|---|\n| Designing Data-Intensive Applications | [[isbn13]] |\n"
                 "| The Pragmatic Programmer | [[isbn13]] |"),
    ("sentence", "Visa ending in [[pin]] was charged [[price]]."),
    ("sentence", "Card on file: **** **** **** [[pin]]"),
    ("chat", "the one ending [[pin]], not the amex"),
    ("log", "[[iso]] INFO payment ok card=************[[pin]] amount=[[price]]"),
    ("json", '{"card": {"brand": "visa", "last4": "[[pin]]", "exp_month": 4, "exp_year": 2027}}'),
    ("sentence", "Batch [[order16]] processed [[n]] records in [[n]] ms."),
    # IBAN look-alikes
    ("sentence", "Validation error: [[badiban]] is not a valid IBAN (checksum mismatch)."),
    ("log", "[[iso]] WARN sepa: rejected iban=[[badiban]] reason=invalid_checksum"),
    ("json", '{"error": {"code": "invalid_iban", "param": "iban", "value": "[[badiban]]"}}'),
    ("sentence", "The BIC of the receiving bank is [[bic]]."),
    ("code", "def test_rejects_bad_checksum():\n    assert not is_valid_iban(\"[[badiban]]\")"),
    ("chat", "hmm [[badiban]] keeps failing validation, did i mistype it?"),
    ("csv", "row,iban,error\n[[n]],[[badiban]],checksum\n[[n]],[[badiban]],checksum"),
    # SSN look-alikes
    ("sentence", "SSN [[badssn]] rejected: invalid area, group or serial number."),
    ("log", "[[iso]] WARN kyc: ssn_format_invalid value=[[badssn]]"),
    ("code", "@pytest.mark.parametrize('ssn', ['[[badssn]]', '[[badssn]]', '[[badssn]]'])\ndef test_invalid(ssn):\n"
             "    assert not is_valid_ssn(ssn)"),
    ("json", '{"field": "ssn", "error": "invalid", "input": "[[badssn]]"}'),
    ("sentence", "Part number [[badssn]] is out of stock."),
    ("sentence", "Ticket [[nine]] was closed by [[first]]."),
    ("log", "[[iso]] INFO zendesk ticket_id=[[nine]] status=solved"),
    ("sentence", "Our routing number 021000021 is printed on the cheque."),
    ("sentence", "Placeholder values like [[badphone]] are rejected by the form."),
    ('code', '<input type="tel" name="phone" placeholder="[[badphone]]">'),
    # IP look-alikes
    ("sentence", "Upgrade the agent to [[vquad]] before Friday."),
    ("log", "[[iso]] INFO agent version=[[vquad]] build=[[shortsha]]"),
    ("sentence", "Tested on Windows version [[winver]] and macOS 14.4.1."),
    ("log", "[[iso]] INFO os=\"Microsoft Windows [Version [[winver]]]\" arch=x64"),
    ("code", "dependencies:\n  - numpy==[[semver]]\n  - pandas>=[[semver]]"),
    ("code", '"dependencies": {\n  "express": "^[[semver]]",\n  "lodash": "~[[semver]]"\n}'),
    ("sentence", "Released [[semver]]: fixes a crash when the cache is full."),
    ("markdown", "## Changelog\n\n### [[semver]] - [[date]]\n\n- Fixed retry backoff\n- Bumped deps"),
    ("sentence", "[[badip]] is not a valid IPv4 address because an octet exceeds 255."),
    ("code", 'assert not is_ip("[[badip]]")'),
    ("sentence", "See section [[dotted]] of the spec."),
    ("sentence", "SNMP OID [[oid]] reports the fan speed."),
    ("log", "[[iso]] DEBUG snmp get [[oid]] -> INTEGER: [[n]]"),
    ("sentence", "Pi is roughly [[float]], and e is about 2.71828."),
    ("sentence", "The meeting starts at [[time]] and ends at [[hm]]."),
    ("log", "[[date]] [[time]] INFO scheduler: next run at [[time]]"),
    ("sentence", "MAC address [[mac]] is registered to the printer."),
    ("log", "[[syslog]] [[host]] kernel: eth0: link up, hw addr [[mac]]"),
    ("code", "std::vector<std::string> names;\nstd::map<int, std::string> index;"),
    ("code", "use std::io::Result;\nuse tokio::net::TcpListener;"),
    ("sentence", "The video is 16:9, the poster 4:3."),
    ("sentence", "Downloads: [[n]] last week, [[n]] this week (since v[[semver]])."),
    ("code", "user_agent = \"Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
             "Chrome/124.0.0.0 Safari/537.36\""),
    # hashes, ids, base64
    ("sentence", "Fixed in commit [[sha]]."),
    ("code", "git cherry-pick [[shortsha]]\ngit revert --no-edit [[sha]]"),
    ("log", "[[iso]] INFO deploy sha=[[sha]] image=[[digest]]"),
    ("code", "FROM [[digest]]\nRUN pip install --no-cache-dir -r requirements.txt"),
    ("sentence", "SHA-256 checksum: [[sha256]]"),
    ("code", "[[sha256]]  dist/app-[[semver]].tar.gz"),
    ("sentence", "The MD5 of the file is [[md5]]."),
    ("json", '{"id": "[[uuid]]", "parent_id": "[[uuid]]", "status": "queued"}'),
    ("log", "[[iso]] INFO request_id=[[uuid]] trace_id=[[md5]] span_id=[[hex]]"),
    ("json", '{"id":"[[apiid]]","object":"chat.completion","created":[[epoch]],"model":"gpt-4o-mini"}'),
    ("json", '{"id": "[[apiid]]", "type": "message", "role": "assistant", "model": "claude-3-5-haiku-latest", '
             '"stop_reason": "end_turn"}'),
    ("log", "[[iso]] INFO upstream=openai id=[[apiid]] tokens_in=[[n]] tokens_out=[[n]]"),
    ("sentence", "Object [[apiid]] was archived by the cleanup job."),
    ("code", '<img src="data:image/png;base64,[[b64]]" alt="logo">'),
    ("json", '{"attachment": {"filename": "report.pdf", "content_base64": "[[b64]]"}}'),
    ("code", "prefs = base64.b64decode(\"[[eyj]]\")"),
    ("sentence", "The cookie value [[eyj]] is just base64-encoded JSON, not a JWT."),
    ("sentence", "JWTs always start with eyJ because the header is base64url JSON."),
    ("code", "integrity=\"sha512-[[b64]]\""),
    ("code", "SECRET_KEY_FILE=/run/secrets/app_key\nDB_PASSWORD_FILE=/run/secrets/db_password"),
    # email look-alikes
    ("chat", "@[[handle]] can you take a look?"),
    ("chat", "thanks @[[handle]] and @[[handle]]!"),
    ("code", '<img src="/static/img/[[retina]]" srcset="/static/img/[[retina]] 2x">'),
    ("code", "npm install [[pkgver]] [[pkgver]]"),
    ("code", "pnpm add -D [[pkgver]]"),
    ("sentence", "Pin [[pkgver]] until the regression is fixed."),
    ("code", "[[localuser]]:~$ sudo systemctl restart nginx"),
    ("log", "[[syslog]] [[host]] sudo: pam_unix(sudo:session): session opened for user root by [[localuser]]"),
    ("code", "@media (max-width: 600px) {\n  .nav { display: none; }\n}"),
    ("code", "@app.get(\"/health\")\ndef health() -> dict[str, str]:\n    return {\"status\": \"ok\"}"),
    ("code", "@Override\npublic String toString() {\n    return name;\n}"),
    ("code", "@dataclass(frozen=True)\nclass Point:\n    x: float\n    y: float"),
    ("sentence", "Contact the admin at admin@localhost on the test VM."),
    ("code", "[[sshpub]]"),
    ("code", "echo '[[sshpub]]' >> ~/.ssh/authorized_keys"),
    # secret look-alikes
    ("sentence", "We use [[skword]] for the baseline model."),
    ("code", "pip install scikit-learn==[[semver]]\nfrom sklearn.linear_model import LogisticRegression"),
    ("sentence", "A [[skword]] approach keeps the tasks simple."),
    ("chat", "is [[skword]] the same thing as sklearn?"),
    ("code", "OPENAI_API_KEY=[[placeholder]]"),
    ("code", "client = OpenAI(api_key=os.environ[\"OPENAI_API_KEY\"])"),
    ("code", "curl https://api.openai.com/v1/models -H \"Authorization: Bearer $OPENAI_API_KEY\""),
    ("code", "curl -H 'Authorization: Bearer <token>' https://api.globex.io/v2/orders"),
    ("code", "headers = {\"Authorization\": f\"Bearer {token}\"}"),
    ("code", "fetch(url, { headers: { Authorization: `Bearer ${accessToken}` } })"),
    ("code", "env:\n  GITHUB_TOKEN: ${{ secrets.GITHUB_TOKEN }}\n  NPM_TOKEN: ${{ secrets.NPM_TOKEN }}"),
    ("markdown", "Set `ANTHROPIC_API_KEY` to your key (it starts with `sk-ant-`)."),
    ("markdown", "1. Create a key in the dashboard.\n2. Export it: `export OPENAI_API_KEY=[[placeholder]]`\n3. Run "
                 "`make dev`."),
    ("sentence", "Keys look like [[placeholder]]; never paste the real one here."),
    ("sentence", "The bearer of this letter is authorised to collect the parcel."),
    ("sentence", "Bearer tokens expire after one hour; refresh them with the refresh endpoint."),
    ("code", "[[pubblock]]"),
    ("sentence", "Here is our public certificate:\n[[pubblock]]"),
    ("code", "kubectl create secret generic db --from-literal=password=\"$DB_PASSWORD\""),
    ("code", "aws configure set aws_access_key_id \"$AWS_ACCESS_KEY_ID\""),
    ("log", "[[iso]] WARN auth: missing Authorization header from client [[handle]]"),
    ("log", "[[iso]] INFO auth: token redacted=[REDACTED] user=[[handle]]"),
    # prices, dates, coordinates, short digit groups
    ("sentence", "The [[product]] costs [[price]] including VAT."),
    ("chat", "got the [[product]] for [[price]] lol"),
    ("sentence", "Coordinates: [[coord]] (near the station)."),
    ("sentence", "Your verification code is [[otp]]. It expires in 10 minutes."),
    ("sentence", "Door code [[pin]], floor [[n]], room [[n]]."),
    ("log", "[[iso]] ERROR installer failed with [[errcode]]"),
    ("sentence", "Postal code [[zip]], [[city]]."),
    ("sentence", "Meeting on [[date]] at [[hm]] in room [[n]]."),
    ("csv", "date,temperature,humidity\n[[date]],[[float]],[[n]]\n[[date]],21.5,[[n]]"),
    ("markdown", "| Metric | Value |\n|---|---|\n| p50 | [[secs]] s |\n| p99 | [[secs]] s |\n| req/s | [[n]] |"),
    ("csv", "sku,name,price,qty\nSKU-[[n]],[[product]],[[price]],[[n]]\nSKU-[[n]],[[product]],[[price]],[[n]]"),
    ("log", "[[iso]] INFO [[svc]] completed in [[secs]]s status=[[status]] bytes=[[bytes]]"),
    ("log", "[[syslog]] [[host]] systemd[1]: Started Daily apt upgrade and clean activities ([[time]])."),
    ("json", '{"latency_ms": [[n]], "tokens": [[n]], "cost_usd": 0.00[[n]], "cache_hit": false}'),
    ("email", "Subject: Release [[semver]]\n\nHi team,\n\nrelease [[semver]] is out. Build [[shortsha]] passed all "
              "checks on [[date]].\n\nCheers,\n[[first]]"),
    ("email", "Subject: Your order [[order16]]\n\nThanks for your purchase of [[product]] ([[price]]).\n"
              "Estimated delivery: [[date]]."),
    ("email", "Subject: Meeting notes [[date]]\n\n- p99 latency down to [[secs]]s\n- [[n]] tickets closed\n- "
              "next review at [[hm]]"),
    ("chat", "[[first]]: build [[shortsha]] is green, shipping v[[semver]]"),
    ("chat", "lol it's [[time]] already? see you at [[hm]]"),
    ("markdown", "| Host | Role | Version |\n|---|---|---|\n| [[host]] | api | [[semver]] |\n| [[host]] | worker | "
                 "[[semver]] |"),
    ("sentence", "Set the timeout to [[n]] ms and retries to 3 (see RFC 7231 §6.6.4)."),
    ("sentence", "Hit [[n]] requests per second at 70% CPU on 2 cores (p99 [[secs]] s)."),
    ("sentence", "Der Termin ist am [[dmy]] um [[hm]] Uhr in Raum [[n]]."),
    ("sentence", "La commande [[order16]] a été expédiée le [[dmy]]."),
    ("chat", "El pedido [[order16]] llegará el [[dmy]]."),
    ("sentence", "注文番号[[order16]]の商品は[[date]]に発送されました。"),
    ("sentence", "订单号[[order16]]已于[[date]]发货。"),
    ("sentence", "आपका ऑर्डर [[order16]] [[date]] को भेजा गया।"),
    ("sentence", "バージョン[[semver]]をインストールしてください。"),
    ("sentence", "请将软件升级到[[semver]]版本。"),
]  # fmt: skip


# --------------------------------------------------------------------------------------------
# Audit: labeled spans are valid; nothing unlabeled would pass a validator
# --------------------------------------------------------------------------------------------

SECRET_PATTERNS = [
    re.compile(p)
    for p in (
        r"sk-(?:proj|svcacct|admin)-[A-Za-z0-9_-]{58,74}T3BlbkFJ[A-Za-z0-9_-]{58,74}",
        r"sk-[A-Za-z0-9]{20}T3BlbkFJ[A-Za-z0-9]{20}",
        r"sk-[A-Za-z0-9]{48}",
        r"sk-ant-(?:api03|admin01)-[A-Za-z0-9_-]{93}AA",
        r"(?:AKIA|ASIA)[A-Z2-7]{16}",
        r"gh[pousr]_[A-Za-z0-9]{36}",
        r"github_pat_[A-Za-z0-9]{22}_[A-Za-z0-9]{59}",
        r"xoxb-\d{10,13}-\d{10,13}-[A-Za-z0-9]{24}",
        r"xox[pa]-(?:2-)?\d{10,13}-\d{10,13}-\d{10,13}-[a-f0-9]{32}",
        r"xapp-1-A[A-Z0-9]{10}-\d{13}-[a-f0-9]{64}",
        r"eyJ[A-Za-z0-9_-]+\.eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+",
        r"-----BEGIN ([A-Z ]*PRIVATE KEY)-----(?:\n|\\n)[\s\S]+?(?:\n|\\n)-----END \1-----",
    )
]
LOOSE_SECRET = re.compile(
    r"(?<![\w-])(?:sk-(?:proj-|ant-|svcacct-|admin-)?[A-Za-z0-9_-]{20,}|(?:AKIA|ASIA)[A-Z2-7]{16}|gh[pousr]_[A-Za-z0-9]{20,}"
    r"|github_pat_\w{20,}|xox[abpr]-\d[0-9A-Za-z-]{9,}|xapp-\d-[A-Za-z0-9-]{10,}|eyJ[\w-]+\.[\w-]+\.[\w-]+"
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----)"
    r"|(?i:bearer)\s+[A-Za-z0-9._~+/-]{16,}"
)
CARD_RUN = re.compile(r"(?<![\w.])\d(?:[ -]?\d){11,18}(?![\w])")
SSN_SEP = re.compile(r"(?<![\d-])\d{3}([- ])\d{2}\1\d{4}(?![\d-])")
IPV4 = re.compile(r"(?<![\w.])\d{1,3}(?:\.\d{1,3}){3}(?![\w]|\.\d)")
IPV6 = re.compile(
    r"(?<![\w:.%])((?:[0-9A-Fa-f]{0,4}:){2,7}(?:\d{1,3}(?:\.\d{1,3}){3}|[0-9A-Fa-f]{0,4})(?:%\w+)?)(?![\w:])"
)
IBAN_START = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?=[A-Z0-9 ])")


def span_problem(s: Span, value: str) -> str | None:
    bad_edge = value[:1] in tuple("\"'`<([{") and not (s.type == "PHONE" and value[0] == "(")
    if not value or value != value.strip() or bad_edge or value[-1] in "\"'`>)]},.;:!?":
        return "bad boundary"
    checks: dict[str, Callable[[str], bool]] = {
        "EMAIL": email_ok,
        "CREDIT_CARD": lambda v: (
            bool(re.fullmatch(r"\d+(?:([ -])\d+(?:\1\d+)*)?", v))
            and luhn_ok(re.sub(r"\D", "", v))
            and card_brand(re.sub(r"\D", "", v)) is not None
        ),
        "IBAN": iban_ok,
        "US_SSN": ssn_ok,
        "IP_ADDRESS": ip_ok,
        "SECRET": lambda v: (
            any(p.fullmatch(v) for p in SECRET_PATTERNS) or bool(re.fullmatch(r"[A-Za-z0-9._~+/-]{20,}", v))
        ),
        "PHONE": lambda v: bool(re.fullmatch(r"\+?[\d (). /-]+", v)) and 7 <= len(re.sub(r"\D", "", v)) <= 15,
    }
    return None if checks[s.type](value) else "invalid value"


def unlabeled_problems(text: str) -> Iterator[str]:
    """`text` has its labeled spans masked; yield whatever a validator would take for an entity."""
    for m in EMAIL_RE.finditer(text):
        if email_ok(m.group()):
            yield f"EMAIL {m.group()!r}"
    for m in CARD_RUN.finditer(text):
        d = re.sub(r"\D", "", m.group())
        if luhn_ok(d) and card_brand(d):
            yield f"CREDIT_CARD {m.group()!r}"
    for m in IBAN_START.finditer(text):
        tail = text[m.start() : m.start() + 50]
        compact = re.sub(r" ", "", re.match(r"[A-Z0-9 ]*", tail).group())  # type: ignore[union-attr]
        n = IBAN_LENGTH.get(compact[:2])
        if n and len(compact) >= n and iban_ok(compact[:n]):
            yield f"IBAN {compact[:n]!r}"
    for m in SSN_SEP.finditer(text):
        if ssn_ok(m.group()):
            yield f"US_SSN {m.group()!r}"
    if SSN_WORDS.search(text):
        for m in re.finditer(r"(?<!\d)\d{9}(?!\d)", text):
            if ssn_ok(m.group()):
                yield f"US_SSN (bare, SSN context) {m.group()!r}"
    for m in IPV4.finditer(text):
        if ip_ok(m.group()) and not re.search(r"[A-Za-z]+/$", text[: m.start()]):
            yield f"IP_ADDRESS {m.group()!r}"
    for m in IPV6.finditer(text):
        if ip_ok(m.group(1)):
            yield f"IP_ADDRESS {m.group(1)!r}"
    for m in LOOSE_SECRET.finditer(text):
        yield f"SECRET {m.group()[:40]!r}"


MASK = "\u2588"
SSN_WORDS = re.compile(r"ssn|social|seguro|社会", re.IGNORECASE)


def masked(rec: Record) -> str:
    chars = list(rec.text)
    for s in rec.entities:
        chars[s.start : s.end] = MASK * (s.end - s.start)
    return "".join(chars)


def audit(files: dict[str, list[Record]]) -> list[str]:
    errors: list[str] = []
    seen: set[str] = set()
    for name, recs in files.items():
        for rec in recs:
            if rec.id in seen:
                errors.append(f"{rec.id}: duplicate id")
            seen.add(rec.id)
            if name != "negatives" and not any(s.type == name for s in rec.entities):
                errors.append(f"{rec.id}: no {name} entity")
            ordered = sorted(rec.entities, key=lambda s: s.start)
            for a, b in itertools.pairwise(ordered):
                if b.start < a.end:
                    errors.append(f"{rec.id}: overlapping spans")
            for s in rec.entities:
                problem = span_problem(s, rec.text[s.start : s.end])
                if s.type == "US_SSN" and rec.text[s.start : s.end].isdigit() and not SSN_WORDS.search(rec.text):
                    problem = "bare SSN without SSN context"
                if problem:
                    errors.append(f"{rec.id}: {s.type} {rec.text[s.start : s.end]!r}: {problem}")
            errors.extend(f"{rec.id}: unlabeled {p}" for p in unlabeled_problems(masked(rec)))
            if SLOT_RE.search(rec.text):
                errors.append(f"{rec.id}: unfilled template slot")
    return errors


def phone_audit(files: dict[str, list[Record]]) -> tuple[list[str], list[str]] | None:
    """With `phonenumbers`: (errors, notes). Errors: a PHONE span that is not a valid number of its
    country; a valid US number or +-prefixed number outside any span. Notes: digit runs outside spans
    that some other country would accept as a national number (reviewed by hand, see README)."""
    try:
        pn: Any = importlib.import_module("phonenumbers")
    except ImportError:
        return None
    errors: list[str] = []
    notes: list[str] = []
    for recs in files.values():
        for rec in recs:
            for s in rec.entities:
                if s.type != "PHONE":
                    continue
                value = rec.text[s.start : s.end]
                try:
                    num = pn.parse(value, s.region)
                    ok = pn.is_valid_number(num) and pn.region_code_for_number(num) == s.region
                except pn.NumberParseException:
                    ok = False
                if not ok:
                    errors.append(f"{rec.id}: PHONE {value!r} is not a valid {s.region} number")
            text = masked(rec)
            for region in ("US", "GB", "DE", "FR", "IN", "ES", "JP", "CN"):
                for m in pn.PhoneNumberMatcher(text, region, leniency=pn.Leniency.VALID):
                    raw = m.raw_string
                    # digits inside a longer run of short groups (a broken IBAN) are not a phone layout
                    before, after = text[: m.start], text[m.end :]
                    inside = bool(re.search(r"[A-Z0-9]{2,4} $", before) or re.match(r" [A-Z0-9]{1,4}\b", after))
                    inside |= bool(re.fullmatch(r"\d{1,2}([./])\d{1,2}\1\d{4}", raw))  # a date, whatever the digits
                    if (region == "US" or raw.startswith("+")) and not inside:
                        errors.append(f"{rec.id}: unlabeled phone {raw!r} ({region})")
                    else:
                        notes.append(f"{rec.id}: {raw!r} would be a valid {region} national number")
    return errors, notes


# --------------------------------------------------------------------------------------------
# Build and write
# --------------------------------------------------------------------------------------------


def build() -> dict[str, list[Record]]:
    g = Gen(SEED)
    files: dict[str, list[Record]] = {}
    for etype in TYPES:
        templates = GENERIC + SPECIFIC[etype]
        order = list(range(len(templates)))
        recs: list[Record] = []
        texts: set[str] = set()
        i = 0
        while len(recs) < POSITIVES_PER_TYPE:
            if i % len(templates) == 0:
                g.rng.shuffle(order)
            kind, tpl = templates[order[i % len(templates)]]
            i += 1
            text, spans = g.render(tpl, etype)
            if text in texts:
                continue
            texts.add(text)
            recs.append(Record(f"{etype.lower()}-{len(recs) + 1:04d}", text, spans, kind))
        files[etype] = recs
    negs: list[Record] = []
    texts = set()
    i = 0
    order = list(range(len(NEGATIVE_TEMPLATES)))
    while len(negs) < NEGATIVES:
        if i % len(order) == 0:
            g.rng.shuffle(order)
        kind, tpl = NEGATIVE_TEMPLATES[order[i % len(order)]]
        i += 1
        text, spans = g.render(tpl, None)
        if text in texts:
            continue
        texts.add(text)
        negs.append(Record(f"neg-{len(negs) + 1:04d}", text, spans, kind))
    files["negatives"] = negs
    return files


def serialize(recs: list[Record]) -> str:
    return "".join(r.to_json() + "\n" for r in recs)


def summary(files: dict[str, list[Record]]) -> str:
    lines = [f"{'file':<14} {'texts':>6} " + " ".join(f"{k[:8]:>8}" for k in KINDS)]
    for name, recs in files.items():
        kinds = collections.Counter(r.kind for r in recs)
        lines.append(f"{name:<14} {len(recs):>6} " + " ".join(f"{kinds[k]:>8}" for k in KINDS))
    ents = collections.Counter(s.type for recs in files.values() for r in recs for s in r.entities)
    lines.append("entities: " + ", ".join(f"{t} {ents[t]}" for t in TYPES))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="compare with the files on disk instead of writing")
    ap.add_argument("--out", type=Path, default=HERE, help="output folder (default: this folder)")
    ap.add_argument("--notes", action="store_true", help="print the phone-number notes of the audit")
    args = ap.parse_args(argv)
    files = build()
    errors = audit(files)
    phones = phone_audit(files)
    if phones is None:
        print("phonenumbers not installed: phone validity not audited", file=sys.stderr)
    else:
        errors += phones[0]
        print(f"phone audit: {len(phones[1])} notes", file=sys.stderr)
        if args.notes:
            print("\n".join(phones[1]), file=sys.stderr)
    if errors:
        print("\n".join(errors[:200]), file=sys.stderr)
        print(f"{len(errors)} audit errors", file=sys.stderr)
        return 1
    stale = []
    for name, recs in files.items():
        path = args.out / f"{name}.jsonl"
        data = serialize(recs)
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != data:
                stale.append(path.name)
        else:
            path.write_text(data, encoding="utf-8")
    print(summary(files))
    if stale:
        print(f"out of date: {', '.join(stale)} (run generate.py)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
