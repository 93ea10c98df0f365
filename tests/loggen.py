"""Realistic affinity JSONL logs for report and stats tests (docs/log-format.md, v1).

Conversations run over time on several providers/models/rules. Each turn appends to the prompt;
the cache counters follow what each provider does (Anthropic writes the new suffix, OpenAI-style
providers only read), and misses of every reason are mixed in: first writes, changed prefixes,
expired TTLs after long pauses, routing to a cold server, prompts below the minimum, lookback
overruns, unexplained misses, plus response-cache hits, failed requests without usage and a
dry-run rule with predictions.
"""

import hashlib
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

START = datetime(2026, 11, 23, 8, 0, 0, tzinfo=UTC)


@dataclass(frozen=True)
class Target:
    rule: str
    host: str
    path: str
    provider: str
    models: tuple[str, ...]
    writes: bool  # reports cache writes (Anthropic-style explicit caching)
    dry_run: bool = False
    response_cache: bool = False


TARGETS = (
    Target("anthropic-api", "api.anthropic.com", "/v1/messages", "anthropic",
           ("claude-sonnet-4-5-20250929", "claude-opus-5-5"), writes=True),
    Target("openai-responses", "api.openai.com", "/v1/responses", "openai-responses",
           ("gpt-5.6", "gpt-5"), writes=False),
    Target("xai-chat", "api.x.ai", "/v1/chat/completions", "openai-chat", ("grok-4",),
           writes=False),
    Target("openrouter", "openrouter.ai", "/api/v1/chat/completions", "openai-chat",
           ("google/gemini-2.5-pro", "anthropic/claude-sonnet-4.5"), writes=False,
           response_cache=True),
    Target("deepseek-dry", "api.deepseek.com", "/chat/completions", "openai-chat",
           ("deepseek-v4-flash",), writes=False, dry_run=True),
)

DETAILS = {
    "prefix-changed": ["system[0].text changed at ~char {n}", "tools[{k}] changed",
                       "messages[{k}].content[0] changed at ~char {n}"],
    "ttl-expired": ["idle {n}s > ttl 300s", "idle {n}s > ttl 3600s"],
    "routed-away": ["same prefix, read 0: different server"],
    "below-minimum": ["prefix ~{n} tokens < minimum 1024"],
    "lookback-exceeded": ["breakpoint {k} blocks after the last cached one (> 20)"],
    "unknown": [None],
    "first-write": ["new conversation"],
}


