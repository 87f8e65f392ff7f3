"""Applying a policy to text: one request's redaction state.

Every piece of text of a request goes through the same `Redaction`, so a value that appears twice
gets the same placeholder or hash, placeholders never collide with text the client wrote, and the
counts per entity type cover the whole request. Values never leave this object except as the
restored text of the response (they are not logged, not even at debug level).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import re
from collections import Counter
from dataclasses import dataclass, field

from .detect import Finding
from .policy import Policy

# Between the texts of one request when they are scanned together: no entity contains it.
_SEP = "\n\x00\n"
# What a restore placeholder looks like: "[EMAIL_1]", "[EMPLOYEE_ID_12]".
PLACEHOLDER = re.compile(r"\[([A-Z][A-Z0-9_]*)_(\d{1,6})\]")
_DOC_EMAIL = re.compile(r"@(?:[A-Za-z0-9-]+\.)*example\.(?:com|org|net)$", re.IGNORECASE)
_DOC_PHONE = re.compile(r"555[\s.\-)]*01\d\d$")
_DOC_NETS = tuple(
    ipaddress.ip_network(n) for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32")
)
_TEST_CARDS = frozenset(("4111111111111111", "4242424242424242", "5555555555554444", "378282246310005"))


def is_documentation_value(kind: str, value: str) -> bool:
    """Values published for examples (RFC 2606 domains, RFC 5737 / 3849 networks, the 555-01xx
    range, well-known test cards): left alone when `ignore_documentation_values` is on."""
    if kind == "EMAIL":
        return _DOC_EMAIL.search(value) is not None
    if kind == "PHONE":
        return _DOC_PHONE.search(value) is not None
    if kind == "IP_ADDRESS":
        try:
            addr = ipaddress.ip_address(value)
        except ValueError:
            return False
        return any(addr in net for net in _DOC_NETS if net.version == addr.version)
    if kind == "CREDIT_CARD":
        return re.sub(r"\D", "", value) in _TEST_CARDS
    return False


class PiiBlocked(Exception):
    def __init__(self, types: list[str]) -> None:
        super().__init__(", ".join(types))
        self.types = types


@dataclass
class Redaction:
    policy: Policy
    tenant: str = ""
    hash_key: bytes | None = None
    counts: Counter[str] = field(default_factory=Counter)
    blocked: set[str] = field(default_factory=set)
    # placeholder -> the original value (unescaped text)
    originals: dict[str, str] = field(default_factory=dict)
    _by_value: dict[tuple[str, str], str] = field(default_factory=dict)
    _next: Counter[str] = field(default_factory=Counter)
    _taken: set[str] = field(default_factory=set)
    changed: bool = False

    def reserve(self, texts: list[str]) -> None:
        """Placeholder-shaped text the client wrote itself: never handed out (its restore would
        replace the client's own text)."""
        for t in texts:
            if "[" in t:
                self._taken.update(m.group() for m in PLACEHOLDER.finditer(t))

    def redact_all(self, texts: list[str], json_flags: list[bool]) -> list[str]:
        """Every text of a request, scanned in one pass over them joined: a request is often many
        short messages, and each scan has a fixed cost. No entity is taken across two texts."""
        if not texts:
            return texts
        self.reserve(texts)
        joined = _SEP.join(texts)
        findings = self.policy.detector.find(joined)
        if not findings:
            return texts
        out: list[str] = []
        start = 0
        k = 0
        for text, json_text in zip(texts, json_flags, strict=True):
            end = start + len(text)
            mine: list[Finding] = []
            while k < len(findings) and findings[k].start < end:
                f = findings[k]
                if f.start >= start and f.end <= end:
                    mine.append(Finding(f.type, f.start - start, f.end - start))
                k += 1
            out.append(self._apply(text, mine, json_text) if mine else text)
            start = end + len(_SEP)
        return out

    def redact(self, text: str, json_text: bool = False) -> str:
        """`text` with the policy applied. `json_text`: the text is JSON source (tool-call
        arguments), so values are unescaped before they are kept for restoring."""
        findings = self.policy.detector.find(text)
        if not findings:
            return text
        return self._apply(text, findings, json_text)

    def _apply(self, text: str, findings: list[Finding], json_text: bool) -> str:
        out: list[str] = []
        pos = 0
        for f in findings:
            action = self.policy.action(f.type)
            if action == "allow":
                continue
            value = text[f.start : f.end]
            if self.policy.ignore_documentation_values and is_documentation_value(f.type, value):
                continue
            self.counts[f.type] += 1
            if action == "block":
                self.blocked.add(f.type)
                continue
            out.append(text[pos : f.start])
            out.append(self._replacement(f, _unescape(value) if json_text else value, action))
            pos = f.end
        if pos == 0:
            return text
        out.append(text[pos:])
        self.changed = True
        return "".join(out)

    def _replacement(self, f: Finding, value: str, action: str) -> str:
        if action == "mask":
            return f"[{f.type}]"
        if action == "hash":
            assert self.hash_key is not None
            msg = f"{self.tenant}\x00{f.type}\x00{value}".encode()
            return f"[{f.type}_{hmac.new(self.hash_key, msg, hashlib.sha256).hexdigest()[:8]}]"
        # restore
        known = self._by_value.get((f.type, value))
        if known is not None:
            return known
        while True:
            self._next[f.type] += 1
            placeholder = f"[{f.type}_{self._next[f.type]}]"
            if placeholder not in self._taken:
                break
        self._by_value[(f.type, value)] = placeholder
        self.originals[placeholder] = value
        return placeholder

    def check(self) -> None:
        if self.blocked:
            raise PiiBlocked(sorted(self.blocked))


def _unescape(raw: str) -> str:
    """A value found in JSON source, as the string it stands for (its escapes resolved)."""
    if "\\" not in raw:
        return raw
    try:
        value = json.loads(f'"{raw}"')
    except ValueError:
        return raw
    return value if isinstance(value, str) else raw


def restore_text(text: str, originals: dict[str, str], json_text: bool = False) -> str:
    """Placeholders of this request put back; in JSON source (tool-call arguments), escaped."""
    if "[" not in text or not originals:
        return text

    def put_back(m: re.Match[str]) -> str:
        value = originals.get(m.group())
        if value is None:
            return m.group()
        return json.dumps(value, ensure_ascii=False)[1:-1] if json_text else value

    return PLACEHOLDER.sub(put_back, text)
