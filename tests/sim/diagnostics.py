"""Provider cache diagnostics, as the providers document them (never from the addon's code).

Anthropic, https://platform.claude.com/docs/en/build-with-claude/cache-diagnostics (and the SDK
types `diagnostics_param.py`, `diagnostics.py`, `cache_miss_*.py`):
- a request that carries a `diagnostics` object opts in: the API keeps a fingerprint of it
  (hashes and token counts, never text), keyed by the response id, scoped to the workspace;
  requests without the object store nothing;
- `diagnostics.previous_message_id` names the response to compare with; null (a first turn)
  opts in without a comparison;
- the answer is the first point of divergence: `model_changed` (model or `speed`), then in the
  prompt's own order (tools -> system -> messages) `tools_changed`, `system_changed`; `unavailable`
  where model, system and tools match but other prompt-affecting parameters differ (`thinking`,
  `tool_choice`, `context_management`, `output_config`, `output_format`, the `anthropic-beta`
  set); `messages_changed` where an earlier message differs instead of only new ones appended;
  each with `cache_missed_input_tokens`. No stored fingerprint: `previous_message_not_found`.
  Nothing diverged: `diagnostics: null`. Still comparing: `{"cache_miss_reason": null}`;
- it comes back as the message's top-level `diagnostics`: in JSON, and on `message_start` when
  streaming.

OpenAI, https://developers.openai.com/api/docs/guides/prompt-caching/diagnostics (and the SDK
types `PromptCacheOptions`, `PromptCacheDiagnostics*`):
- Responses API, GPT-5.6 and later: `prompt_cache_options.comparison_response_id` names a recent
  completed response of the same organization (any of them may be named; it loads nothing);
- the answer is `prompt_cache_diagnostics`: `{"type": "cache_hit"}`, `{"type": "cache_miss",
  "reason": ..., "cache_missed_tokens": N, "comparison_reusable_tokens": M}` with the first
  classified reason of model, prompt_cache_key, service tier, tools, text format, reasoning
  effort, verbosity, compaction, input; `comparison_response_not_found`; `unavailable`
  (inconclusive, model unsupported, not ready). Streaming: in `response.completed`'s `response`.

Test knobs (`x-sim-fault`): `diagnosis=<word>` answers `<word>` instead (`pending`: still
comparing; `malformed`: an object of an API the docs do not have; any other word: that result,
a provider surprise), `reject-diagnostics`: a 400 naming the field, as an API without the
feature would answer.
"""

import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from tests.sim.render import Block

# Fingerprints kept (a bounded stand-in for the providers' "limited time").
MAX_PRINTS = 100_000
OPENAI_REASONS = ("model_changed", "prompt_cache_key_changed", "service_tier_changed",
                  "tools_changed", "text_format_changed", "reasoning_effort_changed",
                  "verbosity_changed", "context_compacted", "input_changed")
# Anthropic parameters that change the prompt without being model, system, tools or messages.
ANTHROPIC_OTHER = ("thinking", "tool_choice", "context_management", "output_config",
                   "output_format")
REJECTED = {"anthropic": (400, "diagnostics: Extra inputs are not permitted"),
            "openai": (400, "Unknown parameter: 'prompt_cache_options.comparison_response_id'.")}


def _h(value: Any) -> bytes:
    data = value if isinstance(value, bytes) else json.dumps(
        value, sort_keys=False, ensure_ascii=False, separators=(",", ":")).encode()
    return hashlib.sha256(data).digest()[:12]


@dataclass(frozen=True, slots=True)
class Section:
    """One part of the prompt, block by block: digests and token counts."""

    digests: tuple[bytes, ...]
    tokens: tuple[int, ...]

    @property
    def total(self) -> int:
        return sum(self.tokens)


def _section(blocks: list[Block]) -> Section:
    return Section(tuple(_h((b.head + "\x1f" + b.text).encode()) for b in blocks),
                   tuple(b.tokens for b in blocks))


