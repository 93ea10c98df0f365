"""Prefix fingerprints: a request's prompt walked in provider hash order, without its text.

One digest per prompt segment (`prompt.iter_segments`), plus lengths and 4-byte hashes of each
256-character chunk of text, so a later request can be told exactly where it left the cached
prefix ("system[0].text changed at ~char 512") while the proxy keeps no prompt text at all.
Rows are packed into bytes: a 200-message conversation costs a few KB, not a few hundred.
"""

import hashlib
import re
import zlib
from collections.abc import Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Any

from affinity_addon.apis import ANTHROPIC, BEDROCK_CONVERSE, OPENAI_CHAT, OPENAI_RESPONSES
from affinity_addon.catalog.volatile import default_volatile
from affinity_addon.diagnosis.blockprint import (
    CARRIER,
    CHUNK_CHARS,
    CHUNK_ROW,
    CHUNKED,
    FIRST,
    IGNORED,
    MARKED,
    REASONING,
    REL_PATH,
    ROW,
    SYSTEM,
    BlockPrint,
    Blocks,
    Fingerprint,
)
from affinity_addon.jsonpath import find_path, parse_path
from affinity_addon.request.breakpoint_spec import DIGEST_SIZE, block_digest
from affinity_addon.request.prefix_memo import PrefixMemo, run_steps
from affinity_addon.request.prompt import (
    MARKER_KEYS,
    MESSAGES_KEY,
    SYSTEM_ROLES,
    Segment,
    canonical,
    head_segments,
    message_segments,
)
from affinity_addon.tokens import estimate_tokens

# Block digests are DIGEST_SIZE (8) bytes: a collision only misreports one diagnosis.

# Blocks that clients change on every request although the provider leaves them out of the
# cached prefix (catalog/volatile.yaml `uncached_in`, on its `stripped_by` hosts); reporting them
# would blame every request on a change that costs nothing. Without a host: every such block.
VOLATILE_PATTERNS: dict[str, tuple[str, ...]] = default_volatile().uncached()

# Request fields outside the prompt that are still part of the cached prefix: a change keeps
# tools/system cached but invalidates the messages (Anthropic's documented tiers; OpenAI counts
# structured-output schemas as prefix without saying where, so they are cut at the same place).
# OpenAI's reuse also needs "compatible request settings, including the model, service tier,
# and tools", and its cache diagnostics name a changed service tier, text format, reasoning
# effort or verbosity as why a prefix was not reused
# (https://developers.openai.com/api/docs/guides/prompt-caching/diagnostics): without them here
# a changed reasoning effort read as `routed-away` (measured on tests/test_e2e_provider_diagnostics
# before they were added). Dotted paths are one nested field.
PREFIX_SETTINGS: dict[str, tuple[str, ...]] = {
    ANTHROPIC: ("tool_choice", "thinking"),
    # Converse passes Claude's `thinking` through here
    BEDROCK_CONVERSE: ("additionalModelRequestFields",),
    OPENAI_CHAT: ("response_format", "reasoning_effort", "verbosity", "service_tier"),
    OPENAI_RESPONSES: ("text", "reasoning.effort", "service_tier"),
}

# Request fields that pick another variant of the model, whose cache is its own: Anthropic's
# `speed` ("fast"; "standard" is the default). Its cache diagnostics answer `model_changed` for
# "a request whose `model` or `speed` differs" (`CacheMissModelChanged` in
# https://github.com/anthropics/anthropic-sdk-python); without it here a switch to fast mode
# read as `routed-away` (same e2e workload). (field, its default)
MODEL_VARIANTS: dict[str, tuple[tuple[str, str], ...]] = {
    ANTHROPIC: (("speed", "standard"),),
}

# Message fields that carry the model's reasoning (xAI, Kimi, DeepSeek, OpenRouter); dropping
# them from history is xAI's "top cause of cache misses".
REASONING_FIELDS = frozenset({"reasoning_content", "reasoning", "reasoning_details"})
THINKING_KINDS = frozenset({"thinking", "redacted_thinking", "reasoning"})
IMAGE_KINDS = frozenset({"image", "image_url", "input_image"})
# Images are billed by pixels, not by the length of their base64; ~1 MP is about 1,000 tokens
# (providers bill 85-1,600).
FIXED_TOKENS: dict[str, int] = dict.fromkeys(IMAGE_KINDS, 1_000)

# Message keys that hold the content itself; the rest of a message is its "envelope".
_CONTENT_KEYS = frozenset({"content", "parts"})

# Chunk hashes (for "changed at ~char N") are kept for the blocks where volatile text lives —
# tools, system prompts and the first messages (dates, cwd) — not for every turn of a long
# conversation, where they would cost most of the fingerprint's time.
CHUNKED_MESSAGES = 2
_IGNORED_DIGEST = bytes(DIGEST_SIZE)


