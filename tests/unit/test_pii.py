"""PII redaction: policies, what is scanned in each schema, every action, and responses (JSON and
SSE split at every offset) with placeholders put back or entities masked."""

from __future__ import annotations

import copy
import itertools
from typing import Any

import orjson
import pytest

from extproc.config import parse_config
from extproc.pii.policy import PiiSpec, resolve
from extproc.pii.redact import PiiBlocked, Redaction, restore_text
from extproc.pii.stream import Rewriter, StreamRewriter, rewrite_json
from extproc.pii.walk import request_slots
from extproc.sse import SSEEvent

EMAIL, PHONE, CARD = "jane.roe@acme-corp.io", "+1 415 555 0132", "4111 1111 1111 1111"
KEY = "sk-proj-" + "Zq7vK2mP9xR4tL8nW3bY6cH1jF5dS0gAe"


def redact_body(schema: str, body: dict[str, Any], spec: PiiSpec, tenant: str = "t") -> Redaction:
    policy = resolve(spec, None)
    assert policy is not None
    r = Redaction(policy, tenant, b"k" * 32)
    slots = request_slots(schema, body)
    texts = [owner[key] for owner, key, _ in slots]
    r.reserve(texts)
    for (owner, key, json_text), text in zip(slots, texts, strict=True):
        owner[key] = r.redact(text, json_text)
    return r


def openai_body() -> dict[str, Any]:
    return {
        "model": "gpt-5.5",
        "messages": [
            {"role": "system", "content": f"Support agent. Escalations go to {EMAIL}."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": f"Call me on {PHONE}; card {CARD}."},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,QUJD" + "4111111111111111"}},
                ],
            },
            {
                "role": "assistant",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "send", "arguments": f'{{"to": "{EMAIL}"}}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": f"sent to {EMAIL} with key {KEY}"},
        ],
    }


def anthropic_body() -> dict[str, Any]:
    return {
        "model": "claude-sonnet-5-5",
        "max_tokens": 100,
        "system": [{"type": "text", "text": f"Escalate to {EMAIL}."}],
        "messages": [
            {"role": "user", "content": f"My number is {PHONE}."},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": f"the user wrote {PHONE}", "signature": "sig"},
                    {"type": "tool_use", "id": "tu_1", "name": "lookup", "input": {"phone": PHONE, "n": [EMAIL, 3]}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "tu_1", "content": [{"type": "text", "text": EMAIL}]}
                ],
            },
        ],
    }


def test_only_the_text_the_model_reads_is_changed() -> None:
    body = openai_body()
    r = redact_body("openai", body, PiiSpec(action="mask"))
    dumped = orjson.dumps(body).decode()
    for value in (EMAIL, PHONE, CARD, KEY):
        assert value not in dumped
    assert body["messages"][1]["content"][0]["text"] == "Call me on [PHONE]; card [CREDIT_CARD]."
    assert body["messages"][1]["content"][1]["image_url"]["url"].endswith("4111111111111111")  # not text
    assert orjson.loads(body["messages"][2]["tool_calls"][0]["function"]["arguments"]) == {"to": "[EMAIL]"}
    assert body["model"] == "gpt-5.5" and body["messages"][2]["tool_calls"][0]["id"] == "call_1"
    assert dict(r.counts) == {"EMAIL": 3, "PHONE": 1, "CREDIT_CARD": 1, "SECRET": 1}


def test_anthropic_system_tool_use_and_results_but_not_thinking() -> None:
    body = anthropic_body()
    redact_body("anthropic", body, PiiSpec(action="mask"))
    assert body["system"][0]["text"] == "Escalate to [EMAIL]."
    assert body["messages"][0]["content"] == "My number is [PHONE]."
    thinking, tool_use = body["messages"][1]["content"]
    assert thinking["thinking"] == f"the user wrote {PHONE}"  # signed by the provider: untouched
    assert tool_use["input"] == {"phone": "[PHONE]", "n": ["[EMAIL]", 3]}
    assert body["messages"][2]["content"][0]["content"][0]["text"] == "[EMAIL]"


def test_block_names_the_types_never_the_values() -> None:
    body = openai_body()
    r = redact_body("openai", body, PiiSpec(action="mask", entities={"CREDIT_CARD": "block", "SECRET": "block"}))
    with pytest.raises(PiiBlocked) as info:
        r.check()
    assert info.value.types == ["CREDIT_CARD", "SECRET"]
    assert CARD not in str(info.value) and KEY not in str(info.value)