def _messages(blocks: list[Block]) -> tuple[tuple[bytes, int], ...]:
    """One (digest, tokens) per message, in order."""
    out: dict[int, tuple[Any, int]] = {}
    for b in blocks:
        if b.message is None:
            continue
        h, n = out.get(b.message, (hashlib.sha256(), 0))
        h.update((b.head + "\x1f" + b.text).encode())
        out[b.message] = (h, n + b.tokens)
    return tuple((h.digest()[:12], n) for _, (h, n) in sorted(out.items()))


@dataclass(frozen=True, slots=True)
class Print:
    """What a provider keeps of a request to compare the next one with: no text."""

    scope: bytes  # the workspace / organization (a hash of the API key)
    model: bytes
    tools: Section
    system: Section
    settings: dict[str, bytes]
    messages: tuple[tuple[bytes, int], ...]

    @property
    def total(self) -> int:
        return self.tools.total + self.system.total + sum(n for _, n in self.messages)


def fingerprint(scope: str, model: bytes, blocks: list[Block], settings: dict[str, Any]) -> Print:
    return Print(_h(scope.encode()), model,
                 _section([b for b in blocks if b.role == "tools"]),
                 _section([b for b in blocks if b.message is None and b.role != "tools"]),
                 {k: _h(v) for k, v in settings.items()},
                 _messages(blocks))


def _common_messages(old: Print, new: Print) -> tuple[int, int]:
    """(messages the new request shares with the old from the start, their tokens)."""
    n, tokens = 0, 0
    for a, b in zip(old.messages, new.messages, strict=False):
        if a[0] != b[0]:
            break
        n, tokens = n + 1, tokens + a[1]
    return n, tokens


class Diagnoses:
    """The fingerprints both providers keep, and their answers."""

    def __init__(self) -> None:
        self._prints: OrderedDict[str, Print] = OrderedDict()
        self._lock = threading.Lock()

    def reset(self) -> None:
        with self._lock:
            self._prints.clear()

    def keep(self, response_id: str, p: Print) -> None:
        with self._lock:
            self._prints[response_id] = p
            while len(self._prints) > MAX_PRINTS:
                self._prints.popitem(last=False)

    def find(self, response_id: str, scope: bytes) -> Print | None:
        with self._lock:
            p = self._prints.get(response_id)
        return p if p is not None and p.scope == scope else None

    # --- Anthropic -------------------------------------------------------------------------

    def anthropic(self, previous: str | None, cur: Print, forced: str | None) -> Any:
        """The `diagnostics` object of a reply (None: nothing diverged, or nothing to compare)."""
        if forced is not None:
            return _forced_anthropic(forced)
        if previous is None:
            return None
        old = self.find(previous, cur.scope)
        if old is None:
            return {"cache_miss_reason": {"type": "previous_message_not_found"}}
        missed = old.total
        if old.model != cur.model:
            return _miss("model_changed", missed)
        if old.tools != cur.tools:
            return _miss("tools_changed", missed - _shared(old.tools, cur.tools))
        if old.system != cur.system:
            return _miss("system_changed", missed - old.tools.total
                         - _shared(old.system, cur.system))
        if old.settings != cur.settings:
            return {"cache_miss_reason": {"type": "unavailable"}}
        n, tokens = _common_messages(old, cur)
        if n < len(old.messages):
            return _miss("messages_changed", missed - old.tools.total - old.system.total - tokens)
        return None

    # --- OpenAI ----------------------------------------------------------------------------

    def openai(self, comparison: str, cur: Print, read: int, supported: bool,
               forced: str | None) -> dict[str, Any]:
        """The `prompt_cache_diagnostics` object of a reply that asked for one."""
        if forced is not None:
            return _forced_openai(forced)
        if not supported:
            return {"type": "unavailable"}
        old = self.find(comparison, cur.scope)
        if old is None:
            return {"type": "comparison_response_not_found"}
        reason = _openai_reason(old, cur)
        if reason is None:
            # Nothing in the request explains a miss: reused, or inconclusive (evicted, moved).
            return {"type": "cache_hit"} if read > 0 else {"type": "unavailable"}
        shared = 0  # tokens before the first divergence
        if reason == "tools_changed":
            shared = _shared(old.tools, cur.tools)
        elif reason in ("context_compacted", "input_changed"):
            shared = old.tools.total
            if old.system == cur.system:
                shared += old.system.total + _common_messages(old, cur)[1]
        return {"type": "cache_miss", "reason": reason,
                "cache_missed_tokens": max(cur.total - shared, 0),
                "comparison_reusable_tokens": old.total}


