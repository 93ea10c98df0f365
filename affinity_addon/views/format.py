"""Number and name formatting shared by the console tables and the HTML page."""

from collections.abc import Mapping

from affinity_addon.tokens import format_tokens as fmt_tokens
from affinity_addon.views.aggregate import NONE_KEY, Bucket
from affinity_addon.views.pricing import USD

__all__ = ["fmt_cost", "fmt_ratio", "fmt_tokens", "short_id", "top_buckets"]


def top_buckets(table: Mapping[str, Bucket], n: int | None = None) -> list[Bucket]:
    """Largest first by prompt tokens, then by requests; n=None or 0 keeps all."""
    ranked = sorted(table.values(), key=lambda b: (-b.input_tokens, -b.requests, b.key))
    return ranked[:n] if n else ranked


def fmt_ratio(r: float | None) -> str:
    return "–" if r is None else f"{r * 100:.1f}%"


def fmt_cost(value: float, unit: str) -> str:
    if unit == USD:
        sign = "-" if value < 0 else ""
        value = abs(value)
        return f"{sign}${value:,.2f}" if value >= 1 else f"{sign}${value:.4f}"
    return f"{fmt_tokens(value)} teq"


def short_id(value: str | None, n: int = 12) -> str:
    if not value:
        return NONE_KEY
    return value if len(value) <= n else value[:n] + "…"
