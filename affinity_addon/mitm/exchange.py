"""One matched flow's way through the pipeline, as one typed object the pipeline owns.

The rewriter makes it when a rule matches the request; the recorder adds the response's reader
and stream tap, and builds the record from it once the answer has gone. It lives here, keyed by
flow id, never in `flow.metadata` (which mitmproxy must be able to save: a stream tap or a
pending fingerprint would not pickle).
"""

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from affinity_addon.diagnosis.tracker import Pending
from affinity_addon.mitm.scheduler import Stepped
from affinity_addon.record.schema import RequestFacts
from affinity_addon.request.provider_link import Resolver, Thread
from affinity_addon.response.tap import Tap
from affinity_addon.response.usage import UsageReader

# Flows whose answer never came (no response, no error hook: should not happen); past this
# the oldest are forgotten, so a leak cannot grow without bound.
MAX_OPEN = 50_000


@dataclass(slots=True)
class Exchange:
    request: RequestFacts
    # The cache key's request rate when the request was sent: the `overflow` verdict's evidence
    # (None: no prompt_cache_key, or no documented limit on the host).
    load: Mapping[str, Any] | None = None
    # The request's fingerprint, computed in slices while the provider works on it.
    fingerprint: Stepped[Pending] | None = None
    reader: UsageReader | None = None  # the response's usage, as it is read
    tap: Tap | None = None  # the stream's tap, when the answer is SSE or an AWS event stream
    # The conversation thread whose next request names this one's response (provider
    # diagnostics); None when the request is not linked.
    link: Thread | None = None
    resolver: Resolver | None = None  # how the thread reads this response's id before the record
    body_read: bool = False  # a JSON body was fed to the reader (once, whoever needed it first)
    body_problem: str | None = None  # why that body could not be read


class Exchanges:
    """The open exchanges by flow id, oldest first."""

    def __init__(self, limit: int = MAX_OPEN) -> None:
        self.limit = limit
        self.open: dict[str, Exchange] = {}

    def start(self, flow_id: str, exchange: Exchange) -> None:
        self.open.pop(flow_id, None)
        self.open[flow_id] = exchange
        while len(self.open) > self.limit:
            del self.open[next(iter(self.open))]

    def get(self, flow_id: str) -> Exchange | None:
        return self.open.get(flow_id)

    def end(self, flow_id: str) -> Exchange | None:
        return self.open.pop(flow_id, None)

    def __len__(self) -> int:
        return len(self.open)

    def __iter__(self) -> Iterator[Exchange]:
        return iter(self.open.values())