def test_hash_is_stable_per_tenant_and_tells_values_apart() -> None:
    spec = PiiSpec(action="hash")
    a1, a2, b = ({"x": f"{EMAIL} and other@acme-corp.io"} for _ in range(3))
    for body, tenant in ((a1, "a"), (a2, "a"), (b, "b")):
        policy = resolve(spec, None)
        assert policy is not None
        r = Redaction(policy, tenant, b"s" * 32)
        body["x"] = r.redact(body["x"])
    assert a1 == a2 and a1 != b
    first, second = a1["x"].split(" and ")
    assert first.startswith("[EMAIL_") and len(first) == len("[EMAIL_1a2b3c4d]") and first != second


def test_restore_reuses_placeholders_and_never_takes_the_clients_own() -> None:
    policy = resolve(PiiSpec(action="restore"), None)
    assert policy is not None
    r = Redaction(policy, "t")
    texts = [f"[EMAIL_1] is a literal; write to {EMAIL}", f"again {EMAIL}, then ops@acme-corp.io"]
    r.reserve(texts)
    out = [r.redact(t) for t in texts]
    assert out == ["[EMAIL_1] is a literal; write to [EMAIL_2]", "again [EMAIL_2], then [EMAIL_3]"]
    assert restore_text(out[1], r.originals) == texts[1]
    assert restore_text("[EMAIL_1] stays", r.originals) == "[EMAIL_1] stays"


def test_tenant_policy_overrides_the_defaults_per_field() -> None:
    config = parse_config(
        {
            "providers": {"o": {"schema": "openai"}},
            "pii": {"action": "mask", "entities": {"IP_ADDRESS": "allow"}, "responses": "off"},
            "tenants": {"acme": {"pii": {"entities": {"EMAIL": "restore"}, "on_error": "allow"}}},
        }
    )
    default = resolve(config.pii, None)
    acme = resolve(config.pii, config.tenants["acme"].pii)
    assert default is not None and acme is not None
    assert default.action("EMAIL") == "mask" and acme.action("EMAIL") == "restore"
    assert acme.action("IP_ADDRESS") == "allow" and acme.action("PHONE") == "mask"
    assert acme.on_error == "allow" and acme.responses == "off" and default.on_error == "block"
    assert resolve(None, None) is None


@pytest.mark.parametrize(
    ("data", "error"),
    [
        ({"action": "redact"}, "pii.action"),
        ({"entities": {"EMAILS": "mask"}}, "unknown entity type"),
        ({"custom": [{"name": "emp", "pattern": "E-\\d+"}]}, "bad entity name"),
        ({"custom": [{"name": "EMP", "pattern": "E-("}]}, "not a valid regular expression"),
        ({"custom": [{"name": "EMP", "pattern": "x*"}]}, "matches the empty string"),
        ({"custom": [{"name": "EMAIL", "pattern": "x+"}]}, "built-in entity type"),
        ({"custom": [{"name": "EMP", "pattern": "x+", "validator": "nope"}]}, "unknown validator"),
        ({"custom": [{"name": "EMP", "pattern": "x+", "validator": "no.such.module:f"}]}, "cannot be imported"),
        ({"responses": "redact"}, "pii.responses"),
    ],
)
def test_bad_pii_config_names_the_field(data: dict[str, Any], error: str) -> None:
    from extproc.config import ConfigError

    with pytest.raises(ConfigError) as info:
        parse_config({"providers": {"o": {"schema": "openai"}}, "pii": data})
    assert error in str(info.value)


def test_custom_detector_with_a_validator() -> None:
    spec = PiiSpec.model_validate(
        {
            "custom": [
                {"name": "EMPLOYEE_ID", "pattern": r"E-\d{6}"},
                {"name": "ACCOUNT", "pattern": r"\d{16}", "validator": "luhn"},
            ]
        }
    )
    policy = resolve(spec, None)
    assert policy is not None
    r = Redaction(policy, "t")
    assert r.redact("E-123456 paid from 4539578763621486 not 4539578763621487") == (
        "[EMPLOYEE_ID] paid from [ACCOUNT] not 4539578763621487"  # a custom detector wins an overlap
    )


