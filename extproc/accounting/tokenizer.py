"""Offline token counts for usage estimates.

When a client disconnects or a provider stream breaks before the provider reported usage, the
gateway records an estimate (`UsageRecord.estimated`): input tokens from the request body, output
tokens from the text streamed so far. This module does the counting, with no network access ever.

Exact or estimate, per model (`is_exact`):

- OpenAI models: exact text counts with OpenAI's own BPE (tiktoken's Rust core) on the official
  vocabularies, shipped in `data/` (o200k_base for gpt-4o / gpt-4.1 / gpt-4.5 / gpt-5* / o1 / o3 / o4
  / gpt-oss, cl100k_base for gpt-4 / gpt-3.5 / text-embedding-3). The files are byte-identical to
  OpenAI's published ones: their SHA-256 is checked on load against the hashes tiktoken pins (see
  data/README.md). tiktoken would download them on first use; we never call its loader.
  Message framing and tool definitions are estimates (OpenAI documents them only by example).
- Unknown non-Claude models: the o200k count, marked inexact.
- Claude models: Anthropic publishes no tokenizer, so an estimate:
  `max(o200k tokens, ceil(chars / 3.5))`, the second term being Anthropic's documented rule of
  thumb ("a token approximately represents 3.5 English characters", glossary), the first guarding
  scripts where that rule undercounts badly (CJK, emoji). Models on Anthropic's newer tokenizer
  (Claude Opus 4.7 and later, the Claude 5 families) count "approximately 30% more tokens" for the
  same text (Claude Haiku 5.5 overview), so their estimate is scaled by 1.3. The bias is upward on
  purpose: an estimate feeds budgets, where undercounting is the costlier error.

Images are never counted from their base64 bytes: a fixed documented estimate per image (see
`OPENAI_IMAGE_TOKENS_*`, `ANTHROPIC_IMAGE_TOKENS`).

Cost, measured on the 2-core reference machine: loading a vocabulary (gunzip, SHA-256, parse, build
the BPE) takes ~0.4 s and ~75 MB RSS for o200k_base, ~0.2 s and ~35 MB for cl100k_base, the first
time it is needed, once per process; call `warm_up()` at startup to move that off the first aborted
stream. Counting then costs ~0.3-0.4 ms of one core per 1,000 tokens of English prose or Python
(~0.2 ms for CJK text); the Claude estimate costs the same (it is an o200k count). The Rust encoder
releases the GIL, so a caller on the event loop should run `estimate_input_tokens` in a thread
(`asyncio.to_thread`) for large bodies: a 32 MiB body is up to ~8M tokens, i.e. ~3 s of CPU.
"""

from __future__ import annotations

import base64
import functools
import gzip
import hashlib
import json
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any, Final, Literal

import tiktoken

O200K: Final = "o200k_base"
CL100K: Final = "cl100k_base"

# OpenAI chat format (OpenAI cookbook, "How to count tokens with tiktoken", num_tokens_from_messages):
# every message costs 3 tokens of framing plus its role, content and name (+1 for a name), and every
# reply is primed with <|start|>assistant<|message|> (3 tokens).
OPENAI_TOKENS_PER_MESSAGE: Final = 3
OPENAI_TOKENS_PER_NAME: Final = 1
OPENAI_REPLY_PRIMING: Final = 3
# Tool definitions (same cookbook, num_tokens_for_tools): per function 7 tokens (o200k models; 10 on
# cl100k models), 3 to open the properties, 3 per property, enums -3 + 3 per item, and 12 at the end.
OPENAI_FUNC_INIT: Final = {O200K: 7, CL100K: 10}
OPENAI_PROP_INIT: Final = 3
OPENAI_PROP_KEY: Final = 3
OPENAI_ENUM_INIT: Final = -3
OPENAI_ENUM_ITEM: Final = 3
OPENAI_FUNC_END: Final = 12
# Tool calls in assistant messages: name + arguments + this much framing (an assumption: the
# cookbook does not cover them).
OPENAI_TOKENS_PER_TOOL_CALL: Final = 3
# Images (OpenAI vision guide, "Calculating costs"): detail "low" is a flat 85 tokens; "high"/"auto"
# depends on the size, which we do not decode: we charge the guide's 1024x1024 example (4 tiles x 170
# + 85 = 765).
OPENAI_IMAGE_TOKENS_LOW: Final = 85
OPENAI_IMAGE_TOKENS_HIGH: Final = 765

