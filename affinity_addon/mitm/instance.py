"""The instance name of a proxy behind a load balancer: `--set affinity_instance=a1` adds
`"instance": "a1"` to every record, so per-instance logs merged by `affinity report` still say
which proxy served each response."""

import re
from typing import Any

from mitmproxy import ctx, exceptions

from affinity_addon.mitm.state import State

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")


class Instance:
    name = "affinity-instance"

    def __init__(self, state: State) -> None:
        self.state = state

    def load(self, loader: Any) -> None:
        loader.add_option(
            "affinity_instance", str, "",
            "Name of this proxy instance, added to every record as `instance`. Empty: none.",
        )

    def configure(self, updated: set[str]) -> None:
        if "affinity_instance" not in updated:
            return
        name = ctx.options.affinity_instance.strip()
        if name and not _NAME.fullmatch(name):
            raise exceptions.OptionsError(
                f"Cannot parse affinity_instance option: {name!r} (letters, digits, . _ : -; "
                "at most 64)")
        self.state.instance = name
