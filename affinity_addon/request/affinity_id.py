"""One stable affinity ID per conversation, derived statelessly from the request.

Sources are tried in order; the first that yields a value wins:
- `header: NAME`: a session header the client already sends (Claude Code, Codex, opencode, pi);
- `body: dotted.path` (optionally `json: key` for a JSON string, or `regex:` with one group):
  e.g. `prompt_cache_key`, or the `session_id` inside Claude Code's `metadata.user_id`;
- `root`: a keyed hash of the conversation's root (first system/developer/instructions content,
  first user message, model family). Turn N+1 only appends messages, so the root and the ID stay
  the same on every turn, on every proxy instance, across restarts; a side request with its own
  prompt (titles, memory extraction) gets its own ID.
Client IDs that are short, plain ASCII are used verbatim (so Codex's `session-id` stays equal to
its `prompt_cache_key`); anything else is replaced by a keyed hash, so no ID ever carries prompt
text or more than 64 characters.
"""

import functools
import hashlib
import json
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from affinity_addon.catalog import catalog_file
from affinity_addon.catalog.volatile import compile_patterns, default_volatile, mask
from affinity_addon.catalog.yamlsource import load_yaml
from affinity_addon.jsonpath import get_path, parse_path
from affinity_addon.models import model_family
from affinity_addon.request.header_map import header_map
from affinity_addon.request.prompt import Segment, canonical, root_segments, text_of

# Keys that were public at some point (the README, older defaults): IDs made with them can be
# recomputed offline by anyone, so the addon warns when one is configured.
PUBLIC_KEYS = frozenset({"affinity-default-key-v1"})
MAX_LEN = 64
_VERBATIM = re.compile(r"^[A-Za-z0-9._:\-]{1,64}$")
# Model variants that belong to one cached conversation: dated snapshots, context-size tags.
# What a rule's regex (affinity `regex:` sources, `root_ignore`) sees of a client string: the
# patterns are user-written and may backtrack; IDs and billing-header prefixes are short.
MAX_REGEX_INPUT = 4096


@dataclass(frozen=True, slots=True)
class Source:
    kind: str  # "header" | "body" | "root"
    name: str = ""  # header name (lower case) or dotted body path
    json_key: str | None = None
    regex: re.Pattern[str] | None = None

    @property
    def label(self) -> str:
        return "root" if self.kind == "root" else f"{self.kind}:{self.name}"


# Root blocks that change on every request or move on resume (Claude Code's billing header,
# OpenClaw's internal context, Qwen Code's date reminder), and text inside root blocks that is
# rebuilt (dates): none of it may split a conversation. Data: catalog/volatile.yaml.
DEFAULT_ROOT_IGNORE: tuple[re.Pattern[str], ...] = default_volatile().blocks
DEFAULT_ROOT_MASK: tuple[re.Pattern[str], ...] = default_volatile().root_masks


@dataclass(frozen=True, slots=True)
class AffinityConfig:
    sources: tuple[Source, ...] = field(default_factory=lambda: DEFAULT_SOURCES)
    root_ignore: tuple[re.Pattern[str], ...] = DEFAULT_ROOT_IGNORE
    root_mask: tuple[re.Pattern[str], ...] = DEFAULT_ROOT_MASK


def _parse_source(raw: Any) -> Source:
    if raw == "root" or (isinstance(raw, Mapping) and raw.get("root") is True and len(raw) == 1):
        return Source("root")
    if isinstance(raw, str) and ":" in raw:
        kind, _, name = raw.partition(":")
        raw = {kind.strip(): name.strip()}
    if not isinstance(raw, Mapping):
        raise ValueError(f"source {raw!r}: use 'root', 'header:NAME', 'body:PATH' or a mapping")
    kinds = [k for k in ("header", "body") if k in raw]
    if len(kinds) != 1:
        raise ValueError(f"source {dict(raw)!r} needs exactly one of 'header' or 'body'")
    kind = kinds[0]
    name = raw[kind]
    if not isinstance(name, str) or not name:
        raise ValueError(f"source {kind}: needs a name")
    extra = set(raw) - {kind, "json", "regex"}
    if extra:
        raise ValueError(f"source {kind}:{name}: unknown key {sorted(extra)[0]!r}")
    if kind == "header" and ("json" in raw or "regex" in raw):
        raise ValueError(f"source header:{name}: json/regex apply to body sources only")
    json_key = raw.get("json")
    if json_key is not None and not isinstance(json_key, str):
        raise ValueError(f"source {kind}:{name}: json must be a key name")
    regex = None
    if "regex" in raw:
        try:
            regex = re.compile(str(raw["regex"]))
        except re.error as e:
            raise ValueError(f"source {kind}:{name}: invalid regex: {e}") from None
        if regex.groups != 1:
            raise ValueError(f"source {kind}:{name}: regex needs exactly one capture group")
    return Source(kind, name.lower() if kind == "header" else name, json_key, regex)