def test_documentation_values_can_be_left_alone() -> None:
    text = "mail user@example.com or jane@acme-corp.io from 192.0.2.7 or 10.1.2.3"
    for ignore, expected in (
        (False, "mail [EMAIL] or [EMAIL] from [IP_ADDRESS] or [IP_ADDRESS]"),
        (True, "mail user@example.com or [EMAIL] from 192.0.2.7 or [IP_ADDRESS]"),
    ):
        policy = resolve(PiiSpec(ignore_documentation_values=ignore), None)
        assert policy is not None
        assert Redaction(policy, "t").redact(text) == expected


# -- responses ------------------------------------------------------------------------------------


def test_json_responses_get_values_back_in_text_and_tool_calls() -> None:
    originals = {"[EMAIL_1]": EMAIL, "[NAME_1]": 'Jane "J" Roe'}
    rw = Rewriter(originals)
    body: dict[str, Any] = {
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Writing to [EMAIL_1] for [NAME_1].",
                    "tool_calls": [{"function": {"name": "send", "arguments": '{"to": "[EMAIL_1]", "n": "[NAME_1]"}'}}],
                },
            }
        ]
    }
    assert rewrite_json("openai", body, rw)
    msg = body["choices"][0]["message"]
    assert msg["content"] == f'Writing to {EMAIL} for Jane "J" Roe.'
    assert orjson.loads(msg["tool_calls"][0]["function"]["arguments"]) == {"to": EMAIL, "n": 'Jane "J" Roe'}
    anthropic: dict[str, Any] = {
        "content": [{"type": "text", "text": "[EMAIL_1]"}, {"type": "tool_use", "input": {"a": ["[NAME_1]"]}}]
    }
    assert rewrite_json("anthropic", anthropic, rw)
    assert anthropic["content"][0]["text"] == EMAIL and anthropic["content"][1]["input"] == {"a": ['Jane "J" Roe']}


