"""The PII/secret corpus itself (tests/pii_corpus/, README.md there): well-formed lines, clean and valid
spans, enough texts per type, and files that match what generate.py writes. Checks are written from
the type definitions, independently of the generator's own validators."""

from __future__ import annotations

import importlib.util
import ipaddress
import json
import re
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest

CORPUS = Path(__file__).resolve().parents[1] / "pii_corpus"
TYPES = ("EMAIL", "PHONE", "CREDIT_CARD", "IBAN", "US_SSN", "IP_ADDRESS", "SECRET")
KINDS = {"sentence", "code", "log", "json", "chat", "email", "csv", "markdown"}
FILES = (*TYPES, "negatives")
QUOTES = "\"'`\u201c\u201d\u2018\u2019\u00ab\u00bb"  # straight, curly and angle quotes

Record = dict[str, Any]


@cache
def load(name: str) -> list[Record]:
    path = CORPUS / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def all_records() -> list[Record]:
    return [r for name in FILES for r in load(name)]


def spans(etype: str) -> list[tuple[Record, str]]:
    return [(r, r["text"][e["start"] : e["end"]]) for r in all_records() for e in r["entities"] if e["type"] == etype]


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def test_every_line_parses_with_the_documented_fields() -> None:
    ids: set[str] = set()
    for name in FILES:
        path = CORPUS / f"{name}.jsonl"
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            rec = json.loads(line)
            where = f"{path.name}:{n}"
            assert set(rec) == {"id", "text", "entities", "kind"}, where
            assert isinstance(rec["id"], str) and rec["id"] not in ids, where
            ids.add(rec["id"])
            assert isinstance(rec["text"], str) and rec["text"], where
            assert rec["kind"] in KINDS, where
            for e in rec["entities"]:
                assert set(e) == {"type", "start", "end"}, where
                assert e["type"] in TYPES, where
                assert isinstance(e["start"], int) and isinstance(e["end"], int), where


def test_spans_are_inside_the_text_and_do_not_overlap() -> None:
    for rec in all_records():
        prev_end = -1
        for e in sorted(rec["entities"], key=lambda e: e["start"]):
            assert 0 <= e["start"] < e["end"] <= len(rec["text"]), rec["id"]
            assert e["start"] >= prev_end, f"{rec['id']}: overlapping spans"
            prev_end = e["end"]


def test_span_text_has_no_surrounding_space_or_quote() -> None:
    for rec in all_records():
        for e in rec["entities"]:
            value = rec["text"][e["start"] : e["end"]]
            assert value and value == value.strip(), (rec["id"], value)
            assert value[0] not in QUOTES and value[-1] not in QUOTES, (rec["id"], value)
            assert value[-1] not in ".,;:!?)]}>", (rec["id"], value)


def test_counts_per_type_and_negatives() -> None:
    for etype in TYPES:
        recs = load(etype)
        assert len(recs) >= 300, etype
        assert all(any(e["type"] == etype for e in r["entities"]) for r in recs), etype
        assert len(spans(etype)) >= 300, etype
    negatives = load("negatives")
    assert len(negatives) >= 1000
    assert all(r["entities"] == [] for r in negatives)


def test_every_kind_is_used_in_every_file() -> None:
    for name in FILES:
        assert {r["kind"] for r in load(name)} == KINDS, name


def test_credit_cards_pass_luhn() -> None:
    for rec, value in spans("CREDIT_CARD"):
        assert re.fullmatch(r"\d+(?:([ -])\d+(?:\1\d+)*)?", value), (rec["id"], value)
        digits = re.sub(r"\D", "", value)
        assert 12 <= len(digits) <= 19 and luhn_ok(digits), (rec["id"], value)


def test_ibans_pass_mod_97() -> None:
    for rec, value in spans("IBAN"):
        compact = value.replace(" ", "")
        assert re.fullmatch(r"[A-Z]{2}\d{2}[A-Z0-9]{11,30}", compact), (rec["id"], value)
        assert value == compact or value == " ".join(compact[i : i + 4] for i in range(0, len(compact), 4))
        number = "".join(str(int(ch, 36)) for ch in compact[4:] + compact[:4])
        assert int(number) % 97 == 1, (rec["id"], value)


def test_ssns_have_a_valid_area_group_and_serial() -> None:
    for rec, value in spans("US_SSN"):
        m = re.fullmatch(r"(\d{3})([- ]?)(\d{2})\2(\d{4})", value)
        assert m, (rec["id"], value)
        area, group, serial = int(m.group(1)), int(m.group(3)), int(m.group(4))
        assert area not in (0, 666) and area < 900, (rec["id"], value)
        assert group != 0 and serial != 0, (rec["id"], value)
        if not m.group(2):  # bare 9 digits only where the text says it is an SSN
            assert re.search(r"ssn|social|seguro|社会", rec["text"], re.IGNORECASE), rec["id"]


def test_ip_addresses_parse() -> None:
    for _, value in spans("IP_ADDRESS"):
        ipaddress.ip_address(value)  # a zone (fe80::1%eth0) is part of the address; ports stay outside


def test_emails_have_one_at_and_a_dotted_domain() -> None:
    for rec, value in spans("EMAIL"):
        assert value.count("@") == 1, (rec["id"], value)
        local, domain = value.split("@")
        assert local and "." in domain.strip("."), (rec["id"], value)


def test_phones_look_like_phone_numbers() -> None:
    for rec, value in spans("PHONE"):
        assert re.fullmatch(r"\+?[\d (). /-]+", value), (rec["id"], value)
        assert 7 <= len(re.sub(r"\D", "", value)) <= 15, (rec["id"], value)


def test_secrets_have_a_known_shape_or_follow_bearer() -> None:
    known = re.compile(
        r"sk-(?:proj-|svcacct-|admin-|ant-api03-|ant-admin01-)?[\w-]{20,}|(?:AKIA|ASIA)[A-Z2-7]{16}"
        r"|gh[pousr]_[A-Za-z0-9]{36}|github_pat_\w{82}|xox[bpa]-[\w-]+|xapp-[\w-]+|eyJ[\w-]+\.eyJ[\w-]+\.[\w-]+"
        r"|-----BEGIN ([A-Z ]*PRIVATE KEY)-----(?:\n|\\n)[\s\S]+(?:\n|\\n)-----END \1-----"
    )
    for rec in all_records():
        for e in rec["entities"]:
            if e["type"] != "SECRET":
                continue
            value = rec["text"][e["start"] : e["end"]]
            bearer = re.search(r"bearer\s+$", rec["text"][: e["start"]], re.IGNORECASE)
            assert known.fullmatch(value) or bearer, (rec["id"], value[:60])


def test_files_match_the_generator() -> None:
    spec = importlib.util.spec_from_file_location("pii_corpus_generate", CORPUS / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        files = module.build()
    finally:
        del sys.modules[spec.name]
    for name, recs in files.items():
        text = (CORPUS / f"{name}.jsonl").read_text(encoding="utf-8")
        if text != module.serialize(recs):
            pytest.fail(f"{name}.jsonl differs from generate.py's output: run tests/pii_corpus/generate.py")