def _default_sources() -> tuple[Source, ...]:
    path = catalog_file("affinity_sources.yaml")
    doc = load_yaml(path)
    raw = doc.get("sources") if isinstance(doc, dict) else None
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{path}: needs a non-empty `sources` list")
    try:
        return tuple(_parse_source(s) for s in raw)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


# Every agent's session header or field we know, then the root: catalog/affinity_sources.yaml.
DEFAULT_SOURCES: tuple[Source, ...] = _default_sources()


def parse_affinity_config(raw: Any) -> AffinityConfig:
    if raw is None:
        return AffinityConfig()
    if not isinstance(raw, Mapping):
        raise ValueError("must be a mapping with 'sources', 'root_ignore' and/or 'root_mask'")
    extra = set(raw) - {"sources", "root_ignore", "root_mask"}
    if extra:
        raise ValueError(f"unknown key {sorted(extra)[0]!r}")
    sources = DEFAULT_SOURCES
    if "sources" in raw:
        if not isinstance(raw["sources"], list) or not raw["sources"]:
            raise ValueError("sources must be a non-empty list")
        sources = tuple(_parse_source(s) for s in raw["sources"])
    ignore = DEFAULT_ROOT_IGNORE
    if "root_ignore" in raw:
        ignore = compile_patterns(raw["root_ignore"], "root_ignore")
    masks = DEFAULT_ROOT_MASK
    if "root_mask" in raw:
        masks = compile_patterns(raw["root_mask"], "root_mask")
    return AffinityConfig(sources, ignore, masks)


@functools.lru_cache(maxsize=8)
def hash_key(secret: str) -> bytes:
    """The 64-byte BLAKE2b key for this installation's `secret` (`affinity_key`): every byte of
    a long secret counts (none is truncated)."""
    return hashlib.blake2b(secret.encode("utf-8", "surrogatepass"), digest_size=64,
                           person=b"affinity-key").digest()


def keyed_hash(data: bytes, secret: str) -> str:
    return hashlib.blake2b(data, key=hash_key(secret), digest_size=16).hexdigest()


def _client_value(src: Source, headers: Mapping[str, str], body: Mapping[str, Any] | None) -> str | None:
    if src.kind == "header":
        v = headers.get(src.name.lower())  # a HeaderMap: lowercased names
        return v.strip() if isinstance(v, str) and v.strip() else None
    if body is None:
        return None
    v = get_path(body, parse_path(src.name))
    if src.json_key is not None:
        if not isinstance(v, str):
            return None
        try:
            v = json.loads(v)
        except ValueError:
            return None
        v = v.get(src.json_key) if isinstance(v, dict) else None
    if src.regex is not None:
        if not isinstance(v, str) or len(v) > MAX_REGEX_INPUT:
            return None
        m = src.regex.search(v)
        v = m.group(1) if m else None
    if isinstance(v, str) and v.strip():
        return v.strip()
    return None


# A system prompt is up to tens of KB that every turn (and every conversation of an agent)
# repeats, and each root pattern scans all of it: remember the scans of recent texts (compared
# whole, so never a wrong answer). In memory only, bounded in entries and size, never logged.
_SCAN_MEMO_MIN_CHARS = 256  # shorter: the scan is cheaper than the lookup
_SCAN_MEMO_MAX_CHARS = 256 * 1024
_SCAN_MEMO_SIZE = 256
_scan_memo: "OrderedDict[tuple[int, str], tuple[AffinityConfig, bool, str]]" = OrderedDict()


