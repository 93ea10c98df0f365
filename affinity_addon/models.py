"""Model names, the one place they are normalized. The `model` string is client-controlled and
handled on the event loop for every request, so every function here is linear in a capped name.

- `normalize_model`: the name as the catalogs match it (cache minimums, 1h-TTL and last-marker
  models): lower case, vendor prefix dropped, dots as dashes.
- `model_family`: the name that one cached conversation keeps across snapshots (affinity roots,
  prompt families, metric labels): lower case, without dates and context tags.
"""

import re
from typing import Any

# Matched only against the end of the name (`fullmatch` on a fixed-size tail), never searched
# for: the model string is client-controlled and runs on the event loop for every request.
_DATED = re.compile(r"[-@]\d{8}|-\d{4}-\d{2}-\d{2}")  # @: Vertex snapshots
# Real model names are under 100 characters; longer ones are cut before any work is done on
# them, so a 1 MB `model` (client-controlled) costs one slice, not a scan per suffix.
MAX_MODEL_CHARS = 256


def normalize_model(model: str) -> str:
    """`anthropic/claude-sonnet-4.5`, `us.anthropic.claude-sonnet-4-5-v1:0` -> `claude-sonnet-4-5...`."""
    name = model[:MAX_MODEL_CHARS].strip().lower().rsplit("/", 1)[-1]
    # Bedrock prefixes are dotted words ("us.", "anthropic."); version dots follow a digit or dash.
    name = re.sub(r"^(?:[a-z]+\.)+", "", name)
    return name.replace(".", "-")


def _strip_suffix(m: str) -> str:
    """`m` without one trailing variant suffix ([1m], -20250929, -2024-08-06, -latest)."""
    if m.endswith("]"):
        # The first "[" after the previous "]": scans only the suffix it removes, so all rounds
        # together stay linear.
        start = m.find("[", m.rfind("]", 0, len(m) - 1) + 1)
        return m[:start] if start >= 0 else m
    if m.endswith("-latest"):
        return m[:-7]
    for size in (9, 11):  # -YYYYMMDD, -YYYY-MM-DD
        if len(m) >= size and _DATED.fullmatch(m, len(m) - size):
            return m[:-size]
    return m


def model_family(model: Any) -> str:
    """The model name without snapshot dates and context tags, lower case, at most 256 chars.

    Linear in the (capped) name: each round removes one suffix in time proportional to it.
    """
    if not isinstance(model, str):
        return ""
    m = model[:MAX_MODEL_CHARS * 4].strip()[:MAX_MODEL_CHARS].lower()
    while True:
        stripped = _strip_suffix(m)
        if stripped == m:
            return m
        m = stripped
