"""Where a conversation's new request left its previous request's prefix: the first differing
block and what changed there (tools reordered, system text at ~char N, messages inserted),
from two fingerprints, without any prompt text.
"""

from dataclasses import dataclass

# Block digests are DIGEST_SIZE (8) bytes: a collision only misreports one diagnosis.
from affinity_addon.diagnosis.blockprint import (
    CHUNK_CHARS,
    CHUNK_ROW,
    BlockPrint,
    Blocks,
    Fingerprint,
)
from affinity_addon.diagnosis.fingerprint import IMAGE_KINDS, THINKING_KINDS

MAX_SHIFT = 16  # messages inserted/removed at once that compare() still recognises as such


@dataclass(frozen=True, slots=True)
class PrefixDiff:
    """Where `cur` leaves `prev`'s prefix. Counts are over comparable (non-ignored) blocks."""

    kind: str  # identical, appended, model-switched, settings-changed, tools-reordered, ...
    common_blocks: int
    common_tokens: int
    first_change: str | None = None  # path of the first difference
    detail: str | None = None


def _same(a: BlockPrint, b: BlockPrint) -> bool:
    return a.digest == b.digest and a.first == b.first and a.envelope == b.envelope


def compare(prev: Fingerprint, cur: Fingerprint, prev_blocks: Blocks | None = None,
            cur_blocks: Blocks | None = None) -> PrefixDiff:
    """Explain how `cur` relates to `prev`: O(blocks). Pass their unpacked blocks if at hand."""
    if prev.model and cur.model and prev.model != cur.model:
        return PrefixDiff("model-switched", 0, 0, "model",
                          f"model switched from {prev.model} to {cur.model}")
    p = (prev_blocks or prev.unpack()).comparable
    c = (cur_blocks or cur.unpack()).comparable
    n, limit = 0, min(len(p), len(c))
    while n < limit and _same(p[n], c[n]):
        n += 1
    kind, path, detail = _classify(p, c, n)
    changed = _changed_settings(prev, cur)
    if changed:
        cut = next((i for i, b in enumerate(p) if b.message_index is not None), len(p))
        if n >= cut:
            n, kind, path = cut, "settings-changed", changed[0]
            detail = f"{', '.join(changed)} changed, which invalidates the cached messages"
    return PrefixDiff(kind, n, sum(b.tokens for b in p[:n]), path, detail)


