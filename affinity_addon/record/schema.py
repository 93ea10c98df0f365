"""The record's types: normalized cache usage (and, later, the response record itself).

Everything here is immutable and JSON-friendly, so it can go into `flow.metadata` and JSONL.
"""

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Usage:
    """Normalized cache usage of one response.

    `input_tokens` counts every prompt token, including cache reads and writes, whatever the
    provider's own convention (Anthropic excludes cached tokens from its `input_tokens`, OpenAI
    includes them).
    """

    input_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    output_tokens: int = 0
    cache_write_5m_tokens: int | None = None
    cache_write_1h_tokens: int | None = None
    cost: float | None = None  # the provider's own cost figure (OpenRouter `usage.cost`), if any
    raw: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def uncached_tokens(self) -> int:
        return max(self.input_tokens - self.cache_read_tokens - self.cache_write_tokens, 0)

    @property
    def hit_ratio(self) -> float | None:
        """Token-weighted share of the prompt read from cache; None when there was no prompt."""
        if self.input_tokens <= 0:
            return None
        return min(self.cache_read_tokens / self.input_tokens, 1.0)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "input_tokens": self.input_tokens,
            "cache_read_tokens": self.cache_read_tokens,
            "cache_write_tokens": self.cache_write_tokens,
            "output_tokens": self.output_tokens,
        }
        if self.cache_write_5m_tokens is not None:
            d["cache_write_5m_tokens"] = self.cache_write_5m_tokens
        if self.cache_write_1h_tokens is not None:
            d["cache_write_1h_tokens"] = self.cache_write_1h_tokens
        if self.cost is not None:
            d["cost"] = self.cost
        return d