# Anthropic (Messages API). Images: tokens = width x height / 750, and images over ~1.15 megapixels
# are scaled down first, so a full-size image is ~1,600 tokens (vision guide): we charge that cap.
ANTHROPIC_IMAGE_TOKENS: Final = 1600
# PDF documents: "1,500-3,000 tokens per page" (PDF support guide); we cannot count pages without
# parsing the PDF, so a base64/URL document is charged as one dense page.
ANTHROPIC_DOCUMENT_TOKENS: Final = 3000
# Framing per message: undocumented; assumed the same as OpenAI's.
ANTHROPIC_TOKENS_PER_MESSAGE: Final = 3
# With tools, Anthropic adds a tool-use system prompt (pricing page, "Tool use pricing": 346 tokens for
# tool_choice auto/none, 313 for any/tool on the Claude 4 models).
ANTHROPIC_TOOLS_PROMPT_AUTO: Final = 346
ANTHROPIC_TOOLS_PROMPT_FORCED: Final = 313

# Anthropic's "3.5 characters per token", as a fraction: ceil(chars * 2 / 7).
_CLAUDE_CHARS_NUM: Final = 2
_CLAUDE_CHARS_DEN: Final = 7
# The newer Claude tokenizer's ~30% more tokens, as a fraction: ceil(n * 13 / 10).
_CLAUDE_NEW_NUM: Final = 13
_CLAUDE_NEW_DEN: Final = 10


@dataclass(frozen=True, slots=True)
class _Vocabulary:
    file: str
    sha256: str
    ranks: int
    pat_str: str
    special_tokens: Mapping[str, int]


# pat_str and special tokens as in tiktoken 0.14's tiktoken_ext/openai_public.py (MIT); the SHA-256
# is the expected_hash tiktoken pins for the same file. tests/unit/test_tokenizer.py checks all three
# against the installed tiktoken.
_VOCABULARIES: Final[Mapping[str, _Vocabulary]] = {
    O200K: _Vocabulary(
        file="o200k_base.tiktoken.gz",
        sha256="446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        ranks=199_998,
        pat_str="|".join(
            [
                r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
                r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
                r"""\p{N}{1,3}""",
                r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
                r"""\s*[\r\n]+""",
                r"""\s+(?!\S)""",
                r"""\s+""",
            ]
        ),
        special_tokens={"<|endoftext|>": 199999, "<|endofprompt|>": 200018},
    ),
    CL100K: _Vocabulary(
        file="cl100k_base.tiktoken.gz",
        sha256="223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        ranks=100_256,
        pat_str="|".join(
            [
                r"""'(?i:[sdmt]|ll|ve|re)""",
                r"""[^\r\n\p{L}\p{N}]?+\p{L}++""",
                r"""\p{N}{1,3}+""",
                r""" ?[^\s\p{L}\p{N}]++[\r\n]*+""",
                r"""\s++$""",
                r"""\s*[\r\n]""",
                r"""\s+(?!\S)""",
                r"""\s""",
            ]
        ),
        special_tokens={
            "<|endoftext|>": 100257,
            "<|fim_prefix|>": 100258,
            "<|fim_middle|>": 100259,
            "<|fim_suffix|>": 100260,
            "<|endofprompt|>": 100276,
        },
    ),
}

# Model name prefix -> encoding, first match wins (so "gpt-4o" before "gpt-4"). A prefix matches the
# whole name or a name continuing with "-", ".", ":", "@" or "/" (gpt-4o-2024-08-06, gpt-5.4-mini).
# Mirrors tiktoken's MODEL_PREFIX_TO_ENCODING for the encodings shipped here.
_MODEL_PREFIXES: Final[tuple[tuple[str, str], ...]] = (
    ("gpt-4o", O200K),
    ("chatgpt-4o", O200K),
    ("gpt-4.1", O200K),
    ("gpt-4.5", O200K),
    ("gpt-5", O200K),
    ("gpt-oss", O200K),  # o200k_harmony: o200k's ranks plus chat specials, same text counts
    ("o1", O200K),
    ("o3", O200K),
    ("o4", O200K),
    ("gpt-4", CL100K),
    ("gpt-3.5", CL100K),
    ("gpt-35", CL100K),  # Azure deployment names
    ("text-embedding-3", CL100K),
    ("text-embedding-ada-002", CL100K),
)
_BOUNDARY: Final = frozenset("-.:@/")