def compile_volatile(spec: Mapping[str, Iterable[str]]) -> dict[str, tuple[re.Pattern[str], ...]]:
    """Compile {section: [regex, ...]}; raises ValueError naming the bad pattern."""
    out: dict[str, tuple[re.Pattern[str], ...]] = {}
    for section, patterns in spec.items():
        if isinstance(patterns, str):
            raise ValueError(f"volatile patterns for {section!r} must be a list, not a string")
        compiled = []
        for pattern in patterns:
            try:
                compiled.append(re.compile(pattern))
            except (re.error, TypeError) as e:
                raise ValueError(f"bad volatile pattern {pattern!r} for {section!r}: {e}") from None
        out[section] = tuple(compiled)
    return out


@cache
def _compiled(spec: tuple[tuple[str, tuple[str, ...]], ...]) -> dict[str, tuple[re.Pattern[str], ...]]:
    # One object per distinct table: the fingerprint memo tells contexts apart by identity.
    return compile_volatile(dict(spec))


def _frozen(spec: Mapping[str, tuple[str, ...]]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    return tuple(sorted(spec.items()))


DEFAULT_VOLATILE = _compiled(_frozen(VOLATILE_PATTERNS))


@lru_cache(maxsize=1024)  # a proxy talks to a few hosts
def volatile_for(host: str) -> Mapping[str, tuple[re.Pattern[str], ...]]:
    """The blocks the provider at `host` leaves out of the cached prefix, by section."""
    return _compiled(_frozen(default_volatile().uncached(host)))


_Unit = tuple[Segment, bool, dict[str, Any] | None]


_CARRIES: dict[str, Any] = {}  # the envelope marker of a message iter_segments skips


def _message_units(section: str, i: int, msg: dict[str, Any],
                   api: str | None = None) -> tuple[list[_Unit], bool]:
    """(the units of message `i`, is it a carrier?). A carrier is a message the prompt walker
    skips for having no content (an assistant turn that is only `tool_calls`): a change there
    breaks the prefix just the same, so it is a block of its own."""
    segs = list(message_segments(section, i, msg, api))
    if not segs:
        kind = "tool_calls" if "tool_calls" in msg else "message"
        role = msg.get("role") if isinstance(msg.get("role"), str) else None
        return [(Segment(f"{section}[{i}]", section, kind, role, i, msg), True, _CARRIES)], True
    first = segs[0]
    envelope = None
    if first.path not in (section, f"{section}[{i}]"):  # not its own segment: a content part
        envelope = {k: v for k, v in msg.items() if k not in _CONTENT_KEYS}
    return [(first, True, envelope), *((seg, False, None) for seg in segs[1:])], False


def _walk(body: dict[str, Any], api: str) -> Iterator[_Unit]:
    """(segment, first block of its message?, the message's non-content fields when first), in
    prompt order. Messages without content are carriers (`_message_units`), kept once the
    conversation has content at all."""
    for seg in head_segments(body, api):
        yield seg, False, None
    for units, _ in _message_walk(body, api, 0):
        yield from units


def _message_walk(body: dict[str, Any], api: str,
                  start: int) -> Iterator[tuple[list[_Unit], bool]]:
    """The conversation's units message by message from message `start` on (a checkpoint:
    everything before it is done), each with "nothing waits": carriers before the first message
    with content wait for it, and are dropped if none comes."""
    section = MESSAGES_KEY.get(api)
    if section is None:
        return
    msgs = body.get(section)
    if isinstance(msgs, str) and section == "input":  # Responses: one user message
        if start == 0:
            yield [(Segment(section, section, "string", "user", 0, msgs), True, None)], True
        return
    if not isinstance(msgs, list):
        return
    waiting: list[_Unit] = []
    seen = start > 0
    for i in range(start, len(msgs)):
        msg = msgs[i]
        if not isinstance(msg, dict):
            yield [], seen
            continue
        units, carrier = _message_units(section, i, msg, api)
        if carrier and not seen:
            waiting += units
            yield [], False
            continue
        if waiting:
            units = waiting + units
            waiting = []
        seen = True
        yield units, True


# Checkpoints kept per fingerprint: after its last message, and before its last and its
# second-to-last. The next turn appends to the conversation (the whole previous prompt is its
# prefix); a retry, an edited last message or a moved cache marker changes the last one or two.
CHECKPOINTS = 3


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A fingerprint's state after message `k`: a prefix of its rows, chunks, labels, blocks."""

    rows: bytes
    chunks: bytes
    labels: tuple[str, ...]
    blocks: tuple[BlockPrint, ...]
    n_rows: int  # bytes of rows, chunks; count of labels, blocks; tokens so far
    n_chunks: int
    n_labels: int
    n_blocks: int
    total: int


class FingerprintMemo(PrefixMemo["Checkpoint"]):
    """Recent fingerprints' checkpoints, by a chained hash of the prompt up to each one, so that
    a conversation's next turn fingerprints only what it added: turn N+1 resumes
    where turn N's prompt ended instead of canonicalising and hashing the whole prompt again.

    The chain is one orjson encoding and one keyed hash per message (C speed, ~0.5 ms a MB);
    the full fingerprint costs ten times that in Python per block. It holds no text: keys are
    64-bit hashes, keyed per process like the block digests, so a collision (vanishingly rare)
    would reuse another prompt's blocks in one diagnosis, as a digest collision would. Bounded
    by entries and by the blocks they hold, counted per entry: the CHECKPOINTS entries of one
    prompt share its blocks, so ~20k distinct blocks (~7 MB) as a rule and 60k at worst. Sized
    for a gateway's conversations in play: ~1,000 short ones, or a few long ones."""

    def __init__(self, max_entries: int = 4096, max_blocks: int = 60_000) -> None:
        super().__init__(max_entries, max_blocks, lambda cp: len(cp.blocks))

    @property
    def blocks(self) -> int:
        return self.held


def _text(value: Any) -> tuple[str | None, str]:
    """(field holding the text, the text): field "" when the value is the string itself."""
    if isinstance(value, str):
        return "", value
    if isinstance(value, dict):
        for key in ("text", "content"):
            text = value.get(key)
            if isinstance(text, str) and text:
                return key, text
    return None, ""


def _chunk_hashes(text: str) -> bytes:
    return b"".join(
        CHUNK_ROW.pack(zlib.crc32(text[i:i + CHUNK_CHARS].encode("utf-8", "surrogatepass")))
        for i in range(0, len(text), CHUNK_CHARS)
    )


def _marker(seg: Segment) -> tuple[bool, str | None]:
    if seg.mark is not None:  # a Converse cachePoint after the block
        ttl = seg.mark.get("ttl") if isinstance(seg.mark, dict) else None
        return True, ttl if isinstance(ttl, str) else None
    value = seg.value
    if not isinstance(value, dict):
        return False, None
    for key in MARKER_KEYS:
        spec = value.get(key)
        if spec is not None:
            ttl = spec.get("ttl") if isinstance(spec, dict) else None
            return True, ttl if isinstance(ttl, str) else None
    return False, None


# Blocks fingerprinted between two looks at the event loop (`fingerprint_steps`): a 1 MB prompt
# is a few thousand blocks and some milliseconds, which must not hold up the upload of the
# request it belongs to or the answer of another.
STEP_BLOCKS = 256
# ... or this many bytes of block content, whichever comes first: 256 blocks of a 1 MB prompt
# are half of it, over a millisecond that an answer arriving meanwhile would wait for.
STEP_BYTES = 64 << 10

Steps = Generator[None, None, "tuple[Fingerprint, Blocks]"]


def model_variant(body: dict[str, Any], api: str, model: str | None) -> str | None:
    """The model as the cache tells variants apart: `claude-opus-4-8 (speed fast)`."""
    if model is None:
        return None
    for key, default in MODEL_VARIANTS.get(api, ()):
        value = body.get(key)
        if isinstance(value, str) and value != default:
            model = f"{model} ({key} {value[:32]})"
    return model


def fingerprint(body: dict[str, Any], api: str, model: str | None, *,
                volatile: Mapping[str, tuple[re.Pattern[str], ...]] | None = None) -> Fingerprint:
    """Fingerprint a request body of API `API`. O(blocks + text length); keeps no text."""
    return run_steps(fingerprint_steps(body, api, model, volatile=volatile))[0]


def fingerprint_steps(body: dict[str, Any], api: str, model: str | None, *,
                      volatile: Mapping[str, tuple[re.Pattern[str], ...]] | None = None,
                      every: int | None = None, memo: FingerprintMemo | None = None) -> Steps:
    """`fingerprint`, yielding every `every` blocks; returns the fingerprint and its blocks as
    `unpack()` would give them (built along the way, so the judgement needs no decoding).
    With a `memo`, resumes from the latest checkpoint of an earlier prompt this one extends,
    and leaves checkpoints of its own for the next turn: the result is the same either way."""
    volatile = DEFAULT_VOLATILE if volatile is None else volatile
    every = STEP_BLOCKS if every is None else every
    label_ids: dict[str, int] = {}

    def label(s: str) -> int:
        return label_ids.setdefault(s, len(label_ids))

    rows, chunks = bytearray(), bytearray()
    blocks: list[BlockPrint] = []
    total = start = 0
    section = MESSAGES_KEY.get(api)
    msgs = body.get(section) if section else None
    keys = ((yield from memo.chain(body, msgs, (api, volatile), STEP_BYTES))
            if memo is not None and isinstance(msgs, list) else None)
    if keys is not None and memo is not None:
        found = memo.resume(keys)
        if found is not None:
            start, cp = found
            label_ids = {s: i for i, s in enumerate(cp.labels[:cp.n_labels])}
            rows, chunks = bytearray(cp.rows[:cp.n_rows]), bytearray(cp.chunks[:cp.n_chunks])
            blocks, total = list(cp.blocks[:cp.n_blocks]), cp.total
        if len(keys) > every:
            yield  # the chain alone is a slice's worth on a long conversation
    # Checkpoints after the last CHECKPOINTS - 1 messages and after all of them.
    cut_from = max(1, len(keys) - CHECKPOINTS) if keys is not None else 1 << 62
    cuts: list[tuple[int, int, int, int, int, int]] = []
    units: Iterable[_Unit] = (((seg, False, None) for seg in head_segments(body, api))
                              if start == 0 else ())
    walk = _message_walk(body, api, start)
    k, clean, n, size = start, start > 0, 0, 0
    envelope_hash, reasoning = 0, False
    while True:
        for seg, first, envelope in units:
            n += 1
            if n % every == 0 or size >= STEP_BYTES:
                size = 0
                yield
            carrier = envelope is _CARRIES
            if carrier:
                envelope = None
            field, text = _text(seg.value)
            marked, ttl = _marker(seg)
            mi = seg.message_index
            extra = 0
            if mi is None or first:
                envelope_hash, reasoning = 0, False
                if envelope:
                    role = envelope.get("role")
                    # Most envelopes are just {"role": ...}: skip the JSON encoder for those.
                    env = (b"r\x00" + role.encode("utf-8", "surrogatepass")
                           if len(envelope) == 1 and isinstance(role, str) else canonical(envelope))
                    envelope_hash = zlib.crc32(env)
                    extra = estimate_tokens(len(env))
                    reasoning = not REASONING_FIELDS.isdisjoint(envelope)
            system = seg.role in SYSTEM_ROLES or seg.section == "system"
            flags = ((MARKED if marked else 0) | (FIRST if first else 0)
                     | (CARRIER if carrier else 0) | (REASONING if reasoning else 0)
                     | (SYSTEM if system else 0))
            kind = seg.kind
            if field and seg.kind == "text" and any(p.search(text)
                                                    for p in volatile.get(seg.section, ())):
                kind, digest, field = IGNORED, _IGNORED_DIGEST, None
                chars = len(text)
            else:
                canon = canonical(seg.value)
                digest = block_digest(seg.role, canon)  # the planner's digest: its hint compares them
                chars = len(text) if field is not None else len(canon)
                size += len(canon)
            tokens = FIXED_TOKENS.get(kind, estimate_tokens(chars)) + extra
            total += tokens
            block_chunks = b""
            if field is not None and (mi is None or mi < CHUNKED_MESSAGES or system):
                flags |= CHUNKED
                block_chunks = _chunk_hashes(text)
                chunks += block_chunks
            prefix = f"{seg.section}[{mi}]"
            if mi is not None and seg.path.startswith(prefix):
                flags |= REL_PATH
                path = label(seg.path[len(prefix):])
            else:
                path = label(seg.path)
            rows += ROW.pack(
                digest, chars, tokens, -1 if mi is None else mi, envelope_hash,
                path, label(kind), label(seg.section),
                label(ttl) + 1 if ttl is not None else 0,
                label(field) + 1 if field is not None else 0, flags,
            )
            blocks.append(BlockPrint(seg.path, seg.section, kind, digest, chars, tokens, marked,
                                     ttl, mi, field, system, first, envelope_hash, reasoning,
                                     block_chunks, carrier))
        if clean and k >= cut_from:  # k messages done and nothing waiting: a checkpoint
            cuts.append((k, len(rows), len(chunks), len(label_ids), len(blocks), total))
        step = next(walk, None)
        if step is None:
            break
        units, clean = step
        k += 1
    settings = tuple(
        (key, hashlib.blake2b(canonical(value), digest_size=8).digest())
        for key in PREFIX_SETTINGS.get(api, ())
        for found, value in (find_path(body, parse_path(key)),) if found
    )
    fp = Fingerprint(model_variant(body, api, model), total, settings, bytes(rows),
                     tuple(label_ids), bytes(chunks))
    done = tuple(blocks)
    if memo is not None and keys is not None:
        for at, n_rows, n_chunks, n_labels, n_blocks, tokens in cuts:
            memo.keep(keys[at], Checkpoint(fp.rows, fp.chunks, fp.labels, done, n_rows, n_chunks,
                                           n_labels, n_blocks, tokens))
    return fp, Blocks(done, [b for b in blocks if not b.ignored])