def openai_stream(pieces: list[str], tool_pieces: list[str]) -> list[SSEEvent]:
    events = [
        SSEEvent.make(
            orjson.dumps({"id": "c", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}).decode()
        )
    ]
    for p in pieces:
        events.append(
            SSEEvent.make(orjson.dumps({"id": "c", "choices": [{"index": 0, "delta": {"content": p}}]}).decode())
        )
    for p in tool_pieces:
        delta = {"tool_calls": [{"index": 0, "function": {"arguments": p}}]}
        events.append(SSEEvent.make(orjson.dumps({"id": "c", "choices": [{"index": 0, "delta": delta}]}).decode()))
    events.append(
        SSEEvent.make(
            orjson.dumps({"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}).decode()
        )
    )
    events.append(SSEEvent.make("[DONE]"))
    return events


def run_stream(schema: str, events: list[SSEEvent], rw: Rewriter, per_chunk: int = 1) -> list[SSEEvent]:
    sr = StreamRewriter(schema, rw)
    out: list[SSEEvent] = []
    for i in range(0, len(events), per_chunk):
        batch = copy.deepcopy(events[i : i + per_chunk])
        new, _ = sr.events(batch, i + per_chunk >= len(events))
        out.extend(new)
    return out


def openai_text(events: list[SSEEvent]) -> tuple[str, str]:
    content, args = "", ""
    for ev in events:
        if ev.data == "[DONE]":
            continue
        assert ev.data is not None
        chunk = orjson.loads(ev.data)  # every event stays valid JSON
        for choice in chunk["choices"]:
            delta = choice.get("delta", {})
            content += delta.get("content") or ""
            for call in delta.get("tool_calls") or ():
                args += call["function"]["arguments"]
    return content, args


def splits(text: str) -> list[list[str]]:
    """The text in two pieces at every offset, and in pieces of each size from 1 to 5."""
    out = [[text[:i], text[i:]] for i in range(len(text) + 1)]
    out += [[text[i : i + n] for i in range(0, len(text), n)] for n in range(1, 6)]
    return out


def test_streamed_placeholders_are_restored_at_every_split() -> None:
    originals = {"[EMAIL_1]": EMAIL, "[PHONE_12]": PHONE, "[NAME_1]": 'Jane "J" Roe'}
    text = "Hi [NAME_1], I'll write to [EMAIL_1] and call [PHONE_12]. [x] [EMAIL_9] [EMA"
    args = '{"to": "[EMAIL_1]", "who": "[NAME_1]"}'
    for pieces in splits(text):
        got, got_args = openai_text(run_stream("openai", openai_stream(pieces, splits(args)[7]), Rewriter(originals)))
        assert got == restore_text(text, originals), pieces
        assert orjson.loads(got_args) == {"to": EMAIL, "who": 'Jane "J" Roe'}
    for pieces in splits(args):
        _, got_args = openai_text(run_stream("openai", openai_stream(["x"], pieces), Rewriter(originals), per_chunk=3))
        assert orjson.loads(got_args) == {"to": EMAIL, "who": 'Jane "J" Roe'}, pieces


def test_a_placeholder_held_at_the_end_of_a_broken_stream_is_released() -> None:
    originals = {"[EMAIL_1]": EMAIL}
    events = openai_stream(["to [EMA", "IL_1"], [])[:-2]  # no finish chunk, no [DONE]
    got, _ = openai_text(run_stream("openai", events, Rewriter(originals), per_chunk=len(events)))
    assert got == "to [EMAIL_1"  # not a placeholder after all: released as written


def anthropic_stream(pieces: list[str], json_pieces: list[str]) -> list[SSEEvent]:
    def ev(kind: str, body: dict[str, Any]) -> SSEEvent:
        return SSEEvent.make(orjson.dumps({"type": kind, **body}).decode(), kind)

    events = [
        ev("message_start", {"message": {"id": "m", "content": []}}),
        ev("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
    ]
    events += [ev("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": p}}) for p in pieces]
    events += [
        ev("content_block_stop", {"index": 0}),
        ev(
            "content_block_start",
            {"index": 1, "content_block": {"type": "tool_use", "id": "t", "name": "f", "input": {}}},
        ),
    ]
    events += [
        ev("content_block_delta", {"index": 1, "delta": {"type": "input_json_delta", "partial_json": p}})
        for p in json_pieces
    ]
    events += [ev("content_block_stop", {"index": 1}), ev("message_delta", {"delta": {}}), ev("message_stop", {})]
    return events


def anthropic_text(events: list[SSEEvent]) -> tuple[str, str]:
    text, js = "", ""
    stopped: set[int] = set()
    for ev in events:
        assert ev.data is not None
        msg = orjson.loads(ev.data)
        if msg["type"] == "content_block_stop":
            stopped.add(msg["index"])
        if msg["type"] == "content_block_delta":
            assert msg["index"] not in stopped, "a delta after its block stopped"
            d = msg["delta"]
            text += d.get("text", "")
            js += d.get("partial_json", "")
    return text, js


def test_anthropic_streams_are_restored_before_each_block_stops() -> None:
    originals = {"[EMAIL_1]": EMAIL, "[NAME_1]": 'Jane "J" Roe'}
    text = "Dear [NAME_1], mail [EMAIL_1]"
    js = '{"to": "[EMAIL_1]", "who": "[NAME_1]"}'
    for pieces in splits(text):
        got, got_js = anthropic_text(run_stream("anthropic", anthropic_stream(pieces, [js]), Rewriter(originals)))
        assert got == f'Dear Jane "J" Roe, mail {EMAIL}', pieces
        assert orjson.loads(got_js) == {"to": EMAIL, "who": 'Jane "J" Roe'}
    for pieces in splits(js):
        _, got_js = anthropic_text(run_stream("anthropic", anthropic_stream(["x"], pieces), Rewriter(originals)))
        assert orjson.loads(got_js) == {"to": EMAIL, "who": 'Jane "J" Roe'}, pieces


def masker(spec: PiiSpec) -> Any:
    from extproc.config import GatewayConfig
    from extproc.stages.pii import PiiStage

    config = GatewayConfig.model_validate({"providers": {"o": {"schema": "openai"}}, "pii": spec.model_dump()})
    stage = PiiStage(config)
    policy = stage.policy_for("")
    assert policy is not None
    return stage._masker(policy)


def test_entities_the_model_writes_are_masked_at_every_split() -> None:
    mask = masker(PiiSpec(action="mask", responses="mask"))
    text = f"Reach Jane at {EMAIL} or call {PHONE}; her card is {CARD}, key {KEY}. Bye."
    expected = "Reach Jane at [EMAIL] or call [PHONE]; her card is [CREDIT_CARD], key [SECRET]. Bye."
    for pieces in splits(text):
        got, _ = openai_text(run_stream("openai", openai_stream(pieces, []), Rewriter({}, mask)))
        assert got == expected, pieces
    for pieces in splits(text)[::7]:
        got, _ = anthropic_text(run_stream("anthropic", anthropic_stream(pieces, ['{"a": 1}']), Rewriter({}, mask)))
        assert got == expected, pieces


def test_a_private_key_block_is_masked_whole_across_chunks() -> None:
    mask = masker(PiiSpec(action="mask", responses="mask"))
    pem = (
        "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\nBKcwggSjAgEAAoIBAQC7\n-----END PRIVATE KEY-----"
    )
    text = f"Here it is:\n{pem}\nKeep it safe."
    for pieces in splits(text)[::5]:
        got, _ = openai_text(run_stream("openai", openai_stream(pieces, []), Rewriter({}, mask)))
        assert got == "Here it is:\n[SECRET]\nKeep it safe.", pieces


def test_the_fast_path_leaves_events_without_placeholders_untouched() -> None:
    events = openai_stream(["plain ", "text"], [])
    out = run_stream("openai", events, Rewriter({"[EMAIL_1]": EMAIL}), per_chunk=len(events))
    assert [e.raw for e in out] == [e.raw for e in events]
    assert all(e.data == o.data for e, o in zip(events, out, strict=True))


def test_a_request_is_scanned_in_one_pass_but_never_across_texts() -> None:
    policy = resolve(PiiSpec(action="mask"), None)
    assert policy is not None
    r = Redaction(policy, "t")
    texts = [
        f"write {EMAIL}",
        "call +1 415 555",
        "0132 tomorrow",
        "-----BEGIN PRIVATE KEY-----\nMIIE",
        "abc\n-----END PRIVATE KEY-----",
        KEY,
    ]
    out = r.redact_all(texts, [False] * len(texts))
    assert out == ["write [EMAIL]", "call +1 415 555", "0132 tomorrow", texts[3], texts[4], "[SECRET]"]
    assert dict(r.counts) == {"EMAIL": 1, "SECRET": 1}


def test_embeddings_input_strings_are_scanned_and_token_ids_flagged() -> None:
    from extproc.pii.walk import embedding_tokens

    body: dict[str, Any] = {"model": "e", "input": ["mail a@b.io", "plain"]}
    assert [(key, owner[key]) for owner, key, _ in request_slots("openai", body)] == [(0, "mail a@b.io"), (1, "plain")]
    one: dict[str, Any] = {"model": "e", "input": "x"}
    assert [key for _, key, _ in request_slots("openai", one)] == ["input"]
    assert not embedding_tokens(body) and not embedding_tokens(one)
    assert embedding_tokens({"input": [[1, 2, 3]]}) and embedding_tokens({"input": [5, 6]})


def test_many_findings_are_all_kept_in_order() -> None:
    """20,000 addresses in one prompt (a contact list): every one found once, in order. Resolving
    overlaps compared each finding with every kept one before (quadratic: 8,000 took 1.8 s)."""
    from extproc.pii import detect

    text = " ".join(f"user{i}@acme-corp.io" for i in range(20_000))
    found = detect.default_detector().find(text)
    assert len(found) == 20_000
    assert all(f.type == "EMAIL" for f in found)
    assert all(a.end < b.start for a, b in itertools.pairwise(found))
    assert text[found[-1].start : found[-1].end] == "user19999@acme-corp.io"


_SECRETS = [
    "sk-ant-api03-" + "Ab3dE5fG7hJ9kL1mN3pQ5rS7",
    "sk-proj-" + "Zx8Cv6Bn4Mm2Ll0Kk9Jj7Hh5",
    "sk-" + "T3BlbkFJq8Zx7Cv6Bn5Mm4Ll",
    "sk_live_" + "4eC39HqLyjWDarjtT1zdp7dc",
    "rk_test_" + "51H8aF2eZvKYlo2C9xQ3",
    "AKIA" + "Z7Q3X9V2L5K8M1N4",
    "AIza" + "SyD8x7C6v5B4n3M2l1K0j9H8g7F6d5S4a3Q",
    "ghp_" + "aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3zA5",
    "glpat-" + "Xy7Wv5Ut3Sr1Qp9On7Ml",
    "xoxb-" + "123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx",
    "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
]


@pytest.mark.parametrize("secret", _SECRETS)
@pytest.mark.parametrize("where", ["alone", "start", "middle", "end", "glued before"])
def test_each_secret_kind_at_the_edges_of_the_text(secret: str, where: str) -> None:
    """The scan finds a secret where its prefix starts the text, ends it or sits in prose, and not
    when it is part of a longer token (one pass per group of prefixes; each must start at a hit)."""
    from extproc.pii.detect import default_detector

    text = {
        "alone": secret,
        "start": secret + " is the key",
        "middle": "the key " + secret + " works",
        "end": "the key is " + secret,
        "glued before": "x" + secret + " is not one",
    }[where]
    found = [(f.type, text[f.start : f.end]) for f in default_detector().find(text) if f.type == "SECRET"]
    if where == "glued before":
        assert found == [], found
    else:
        assert found == [("SECRET", secret)]


@pytest.mark.parametrize("text", ["Bearer {t}", "auth: bearer {t}", "BEARER {t} done", "Authorization: Bearer {t}"])
def test_bearer_tokens_in_every_case_and_at_the_start(text: str) -> None:
    from extproc.pii.detect import default_detector

    token = "mF_9.B5f-4.1JqM3xYz8Wq2Lr7Tp0"
    text = text.format(t=token)
    found = [text[f.start : f.end] for f in default_detector().find(text) if f.type == "SECRET"]
    assert found == [token]
    assert default_detector().find(text.replace("earer", "earers").replace("EARER", "EARERS")) == []


def test_context_windows_match_as_the_case_insensitive_patterns_do() -> None:
    """The context words near a number are looked for in a lowercased window with their word
    boundaries moved after the first letter (detect._Near): for every window, at every offset of
    the labeled corpora and this README, the answer is the one the (?i) pattern gives on the text."""
    import random
    import re
    from pathlib import Path

    from extproc.pii import detect

    root = Path(__file__).resolve().parents[2]
    texts = [(root / "README.md").read_text()]
    for corpus in ("tests/pii_corpus", "tests/pii_holdout"):
        for path in sorted((root / corpus).glob("*.jsonl")):
            texts += [orjson.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]
    text = "\n".join(texts)
    text += " Tel: 1 TEL. Call/SMS Ring, SSN: ss# SocSec iTIN TIN; Téléphone Número de Seguro Social NUMER 1"
    rng = random.Random(5)
    digits = [m.start() for m in re.finditer(r"\d[\d -]{6,}", text)]  # where numbers start: the windows asked about
    offsets = sorted({rng.randrange(len(text)) for _ in range(1500)} | set(rng.sample(digits, min(1500, len(digits)))))
    nears = [(detect._SSN_CONTEXT, 300, 80), (detect._PHONE_CONTEXT, 60, 0), (detect._NOT_PHONE_BEFORE, 24, 0)]
    nears += [(detect._VERSION_BEFORE, 16, 0), (detect._IBAN_NEAR, 40, 0)]
    for near, before, after in nears:
        plain = re.compile(near.pattern)
        hits = 0
        for at in offsets:
            a, b = max(0, at - before), min(len(text), at + after)
            want = plain.search(text, a, b) is not None
            assert near.search(text, a, b) is want, (near.pattern[:40], text[a:b])
            hits += want
        assert hits > 0, near.pattern[:40]  # the comparison saw matches, not only misses


def _ibans() -> list[str]:
    """Candidates of every registered country: valid ones (random BBANs of the registered format,
    check digits computed), and each mutated the ways a typo, a wrong format or odd digits would."""
    import random
    import re
    from importlib import resources

    from stdnum import iban as stdnum_iban

    rng = random.Random(97)
    pools = {"n": "0123456789", "a": "ABCDEFGHIJKLMNOPQRSTUVWXYZ", "c": "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"}
    out: list[str] = []
    registry = resources.files("stdnum").joinpath("iban.dat").read_text(encoding="utf-8")
    for country, bban_format in re.findall(r'^([A-Z]{2}) .*bban="([^"]+)"', registry, re.M):
        for _ in range(6):
            parts = re.findall(r"(\d+)!([nac])", bban_format)
            bban = "".join(rng.choice(pools[kind]) for count, kind in parts for _ in range(int(count)))
            valid = country + stdnum_iban.calc_check_digits(country + "00" + bban) + bban
            out.append(valid)
            k = rng.randrange(4, len(valid))
            flipped = "7" if valid[k] != "7" else "3"
            out += [
                valid[:k] + flipped + valid[k + 1 :],  # a typo (a digit where a letter was: a format error)
                valid[:2] + valid[3] + valid[2] + valid[4:],  # check digits swapped
                valid[:4] + valid[5] + valid[4] + valid[6:],  # two characters swapped
                valid[:-1],  # one short
                valid + "0",  # one long
                valid[:4] + "X" + valid[5:],  # a letter where the format may want a digit
                valid[:2] + "\u0661" + valid[3:],  # an Arabic-Indic digit among the check digits
                valid[:6] + "\u0663" + valid[7:],  # ... and in the BBAN
                valid[:5] + "\u00c9" + valid[6:],  # a non-ASCII letter
                "ZZ" + valid[2:],  # no such country
            ]
    return out


def test_the_iban_check_answers_as_python_stdnum_does() -> None:
    """The detector's own IBAN check (a fast path) against python-stdnum's, on every registered country."""
    from stdnum import iban as stdnum_iban

    from extproc.pii import detect

    candidates = [c for c in _ibans() if c.upper() == c]
    answers = [(c, detect.iban_valid(c), stdnum_iban.is_valid(c, check_country=False)) for c in candidates]
    assert [a for a in answers if a[1] != a[2]] == []
    # The table exercises both answers, for many countries.
    assert sum(a[1] for a in answers) > 500 and sum(not a[1] for a in answers) > 3000


@pytest.mark.parametrize("keep", [False, True])
def test_the_phone_digit_normalizer_answers_as_libphonenumbers_own(keep: bool) -> None:
    """The detector replaces libphonenumber's digit normalizer (a fast path for ASCII); parse must
    still see exactly what the library's own would give it."""
    from phonenumbers import phonenumberutil

    from extproc.pii import detect

    assert phonenumberutil.normalize_digits_only is detect._normalize_digits_only
    samples = [
        "".join(chr(c) for c in range(128)),
        "+1 (415) 555-0132 ext. 7",
        "0049 30 123456-78",
        "",
        "\u0660\u0661\u0662-\u0663\u0664",  # Arabic-Indic digits
        "\uff10\uff11\uff12 \uff13",  # fullwidth digits
        "12\u00b3 4\u00b2",  # superscripts: digits to unicodedata, not decimals
        "\u0967\u0968\u0969 4567",  # Devanagari
        "tel: 030\u00a012345",
    ]
    for text in samples:
        assert detect._normalize_digits_only(text, keep) == detect._ORIGINAL_DIGITS_ONLY(text, keep), text


def _digit_strings() -> list[str]:
    """Card- and SSN-length digit strings: random, Luhn-valid, edge values and non-ASCII digits."""
    import random

    from stdnum import luhn

    rng = random.Random(10)
    out = ["", "0", "00", "79927398713", "4111111111111111", "4111111111111112", "078051120", "457555462"]
    out += ["219099999", "000123456", "666123456", "900123456", "123001234", "123450000", "123456789"]
    for n in (8, 9, 10, 12, 13, 14, 15, 16, 17, 18, 19):
        for _ in range(150):
            body = "".join(rng.choice("0123456789") for _ in range(n - 1))
            out += [body + rng.choice("0123456789"), body + luhn.calc_check_digit(body)]
    out += [s[:3] + "\u0663" + s[4:] for s in out[20:200]]  # an Arabic-Indic digit
    out += [s[:2] + "\uff15" + s[3:] for s in out[20:60]]  # a fullwidth digit
    out += ["12345678a", "1234 5678", "-12345678"]
    return out


def test_the_luhn_and_ssn_checks_answer_as_python_stdnum_does() -> None:
    from stdnum import luhn
    from stdnum.us import ssn

    from extproc.pii import detect

    samples = _digit_strings()
    assert [s for s in samples if detect.luhn_valid(s) != luhn.is_valid(s)] == []
    nine = [s for s in samples if len(s) == 9]
    assert [s for s in nine if detect.ssn_valid(s) != ssn.is_valid(s)] == []
    # Both answers occur, and the voided numbers are stdnum's.
    assert sum(map(detect.luhn_valid, samples)) > 1000 and sum(map(detect.ssn_valid, nine)) > 100
    assert {n[:3] + "-" + n[3:5] + "-" + n[5:] for n in detect._SSN_VOID} == ssn._ssn_blacklist
