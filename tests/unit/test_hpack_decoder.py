"""The native transport's HPACK decoder: the RFC's examples, and the `hpack` library as the oracle on
random header lists, random blocks and random bytes."""

from __future__ import annotations

import random

import hpack
import pytest
from hpack.huffman import HuffmanEncoder
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH

from extproc.transport.hpack_decoder import Decoder, HpackError, decode_huffman

H = Decoder  # shorter in tables below
LIMIT = 64 << 10

# RFC 7541 Appendix C.3 (without Huffman) and C.4 (with): three requests on one connection each.
RFC_REQUESTS = [
    (
        [
            "828684410f7777772e6578616d706c652e636f6d",
            "828684be58086e6f2d6361636865",
            "828785bf400a637573746f6d2d6b65790c637573746f6d2d76616c7565",
        ],
    ),
    (
        [
            "828684418cf1e3c2e5f23a6ba0ab90f4ff",
            "828684be5886a8eb10649cbf",
            "828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf",
        ],
    ),
]
RFC_HEADERS = [
    [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"www.example.com")],
    [
        (b":method", b"GET"),
        (b":scheme", b"http"),
        (b":path", b"/"),
        (b":authority", b"www.example.com"),
        (b"cache-control", b"no-cache"),
    ],
    [
        (b":method", b"GET"),
        (b":scheme", b"https"),
        (b":path", b"/index.html"),
        (b":authority", b"www.example.com"),
        (b"custom-key", b"custom-value"),
    ],
]


@pytest.mark.parametrize(("blocks",), RFC_REQUESTS, ids=["C.3 plain", "C.4 Huffman"])
def test_the_rfcs_request_examples(blocks: list[str]) -> None:
    d = Decoder(LIMIT)
    for block, want in zip(blocks, RFC_HEADERS, strict=True):
        assert d.decode(bytes.fromhex(block)) == want
    # After C.x.3 the dynamic table holds three entries, newest first (RFC: size 164).
    assert list(d.table) == [
        (b"custom-key", b"custom-value"),
        (b"cache-control", b"no-cache"),
        (b":authority", b"www.example.com"),
    ]
    assert d.size == 164


def _library(blocks: list[bytes]) -> list[list[tuple[bytes, bytes]] | str]:
    d = hpack.Decoder()
    d.max_header_list_size = LIMIT
    out: list[list[tuple[bytes, bytes]] | str] = []
    for b in blocks:
        try:
            out.append([(bytes(n), bytes(v)) for n, v in d.decode(b, raw=True)])
        except Exception:
            out.append("error")
            break
    return out


def _ours(blocks: list[bytes]) -> list[list[tuple[bytes, bytes]] | str]:
    d = Decoder(LIMIT)
    out: list[list[tuple[bytes, bytes]] | str] = []
    for b in blocks:
        try:
            out.append(d.decode(b))
        except HpackError:
            out.append("error")
            break
    return out


NAMES = [b":method", b":path", b"content-type", b"traceparent", b"x-request-id", b"x-custom", b"set-cookie"]


def _value(rng: random.Random) -> bytes:
    kind = rng.randrange(4)
    if kind == 0:
        return b"00-%032x-%016x-01" % (rng.getrandbits(128), rng.getrandbits(64))
    if kind == 1:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 40)))
    if kind == 2:
        return b"x" * rng.randrange(0, 3000)  # large: evicts, or exceeds the table
    return rng.choice([b"POST", b"application/grpc", b"", b"/envoy.service.ext_proc.v3.ExternalProcessor/Process"])


@pytest.mark.parametrize("seed", range(40))
def test_random_header_lists_decode_as_the_library_decodes_them(seed: int) -> None:
    rng = random.Random(seed)
    enc = hpack.Encoder()
    blocks = []
    for _ in range(30):
        if rng.random() < 0.1:
            enc.header_table_size = rng.choice([0, 256, 1024, 4096])  # a size update leads the next block
        headers = [(rng.choice(NAMES), _value(rng)) for _ in range(rng.randrange(1, 12))]
        sensitive = rng.random() < 0.2
        encoded = [hpack.NeverIndexedHeaderTuple(n, v) if sensitive else (n, v) for n, v in headers]
        blocks.append(enc.encode(encoded, huffman=rng.random() < 0.7))
    ours = _ours(blocks)
    assert "error" not in ours
    assert ours == _library(blocks)


@pytest.mark.parametrize("seed", range(300))
def test_random_bytes_fail_or_decode_as_in_the_library(seed: int) -> None:
    rng = random.Random(seed)
    blocks = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 30))) for _ in range(3)]
    assert _ours(blocks) == _library(blocks)


def test_huffman_round_trips_every_byte_and_rejects_bad_padding() -> None:
    enc = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH)
    for b in range(256):
        assert decode_huffman(enc.encode(bytes([b]) * 3)) == bytes([b]) * 3
    rng = random.Random(7)
    for _ in range(2000):
        s = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 50)))
        assert decode_huffman(enc.encode(s)) == s
    with pytest.raises(HpackError):
        decode_huffman(b"\xff\xff\xff\xff")  # EOS inside: invalid
    with pytest.raises(HpackError):
        decode_huffman(b"\x00")  # '0' (5 bits) then padding 000: padding must be ones


@pytest.mark.parametrize(
    ("block", "why"),
    [
        ("80", "index 0"),
        ("c0", "index past the tables"),
        ("3fe21f", "size update above 4096"),
        ("8220", "size update after a field"),
        ("4005616161", "truncated value"),
        ("bf", "truncated integer"),
        ("ff8080808080808001", "integer too large"),
    ],
)
def test_malformed_blocks_raise(block: str, why: str) -> None:
    with pytest.raises(HpackError):
        Decoder(LIMIT).decode(bytes.fromhex(block))


def test_the_header_list_bound_holds() -> None:
    block = hpack.Encoder().encode([(b"x-big", b"v" * 900)] * 2)
    assert len(Decoder(2000).decode(block)) == 2
    with pytest.raises(HpackError):
        Decoder(1800).decode(block)  # 2 x (5 + 900 + 32) = 1874


def test_a_size_update_evicts_and_a_zero_table_holds_nothing() -> None:
    enc = hpack.Encoder()
    d = Decoder(LIMIT)
    d.decode(enc.encode([(b"x-a", b"1"), (b"x-b", b"2")]))
    assert len(d.table) == 2
    enc.header_table_size = 0
    d.decode(enc.encode([(b"x-c", b"3")]))
    assert d.max_size == 0 and not d.table and d.size == 0
