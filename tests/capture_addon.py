"""A mitmproxy script for tests: keeps every request body as the client sent it.

Loaded with `-s` before the affinity addon (`start_proxy(scripts=...)`), so its `request` hook
runs first and sees the bytes before any rule changes them. Bodies go to `capture_dir`, one file
per request, numbered in arrival order: `<n>-<host>.body`.
"""

import itertools
from pathlib import Path

from mitmproxy import http
from mitmproxy.addonmanager import Loader
from mitmproxy.ctx import options


class Capture:
    def __init__(self) -> None:
        self.count = itertools.count()

    def load(self, loader: Loader) -> None:
        loader.add_option("capture_dir", str, "", "directory for the captured request bodies")

    def request(self, flow: http.HTTPFlow) -> None:
        if not options.capture_dir or flow.request.method != "POST":
            return
        folder = Path(options.capture_dir)
        folder.mkdir(parents=True, exist_ok=True)
        name = f"{next(self.count):03d}-{flow.request.pretty_host}.body"
        (folder / name).write_bytes(flow.request.raw_content or b"")


addons = [Capture()]