def _changed_settings(prev: Fingerprint, cur: Fingerprint) -> list[str]:
    a, b = dict(prev.settings), dict(cur.settings)
    return [k for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


_Change = tuple[str, str | None, str | None]  # kind, first_change path, detail


def _classify(p: list[BlockPrint], c: list[BlockPrint], n: int) -> _Change:
    if n == len(p) == len(c):
        return "identical", None, None
    if n == len(p):
        return "appended", None, f"{len(c) - n} block(s) appended"
    a, b = p[n], (c[n] if n < len(c) else None)
    if a.section == "tools" or (b is not None and b.section == "tools"):
        return _tools_change(p, c, n)
    if a.message_index is None or (b is not None and b.message_index is None):
        return _system_block_change(a, b)
    return _message_change(p, c, n)


def _tools_change(p: list[BlockPrint], c: list[BlockPrint], n: int) -> _Change:
    tp = [b.digest for b in p if b.section == "tools"]
    tc = [b.digest for b in c if b.section == "tools"]
    path = f"tools[{n}]"
    if sorted(tp) == sorted(tc):
        return "tools-reordered", "tools", f"tools reordered ({len(tc)} definitions, from {path})"
    if len(tc) > len(tp) and _is_subsequence(tp, tc):
        return "tool-added", path, f"{len(tc) - len(tp)} tool(s) added at {path}"
    if len(tc) < len(tp) and _is_subsequence(tc, tp):
        return "tool-removed", path, f"{len(tp) - len(tc)} tool(s) removed at {path}"
    return "tool-changed", path, f"{path} definition changed"


def _is_subsequence(short: list[bytes], long: list[bytes]) -> bool:
    it = iter(long)
    return all(x in it for x in short)


def _system_block_change(a: BlockPrint, b: BlockPrint | None) -> _Change:
    if b is not None and a.path == b.path:
        path, where = _where(a, b)
        return "system-changed", path, where
    if b is None or b.message_index is not None:
        return "system-changed", a.path, f"{a.path} removed"
    if a.message_index is not None:
        return "system-changed", b.path, f"{b.path} added"
    return "system-changed", b.path, f"{b.path} changed"


def _where(a: BlockPrint, b: BlockPrint) -> tuple[str, str]:
    """(path, detail) for two versions of the same block, down to the changed text chunk."""
    if a.digest == b.digest:
        if a.first != b.first:
            return a.message_path, f"message boundary moved at {a.path}"
        return a.message_path, f"{a.message_path} fields besides content changed"
    if a.text_field is not None and a.text_field == b.text_field and not (a.chunks and b.chunks):
        return a.text_path, f"{a.text_path} changed"  # a later turn: no chunk hashes kept
    if a.text_field is not None and a.text_field == b.text_field:
        size = CHUNK_ROW.size
        count = min(len(a.chunks), len(b.chunks)) // size
        k = next((i for i in range(count)
                  if a.chunks[i * size:(i + 1) * size] != b.chunks[i * size:(i + 1) * size]),
                 None)
        if k is None and len(a.chunks) != len(b.chunks):
            k = count
        if k is not None:
            return a.text_path, f"{a.text_path} changed at ~char {k * CHUNK_CHARS}"
        return a.path, f"{a.path} changed outside its text"
    return a.path, f"{a.path} changed"


def _skip(blocks: list[BlockPrint], i: int, kinds: frozenset[str]) -> int:
    while i < len(blocks) and blocks[i].kind in kinds:
        i += 1
    return i


def _message_change(p: list[BlockPrint], c: list[BlockPrint], n: int) -> _Change:
    a, b = p[n], (c[n] if n < len(c) else None)
    if b is None:
        if a.first:
            count = len({x.message_index for x in p[n:]})
            return ("message-removed", a.message_path,
                    f"{count} message(s) removed from the end, from {a.message_path}")
        return "message-changed", a.path, f"blocks removed from the end of {a.message_path}"
    if a.reasoning and not b.reasoning and a.digest == b.digest:
        return "thinking-removed", a.message_path, f"reasoning dropped from {a.message_path}"
    m = _skip(p, n, THINKING_KINDS)
    if m > n and (m < len(p) and p[m].digest == b.digest):
        return "thinking-removed", a.path, f"{a.kind} block removed at {a.path}"
    m = _skip(c, n, IMAGE_KINDS)
    if m > n and m < len(c) and c[m].digest == a.digest:
        return "image-added", b.path, f"{m - n} image(s) added at {b.path}"
    m = _skip(p, n, IMAGE_KINDS)
    if m > n and m < len(p) and p[m].digest == b.digest:
        return "image-removed", a.path, f"{m - n} image(s) removed at {a.path}"
    shifted = _message_shift(p, c, a, b)
    if shifted is not None:
        return shifted
    path, where = _where(a, b) if a.path == b.path else (b.path, f"{b.path} changed")
    return ("system-changed" if a.system or b.system else "message-changed"), path, where


def _messages(blocks: list[BlockPrint]) -> tuple[list[int], list[tuple[tuple[bytes, int], ...]]]:
    """Message indexes in order and, for each, the key its blocks compare by."""
    order: list[int] = []
    keys: list[list[tuple[bytes, int]]] = []
    for b in blocks:
        if b.message_index is None:
            continue
        if b.first or not order or order[-1] != b.message_index:
            order.append(b.message_index)
            keys.append([])
        keys[-1].append((b.digest, b.envelope))
    return order, [tuple(k) for k in keys]


def _message_shift(p: list[BlockPrint], c: list[BlockPrint],
                   a: BlockPrint, b: BlockPrint) -> _Change | None:
    """Whole messages inserted into or removed from the history, the rest unchanged."""
    if not (a.first and b.first) or a.message_index is None or b.message_index is None:
        return None
    po, pk = _messages(p)
    co, ck = _messages(c)
    ia, ib = po.index(a.message_index), co.index(b.message_index)
    rest = pk[ia:]
    for k in range(1, min(MAX_SHIFT, len(ck) - ib - 1) + 1):
        if ck[ib + k:ib + k + len(rest)] == rest:
            return ("message-inserted", b.message_path,
                    f"{k} message(s) inserted at {b.message_path}")
    for k in range(1, min(MAX_SHIFT, len(pk) - ia - 1) + 1):
        tail = pk[ia + k:]
        if ck[ib:ib + len(tail)] == tail:
            return ("message-removed", a.message_path,
                    f"{k} message(s) removed at {a.message_path}")
    return None