def _shared(a: Section, b: Section) -> int:
    tokens = 0
    for x, y, n in zip(a.digests, b.digests, a.tokens, strict=False):
        if x != y:
            break
        tokens += n
    return tokens


def _miss(kind: str, tokens: int) -> dict[str, Any]:
    return {"cache_miss_reason": {"type": kind, "cache_missed_input_tokens": max(tokens, 0)}}


def _openai_reason(old: Print, cur: Print) -> str | None:
    checks = (
        ("model_changed", old.model != cur.model),
        ("prompt_cache_key_changed", old.settings.get("prompt_cache_key")
         != cur.settings.get("prompt_cache_key")),
        ("service_tier_changed", old.settings.get("service_tier")
         != cur.settings.get("service_tier")),
        ("tools_changed", old.tools != cur.tools),
        ("text_format_changed", old.settings.get("format") != cur.settings.get("format")),
        ("reasoning_effort_changed", old.settings.get("effort") != cur.settings.get("effort")),
        ("verbosity_changed", old.settings.get("verbosity") != cur.settings.get("verbosity")),
    )
    reason = next((r for r, differs in checks if differs), None)
    if reason is not None:
        return reason
    n, _ = _common_messages(old, cur)
    if old.system != cur.system or n < len(old.messages):
        compacted = cur.settings.get("compaction") is not None and\
            cur.settings.get("compaction") != old.settings.get("compaction")
        return "context_compacted" if compacted else "input_changed"
    return None


def _forced_anthropic(word: str) -> Any:
    if word == "pending":
        return {"cache_miss_reason": None}
    if word == "malformed":
        return {"cache_miss_reason": "tools"}  # a string where the docs have an object
    if word in ("previous_message_not_found", "unavailable"):
        return {"cache_miss_reason": {"type": word}}
    return _miss(word, 1000)


def _forced_openai(word: str) -> dict[str, Any]:
    if word == "pending":
        return {"type": "unavailable"}  # OpenAI's "not ready"
    if word == "malformed":
        return {"type": 42}
    if word in OPENAI_REASONS:
        return {"type": "cache_miss", "reason": word, "cache_missed_tokens": 1000,
                "comparison_reusable_tokens": 1000}
    return {"type": word}


def anthropic_settings(body: dict[str, Any], betas: str | None) -> dict[str, Any]:
    """The other prompt-affecting parameters of an Anthropic request."""
    out = {k: body[k] for k in ANTHROPIC_OTHER if k in body}
    if betas:
        out["anthropic-beta"] = sorted(b.strip() for b in betas.split(",") if b.strip())
    return out


def openai_settings(body: dict[str, Any]) -> dict[str, Any]:
    """The request settings OpenAI's diagnosis names, and compaction items in the input."""
    text = body.get("text") if isinstance(body.get("text"), dict) else {}
    reasoning = body.get("reasoning") if isinstance(body.get("reasoning"), dict) else {}
    items = body.get("input") if isinstance(body.get("input"), list) else []
    compaction = [i for i, item in enumerate(items)
                  if isinstance(item, dict) and item.get("type") == "compaction"]
    return {"prompt_cache_key": body.get("prompt_cache_key"),
            "service_tier": body.get("service_tier") or "auto",
            "format": text.get("format"), "verbosity": text.get("verbosity"),
            "effort": reasoning.get("effort"), "compaction": compaction or None}