def _iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def _usage_raw(target: Target, u: dict[str, int]) -> dict[str, Any]:
    if target.provider == "anthropic":
        return {"input_tokens": u["input_tokens"] - u["cache_read_tokens"] - u["cache_write_tokens"],
                "cache_creation_input_tokens": u["cache_write_tokens"],
                "cache_read_input_tokens": u["cache_read_tokens"],
                "cache_creation": {"ephemeral_5m_input_tokens": u["cache_write_tokens"],
                                   "ephemeral_1h_input_tokens": 0},
                "output_tokens": u["output_tokens"], "service_tier": "standard"}
    if target.provider == "openai-responses":
        return {"input_tokens": u["input_tokens"],
                "input_tokens_details": {"cached_tokens": u["cache_read_tokens"]},
                "output_tokens": u["output_tokens"],
                "output_tokens_details": {"reasoning_tokens": u["output_tokens"] // 3},
                "total_tokens": u["input_tokens"] + u["output_tokens"]}
    return {"prompt_tokens": u["input_tokens"], "completion_tokens": u["output_tokens"],
            "total_tokens": u["input_tokens"] + u["output_tokens"],
            "prompt_tokens_details": {"cached_tokens": u["cache_read_tokens"]}}


def _record(rng: random.Random, target: Target, model: str, conv: str, t: datetime,
            usage: dict[str, int] | None, reason: str | None, *, response_cache: bool = False,
            predicted: float | None = None) -> dict[str, Any]:
    detail = None
    if reason in DETAILS:
        detail = rng.choice(DETAILS[reason])
        if detail:
            detail = detail.format(n=rng.randint(40, 9000), k=rng.randint(0, 40))
    ok = usage is not None or response_cache
    hit_ratio = None
    if usage is not None and usage["input_tokens"] > 0:
        hit_ratio = usage["cache_read_tokens"] / usage["input_tokens"]
    source = "header:x-grok-conv-id" if target.host == "api.x.ai" else "root"
    return {
        "v": 1,
        "ts": _iso(t),
        "flow_id": hashlib.md5(f"{conv}{t}".encode()).hexdigest()[:8] + "-flow-id-0000",
        "rule": target.rule,
        "rules": [target.rule, "log-everything"],
        "provider": target.provider,
        "host": target.host,
        "path": target.path,
        "method": "POST",
        "model": model,
        "affinity_id": conv,
        "affinity_source": source,
        "stream": rng.random() < 0.8,
        "transport": "http",
        "status": 200 if ok else rng.choice([None, 529, 500]),
        "complete": ok,
        "error": None if ok else "peer closed connection without sending complete message body",
        "duration_ms": round(rng.uniform(300, 25000), 1),
        "usage": usage,
        "usage_raw": _usage_raw(target, usage) if usage else None,
        "hit_ratio": hit_ratio,
        "response_cache": response_cache,
        "added": {"headers": {"x-grok-conv-id": conv} if target.host == "api.x.ai" else {},
                  "fields": {"prompt_cache_key": conv} if "openai" in target.rule else {},
                  "markers": [{"path": "system[0]", "ttl": "5m"}] if target.writes else []},
        "dry_run": target.dry_run,
        "miss_reason": "response-cache" if response_cache else reason,
        "miss_detail": detail,
        "expected_cacheable_tokens": None if reason == "first-write" else rng.randint(0, 50000),
        "predicted_hit_ratio": predicted,
        "provider_diagnosis": None,
    }


def conversation(rng: random.Random, index: int, start: datetime) -> Iterator[dict[str, Any]]:
    target = TARGETS[index % len(TARGETS)]
    model = target.models[(index // len(TARGETS)) % len(target.models)]
    conv = hashlib.sha256(f"conv-{index}-{rng.random()}".encode()).hexdigest()[:32]
    t = start
    prompt = rng.randint(1500, 12000)
    cached = 0  # tokens the provider holds for this conversation
    for turn in range(rng.randint(3, 24)):
        gap = rng.choice([5, 10, 20, 40, 60, 90]) if rng.random() > 0.08 else rng.randint(400, 5000)
        t += timedelta(seconds=gap + rng.random())
        if turn:
            prompt += rng.randint(50, 3000)
        output = rng.randint(20, 2500)
        reason: str
        if turn == 0:
            reason, read = "first-write", 0
        elif gap > 300:
            reason, read = "ttl-expired", 0
        else:
            roll = rng.random()
            if roll < 0.70:
                reason, read = "hit", cached
            elif roll < 0.80:
                reason, read = "prefix-changed", rng.randint(0, cached // 2)
            elif roll < 0.85:
                reason, read = "routed-away", 0
            elif roll < 0.89:
                reason, read = "lookback-exceeded", 0
            elif roll < 0.92:
                reason, read = "unknown", 0
            else:
                reason, read = "hit", cached
        if prompt < 2000 and reason == "first-write":
            reason = "below-minimum"
        write = prompt - read if target.writes and reason != "below-minimum" else 0
        # A little fresh suffix always stays uncached, as after the last breakpoint.
        write = max(write - rng.randint(1, 40), 0)
        usage = {"input_tokens": prompt, "cache_read_tokens": read, "cache_write_tokens": write,
                 "output_tokens": output}
        roll = rng.random()
        if roll < 0.03:
            yield _record(rng, target, model, conv, t, None, None)
            continue
        if target.response_cache and roll < 0.08:
            yield _record(rng, target, model, conv, t,
                          {"input_tokens": 0, "cache_read_tokens": 0, "cache_write_tokens": 0,
                           "output_tokens": 0}, None, response_cache=True)
            continue
        predicted = None
        if target.dry_run:
            predicted = round(min(1.0, (read + rng.randint(0, prompt // 2)) / prompt), 3)
        yield _record(rng, target, model, conv, t, usage, reason, predicted=predicted)
        cached = prompt


def generate(conversations: int = 40, seed: int = 1, start: datetime = START,
             span: timedelta = timedelta(hours=6)) -> list[dict[str, Any]]:
    """All records of `conversations` conversations, ordered by time."""
    rng = random.Random(seed)
    records: list[dict[str, Any]] = []
    for i in range(conversations):
        begin = start + timedelta(seconds=rng.uniform(0, span.total_seconds()))
        records.extend(conversation(rng, i, begin))
    records.sort(key=lambda r: r["ts"])
    return records


def write_log(path: Path, records: list[dict[str, Any]], *, malformed: int = 0) -> Path:
    """Write records as JSONL; `malformed` bad lines are spread among them."""
    lines = [json.dumps(r, separators=(",", ":")) for r in records]
    bad = ['{"v": 1, "ts": "2026-11-23T09:00:00.000Z", "usage": {"input_tok', "not json at all",
           "[1, 2, 3]", "\x00\x01garbage", '"just a string"']
    step = max(len(lines) // (malformed + 1), 1)
    for k in range(malformed):
        lines.insert(min((k + 1) * step + k, len(lines)), bad[k % len(bad)])
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_big_log(path: Path, target_bytes: int, seed: int = 7) -> int:
    """Fill `path` with about `target_bytes` of log; returns the record count.

    A base set of conversations is serialized once and repeated with fresh affinity IDs, so
    100 MB takes about a second to write and still has thousands of distinct conversations.
    """
    base = generate(conversations=300, seed=seed)
    lines = [(r["affinity_id"], json.dumps(r, separators=(",", ":")) + "\n") for r in base]
    written = count = block = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target_bytes:
            prefix = f"{block:05x}"
            chunk = "".join(line.replace(conv, prefix + conv[5:]) for conv, line in lines)
            f.write(chunk)
            written += len(chunk)
            count += len(lines)
            block += 1
    return count