# Claude model version: claude-<family>-<major>[-<minor>] or claude-<major>[-<minor>]-<family>; a
# trailing 8-digit date is not a minor version.
_CLAUDE_FAMILY_FIRST: Final = re.compile(r"claude-(?:opus|sonnet|haiku)-(\d{1,2})(?:[-.](\d{1,2})(?!\d))?")
_CLAUDE_VERSION_FIRST: Final = re.compile(r"claude-(\d{1,2})(?:[-.](\d{1,2}))?-(?:opus|sonnet|haiku)")
_CLAUDE_NEW_TOKENIZER_FAMILIES: Final = ("claude-fable", "claude-mythos")

_lock = threading.Lock()
_loaded: dict[str, tiktoken.Encoding] = {}


class TokenizerDataError(RuntimeError):
    """A shipped vocabulary file is missing or corrupt (the package was built or installed wrong)."""


def read_ranks(name: str) -> dict[bytes, int]:
    """The shipped vocabulary's ranks, checked against its pinned SHA-256."""
    vocab = _VOCABULARIES[name]
    path = resources.files(__package__ or "extproc.accounting") / "data" / vocab.file
    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise TokenizerDataError(f"cannot read tokenizer vocabulary {vocab.file}: {err}") from err
    if hashlib.sha256(raw).hexdigest() != vocab.sha256:
        raise TokenizerDataError(f"tokenizer vocabulary {vocab.file} does not match its pinned SHA-256")
    ranks: dict[bytes, int] = {}
    for line in raw.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    if len(ranks) != vocab.ranks:
        raise TokenizerDataError(f"tokenizer vocabulary {vocab.file}: {len(ranks)} ranks, expected {vocab.ranks}")
    return ranks


def _load(name: str) -> tiktoken.Encoding:
    vocab = _VOCABULARIES[name]
    ranks = read_ranks(name)
    enc = tiktoken.Encoding(
        name, pat_str=vocab.pat_str, mergeable_ranks=ranks, special_tokens=dict(vocab.special_tokens)
    )
    # The Rust core keeps its own copy of the ranks; tiktoken keeps the Python dict only to pickle
    # the encoding, which the gateway never does. Dropping it saves ~32 MB of the ~76 MB o200k costs.
    enc._mergeable_ranks = {}
    return enc


def get_encoding(name: str) -> tiktoken.Encoding:
    """The named shipped encoding (o200k_base or cl100k_base), loaded on first use, once per process;
    safe to call from any thread."""
    enc = _loaded.get(name)
    if enc is None:
        if name not in _VOCABULARIES:
            raise KeyError(f"unknown encoding {name!r}; shipped: {', '.join(_VOCABULARIES)}")
        with _lock:
            enc = _loaded.get(name)
            if enc is None:
                enc = _load(name)
                _loaded[name] = enc
    return enc


def warm_up(encodings: Iterable[str] = (O200K,)) -> None:
    """Load the encodings now (at startup) instead of on the first aborted stream. o200k_base by
    default (every current model and the Claude estimate); cl100k_base (~35 MB) only serves gpt-4 /
    gpt-3.5, so it is left to load on first use unless named."""
    for name in encodings:
        get_encoding(name)


@functools.lru_cache(maxsize=4096)
def _normalize(model: str) -> str:
    name = model.strip().lower()
    return name.removeprefix("ft:")


@functools.lru_cache(maxsize=4096)
def _openai_encoding(model: str) -> str | None:
    name = _normalize(model)
    for prefix, encoding in _MODEL_PREFIXES:
        if name.startswith(prefix) and (len(name) == len(prefix) or name[len(prefix)] in _BOUNDARY):
            return encoding
    return None


@functools.lru_cache(maxsize=4096)
def _is_claude(model: str) -> bool:
    return "claude" in _normalize(model)


@functools.lru_cache(maxsize=4096)
def _claude_new_tokenizer(model: str) -> bool:
    """Whether a Claude model uses Anthropic's newer tokenizer (Opus 4.7 and later, Claude 5).
    Names that cannot be read count as new: the larger estimate."""
    name = _normalize(model)
    if any(f in name for f in _CLAUDE_NEW_TOKENIZER_FAMILIES):
        return True
    m = _CLAUDE_FAMILY_FIRST.search(name) or _CLAUDE_VERSION_FIRST.search(name)
    if m is None:
        return True
    version = (int(m.group(1)), int(m.group(2) or 0))
    return version >= (4, 7)


