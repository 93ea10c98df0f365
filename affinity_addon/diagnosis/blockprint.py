"""A prompt's fingerprint as data: one row per block (digest, lengths, where it sits, its
cache marker) and the 4-byte hashes of each 256-character chunk of its text, packed into bytes,
and the unpacked forms a judgement works on. Holds hashes and lengths, never text: a
200-message conversation costs a few KB, not a few hundred.
"""

import hashlib
import struct
from dataclasses import dataclass
from typing import NamedTuple

from affinity_addon.request.breakpoint_spec import DIGEST_SIZE

CHUNK_CHARS = 256
IGNORED = "ignored"  # the kind of a block that matched a volatile pattern

# digest, chars, tokens, message index (-1: none), envelope hash,
# label indexes (path, kind, section, ttl+1, text field+1), flags.
# A block's chunk hashes follow those of the blocks before it: ceil(chars / CHUNK_CHARS) of them.
ROW = struct.Struct(f"<{DIGEST_SIZE}sIIiIHHHHHB")
CHUNK_ROW = struct.Struct("<I")
MARKED, SYSTEM, FIRST, REASONING, REL_PATH, CHUNKED, CARRIER = 1, 2, 4, 8, 16, 32, 64


class BlockPrint(NamedTuple):
    """One prompt segment, unpacked from a Fingerprint. Holds hashes and lengths, no text.

    A NamedTuple, not a frozen dataclass: a 1 MB prompt unpacks to thousands of these, and a
    frozen dataclass's __init__ (one object.__setattr__ per field) cost more than the rest of
    the verdict together."""

    path: str
    section: str
    kind: str
    digest: bytes
    chars: int
    tokens: int
    marked: bool
    ttl: str | None
    message_index: int | None = None
    text_field: str | None = None  # "text"/"content": the text's key, "": the block is a string
    system: bool = False  # system/developer/instructions content
    first: bool = False  # first block of its message
    envelope: int = 0  # hash of the message's other fields (role, tool_calls, ...)
    reasoning: bool = False  # the message carries reasoning fields
    chunks: bytes = b""  # 4-byte hash per CHUNK_CHARS characters of the text
    carrier: bool = False  # a message without content blocks (tool_calls only): not a prompt segment

    @property
    def ignored(self) -> bool:
        return self.kind == IGNORED

    @property
    def text_path(self) -> str:
        if self.text_field:
            return f"{self.path}.{self.text_field}"
        return self.path

    @property
    def message_path(self) -> str:
        if self.message_index is None:
            return self.path
        return f"{self.section}[{self.message_index}]"


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """The prompt of one request, packed. Read it through `.blocks`."""

    model: str | None
    total_tokens: int
    settings: tuple[tuple[str, bytes], ...]  # (field, digest) of PREFIX_SETTINGS present
    rows: bytes  # ROW-packed, one per block
    labels: tuple[str, ...]  # strings the rows point at: paths, kinds, sections, ttls
    chunks: bytes  # CHUNK_ROW-packed text chunk hashes

    def __len__(self) -> int:
        return len(self.rows) // ROW.size

    def unpack(self) -> "Blocks":
        """The blocks, decoded. Unpacking costs far more than anything done with the blocks:
        a judgement unpacks each fingerprint once and passes the result along; the stored
        fingerprint itself stays packed and never changes."""
        blocks = self._decode()
        return Blocks(blocks, [b for b in blocks if not b.ignored])

    @property
    def blocks(self) -> tuple[BlockPrint, ...]:
        return self.unpack().all

    def _decode(self) -> tuple[BlockPrint, ...]:
        labels, out, chunk0 = self.labels, [], 0
        for row in ROW.iter_unpack(self.rows):
            digest, chars, tokens, mi, env, path, kind, section, ttl, field, flags = row
            n_chunks = -(-chars // CHUNK_CHARS) if field and flags & CHUNKED else 0
            section_s = labels[section]
            out.append(BlockPrint(
                path=f"{section_s}[{mi}]{labels[path]}" if flags & REL_PATH else labels[path],
                section=section_s,
                kind=labels[kind],
                digest=digest,
                chars=chars,
                tokens=tokens,
                marked=bool(flags & MARKED),
                ttl=labels[ttl - 1] if ttl else None,
                message_index=None if mi < 0 else mi,
                text_field=labels[field - 1] if field else None,
                system=bool(flags & SYSTEM),
                first=bool(flags & FIRST),
                envelope=env,
                reasoning=bool(flags & REASONING),
                carrier=bool(flags & CARRIER),
                chunks=self.chunks[chunk0 * CHUNK_ROW.size:(chunk0 + n_chunks) * CHUNK_ROW.size],
            ))
            chunk0 += n_chunks
        return tuple(out)

    @property
    def comparable(self) -> list[BlockPrint]:
        """The blocks that count for the prefix: volatile (ignored) ones left out."""
        return self.unpack().comparable

    def plan_digests(self, unpacked: "Blocks | None" = None) -> bytes:
        """Digests of the prompt segments in order, as the breakpoint planner computes them
        (a volatile block's is zero: it matches anything). For `breakpoints.PlanHint`."""
        return b"".join(b.digest for b in (unpacked or self.unpack()).all if not b.carrier)

    def parts(self, unpacked: "Blocks | None" = None) -> "PromptParts":
        """Digests of the parts that tell conversations and their side requests apart."""
        tools, system, opening = (hashlib.blake2b(digest_size=DIGEST_SIZE) for _ in range(3))
        opening_msg: int | None = None
        leading = True
        for b in (unpacked or self.unpack()).comparable:
            if b.section == "tools":
                tools.update(b.digest)
            elif b.system and (b.message_index is None or leading):
                system.update(b.digest)
            elif b.message_index is not None:
                leading = False
                if opening_msg is None:
                    opening_msg = b.message_index
                if b.message_index == opening_msg:
                    opening.update(b.digest)
        return PromptParts(tools.digest(), system.digest(), opening.digest())

    def history(self, unpacked: "Blocks | None" = None) -> bytes:
        """Digests of the conversation's message blocks after the leading system ones, in
        order, concatenated (DIGEST_SIZE bytes each)."""
        out, leading = [], True
        for b in (unpacked or self.unpack()).comparable:
            if b.message_index is None or (leading and b.system):
                continue
            leading = False
            out.append(b.digest)
        return b"".join(out)

    @property
    def last_ttl(self) -> str | None:
        """The `ttl` of the last marked block, the one the next request reads from (read off the
        packed rows: no unpacking)."""
        ttl = None
        for *_, ttl_label, _field, flags in ROW.iter_unpack(self.rows):
            if flags & MARKED:
                ttl = self.labels[ttl_label - 1] if ttl_label else None
        return ttl


@dataclass(frozen=True, slots=True)
class Blocks:
    """A fingerprint unpacked for one judgement: made once, passed along, then dropped."""

    all: tuple[BlockPrint, ...]
    comparable: list[BlockPrint]  # volatile (ignored) blocks left out


@dataclass(frozen=True, slots=True)
class PromptParts:
    """A request's tools, leading system prompt and first conversation message, as digests."""

    tools: bytes
    system: bytes
    opening: bytes

    @property
    def family(self) -> tuple[bytes, bytes]:
        return self.tools, self.system