def _scan(text: str, config: "AffinityConfig") -> tuple[bool, str]:
    """(left out of the root?, the text with volatile parts masked)."""
    memo = _SCAN_MEMO_MIN_CHARS <= len(text) <= _SCAN_MEMO_MAX_CHARS
    if memo:
        hit = _scan_memo.get((id(config), text))
        if hit is not None and hit[0] is config:
            _scan_memo.move_to_end((id(config), text))
            return hit[1], hit[2]
    ignored = any(p.search(text) for p in config.root_ignore)
    masked = mask(text, config.root_mask) if text and config.root_mask and not ignored else text
    if memo:
        _scan_memo[(id(config), text)] = (config, ignored, masked)
        if len(_scan_memo) > _SCAN_MEMO_SIZE:
            _scan_memo.popitem(last=False)
    return ignored, masked


def _root_bytes(value: Any, config: "AffinityConfig") -> bytes | None:
    """The segment as hashed for the root: volatile text (dates) masked out; None when the
    segment is left out of the root (`root_ignore`)."""
    text = text_of(value)
    ignored, masked = _scan(text, config)
    if ignored:
        return None
    if masked == text:
        return canonical(value)
    if isinstance(value, str):
        return canonical(masked)
    key = "text" if isinstance(value.get("text"), str) else "content"
    return canonical({**value, key: masked})


Root = tuple[list[Segment], list[Segment]]


def root_id(body: Mapping[str, Any], api: str, config: AffinityConfig, secret: str,
            root: Callable[[], Root] | None = None) -> str | None:
    """Keyed hash of the conversation's stable root: blocks an agent rebuilds on every turn or
    resume are left out, and dates masked, so `-c`/resume and a day rollover keep the ID.
    `root`: the body's `root_segments`, when the caller has them (the rewrite shares them)."""
    return root_parts(body, api, config, secret, root)[0]


def root_parts(body: Mapping[str, Any], api: str, config: AffinityConfig, secret: str,
               root: Callable[[], Root] | None = None, opening: bool = False,
               known: str | None = None) -> tuple[str | None, str | None]:
    """(`root_id`, with `opening` also the keyed hash of the first user message alone). The
    opening outlives what the root does not: a changed system prompt or another model keeps it,
    so a conversation whose root changed can still be found by it (its later turns only).
    `known`: the root ID, when the caller has it (then only the opening is hashed)."""
    system, user = root() if root is not None else root_segments(dict(body), api)
    if known is not None:
        system = []  # the system prompt is only in the root, which is known
    parts = [(tag, b) for tag, segs in ((b"\x00s", system), (b"\x00u", user)) for seg in segs
             if (b := _root_bytes(seg.value, config)) is not None]
    if not parts:
        return None, None
    h = hashlib.blake2b(key=hash_key(secret), digest_size=16)
    h.update(model_family(body.get("model")).encode("utf-8", "surrogatepass"))
    first = hashlib.blake2b(key=hash_key(secret), digest_size=16, person=b"opening")\
        if opening else None
    opened = False
    for tag, b in parts:
        h.update(tag)
        h.update(b)
        if first is not None and tag == b"\x00u":
            first.update(b)
            opened = True
    return (known or "aff-" + h.hexdigest(),
            first.hexdigest() if first is not None and opened else None)


def derive(
    config: AffinityConfig,
    headers: Mapping[str, str],
    body: Mapping[str, Any] | None,
    api: str | None,
    secret: str,
    root: Callable[[], Root] | None = None,
) -> tuple[str | None, str | None]:
    """(affinity_id, source label), or (None, None) when no source yields a value."""
    # One pass over the request's headers (most carry none of the session headers, and a miss
    # through mitmproxy's Headers costs a scan each); the caller may pass the map it made.
    hm = header_map(headers)
    for src in config.sources:
        if src.kind == "header" and src.name.lower() not in hm:
            continue
        if src.kind == "root":
            if body is not None and api is not None:
                rid = root_id(body, api, config, secret, root)
                if rid is not None:
                    return rid, "root"
            continue
        v = _client_value(src, hm, body)
        if v is None:
            continue
        if not _VERBATIM.match(v):
            v = "aff-" + keyed_hash(v.encode("utf-8", "surrogatepass"), secret)
        return v, src.label
    return None, None