def encoding_for_model(model: str) -> str:
    """The encoding whose counts are used for `model`: its own for known OpenAI models, o200k_base
    otherwise (the basis of the Claude estimate too)."""
    return _openai_encoding(model) or O200K


def is_exact(model: str) -> bool:
    """Whether text counts for `model` are the provider's own (known OpenAI models), not estimates.
    Message framing, tools and images are estimates for every model."""
    return not _is_claude(model) and _openai_encoding(model) is not None


def _encode_count(text: str, encoding: str) -> int:
    # encode_ordinary: special-token text such as "<|endoftext|>" counts as the plain text it is,
    # as it does in API request content. It also replaces lone surrogates instead of raising.
    return len(get_encoding(encoding).encode_ordinary(text))


def count_tokens(text: str, model: str) -> int:
    """Tokens in `text` for `model`: exact for known OpenAI models, an estimate otherwise (see the
    module docstring)."""
    if not text:
        return 0
    if not _is_claude(model):
        return _encode_count(text, encoding_for_model(model))
    base = max(_encode_count(text, O200K), -(-len(text) * _CLAUDE_CHARS_NUM // _CLAUDE_CHARS_DEN))
    if _claude_new_tokenizer(model):
        return -(-base * _CLAUDE_NEW_NUM // _CLAUDE_NEW_DEN)
    return base


def _json_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)
    except (TypeError, ValueError):
        return str(value)


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _dicts(value: Any) -> list[dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


# ---- OpenAI Chat Completions ----------------------------------------------------------------


def _openai_content(content: Any, model: str) -> int:
    if isinstance(content, str):
        return count_tokens(content, model)
    total = 0
    for part in _dicts(content):
        kind = part.get("type")
        if kind in ("text", "input_text", "output_text"):
            total += count_tokens(_str(part.get("text")), model)
        elif kind == "refusal":
            total += count_tokens(_str(part.get("refusal")), model)
        elif kind in ("image_url", "input_image"):
            image = part.get("image_url")
            detail = image.get("detail") if isinstance(image, dict) else part.get("detail")
            total += OPENAI_IMAGE_TOKENS_LOW if detail == "low" else OPENAI_IMAGE_TOKENS_HIGH
        # input_audio / file parts: billed by the provider on their own meters; not estimated here.
    return total


def _openai_function_call(call: Any, model: str) -> int:
    if not isinstance(call, dict):
        return 0
    return (
        OPENAI_TOKENS_PER_TOOL_CALL
        + count_tokens(_str(call.get("name")), model)
        + count_tokens(_json_text(call.get("arguments", "")), model)
    )


def _openai_message(message: dict[str, Any], model: str) -> int:
    total = OPENAI_TOKENS_PER_MESSAGE + count_tokens(_str(message.get("role")), model)
    total += _openai_content(message.get("content"), model)
    name = message.get("name")
    if isinstance(name, str) and name:
        total += count_tokens(name, model) + OPENAI_TOKENS_PER_NAME
    for call in _dicts(message.get("tool_calls")):
        total += _openai_function_call(call.get("function"), model)
    if "function_call" in message:
        total += _openai_function_call(message.get("function_call"), model)
    total += count_tokens(_str(message.get("tool_call_id")), model)
    return total


def _openai_property(name: str, schema: Any, model: str) -> int:
    if not isinstance(schema, dict):
        return OPENAI_PROP_KEY + count_tokens(name, model)
    total = OPENAI_PROP_KEY
    enum = schema.get("enum")
    if isinstance(enum, list):
        total += OPENAI_ENUM_INIT
        for item in enum:
            total += OPENAI_ENUM_ITEM + count_tokens(_json_text(item), model)
    description = _str(schema.get("description")).removesuffix(".")
    total += count_tokens(f"{name}:{_json_text(schema.get('type', ''))}:{description}", model)
    # Nested schemas (objects, arrays of objects, anyOf, ...) are outside the cookbook's method:
    # their JSON text is counted instead.
    nested = {k: v for k, v in schema.items() if k not in ("type", "description", "enum")}
    if nested:
        total += count_tokens(_json_text(nested), model)
    return total


def _openai_tools(tools: Any, functions: Any, model: str) -> int:
    definitions = [t.get("function") for t in _dicts(tools)] + list(_dicts(functions))
    definitions = [d for d in definitions if isinstance(d, dict)]
    if not definitions:
        return 0
    func_init = OPENAI_FUNC_INIT[encoding_for_model(model)]
    total = 0
    for function in definitions:
        description = _str(function.get("description")).removesuffix(".")
        total += func_init + count_tokens(f"{_str(function.get('name'))}:{description}", model)
        parameters = function.get("parameters")
        properties = parameters.get("properties") if isinstance(parameters, dict) else None
        if isinstance(properties, dict) and properties:
            total += OPENAI_PROP_INIT
            for key, schema in properties.items():
                total += _openai_property(str(key), schema, model)
    return total + OPENAI_FUNC_END


def _estimate_openai(body: Mapping[str, Any], model: str) -> int:
    messages = _dicts(body.get("messages"))
    total = sum(_openai_message(m, model) for m in messages)
    if messages:
        total += OPENAI_REPLY_PRIMING
    return total + _openai_tools(body.get("tools"), body.get("functions"), model)


# ---- Anthropic Messages ---------------------------------------------------------------------


def _anthropic_blocks(content: Any, model: str) -> int:
    if isinstance(content, str):
        return count_tokens(content, model)
    total = 0
    for block in _dicts(content):
        kind = block.get("type")
        if kind == "text":
            total += count_tokens(_str(block.get("text")), model)
        elif kind == "image":
            total += ANTHROPIC_IMAGE_TOKENS
        elif kind == "document":
            source = block.get("source")
            source_type = source.get("type") if isinstance(source, dict) else None
            if isinstance(source, dict) and source_type == "text":
                total += count_tokens(_str(source.get("data")), model)
            elif isinstance(source, dict) and source_type == "content":
                total += _anthropic_blocks(source.get("content"), model)
            else:
                total += ANTHROPIC_DOCUMENT_TOKENS
        elif kind in ("tool_use", "server_tool_use"):
            total += count_tokens(_str(block.get("name")), model)
            total += count_tokens(_json_text(block.get("input", {})), model)
        elif kind == "tool_result":
            total += _anthropic_blocks(block.get("content"), model)
        elif kind == "thinking":
            total += count_tokens(_str(block.get("thinking")), model)
        # redacted_thinking (opaque), search results and other server blocks: not estimated.
    return total


def _anthropic_tools(tools: Any, tool_choice: Any, model: str) -> int:
    definitions = _dicts(tools)
    if not definitions:
        return 0
    forced = isinstance(tool_choice, dict) and tool_choice.get("type") in ("any", "tool")
    total = ANTHROPIC_TOOLS_PROMPT_FORCED if forced else ANTHROPIC_TOOLS_PROMPT_AUTO
    for tool in definitions:
        total += count_tokens(_str(tool.get("name")), model)
        total += count_tokens(_str(tool.get("description")), model)
        if "input_schema" in tool:
            total += count_tokens(_json_text(tool.get("input_schema")), model)
    return total


def _estimate_anthropic(body: Mapping[str, Any], model: str) -> int:
    model = model or "claude"
    total = _anthropic_blocks(body.get("system"), model)
    for message in _dicts(body.get("messages")):
        total += ANTHROPIC_TOKENS_PER_MESSAGE + _anthropic_blocks(message.get("content"), model)
    return total + _anthropic_tools(body.get("tools"), body.get("tool_choice"), model)


def estimate_input_tokens(
    schema: Literal["openai", "anthropic"] | str, body: Mapping[str, Any], model: str | None = None
) -> int:
    """Estimated prompt tokens of a request body, by the schema it is written in: "openai" (Chat
    Completions) or "anthropic" (Messages). `model` (the upstream model; default: the body's
    "model", which may still be a public alias) picks the encoding or the Claude estimate.
    Malformed parts are skipped, never raised on: this runs on failure paths. CPU-bound: run it in a
    thread for large bodies (see the module docstring)."""
    name = model if model is not None else _str(body.get("model"))
    if schema == "openai":
        return _estimate_openai(body, name)
    if schema == "anthropic":
        return _estimate_anthropic(body, name)
    raise ValueError(f"unknown schema {schema!r}: expected 'openai' or 'anthropic'")
