"""What the demo shows: the live per-turn table, the final figures and the team tables."""

from __future__ import annotations

from dataclasses import dataclass, field

from rich import box
from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from tests.sim.workload import Result, Workload

from .session import Agent, Turn

VERDICT_STYLE = {"hit": "green", "first-write": "cyan", "prefix-changed": "yellow",
                 "ttl-expired": "yellow", "routed-away": "red", "below-minimum": "yellow"}


@dataclass
class Row:
    step: str
    bare: Turn | None = None
    addon: Turn | None = None
    affinity_id: str | None = None
    verdict: str | None = None


@dataclass
class State:
    agent: Agent
    rows: list[Row] = field(default_factory=list)
    status: str = ""


def pct(x: float | None) -> str:
    return "" if x is None else f"{x:.0%}"


def ratio_style(x: float) -> str:
    return "green" if x >= 0.8 else "yellow" if x >= 0.4 else "red"


def turn2_ratio(rows: list[Row], which: str) -> float:
    turns = [getattr(r, which) for r in rows[1:] if getattr(r, which) is not None]
    read = sum(t.cache_read for t in turns)
    total = sum(t.tokens_in for t in turns)
    return read / total if total else 0.0


def render_table(state: State) -> Table:
    t = Table(box=box.SIMPLE_HEAD, title_justify="left", expand=False,
              title=f"[bold]{state.agent.title}[/], model {state.agent.model}: "
                    "the same requests through both proxies")
    t.add_column("turn", justify="right")
    t.add_column("after", no_wrap=True)
    t.add_column("tokens in", justify="right")
    t.add_column("cache read\nwithout", justify="right")
    t.add_column("cache read\nwith addon", justify="right")
    t.add_column("hit ratio\nwithout", justify="right")
    t.add_column("hit ratio\nwith addon", justify="right")
    t.add_column("affinity ID", no_wrap=True)
    t.add_column("addon verdict", no_wrap=True)
    for i, r in enumerate(state.rows, 1):
        b, a = r.bare, r.addon
        either = a or b
        t.add_row(
            str(i), r.step,
            f"{either.tokens_in:,}" if either else "…",
            f"{b.cache_read:,}" if b else "…",
            f"{a.cache_read:,}" if a else "…",
            Text(pct(b.ratio), style=ratio_style(b.ratio)) if b else Text("…"),
            Text(pct(a.ratio), style=ratio_style(a.ratio)) if a else Text("…"),
            (r.affinity_id[:12] + "…") if r.affinity_id else "",
            Text(r.verdict or "", style=VERDICT_STYLE.get(r.verdict or "", "")),
        )
    return t


def render(state: State) -> Group:
    return Group(render_table(state), Text(state.status, style="dim"))


# A 5-row block font for the final numbers.
_FONT = {
    "0": ["███", "█ █", "█ █", "█ █", "███"], "1": [" █ ", "██ ", " █ ", " █ ", "███"],
    "2": ["███", "  █", "███", "█  ", "███"], "3": ["███", "  █", "███", "  █", "███"],
    "4": ["█ █", "█ █", "███", "  █", "  █"], "5": ["███", "█  ", "███", "  █", "███"],
    "6": ["███", "█  ", "███", "█ █", "███"], "7": ["███", "  █", "  █", "  █", "  █"],
    "8": ["███", "█ █", "███", "█ █", "███"], "9": ["███", "█ █", "███", "  █", "███"],
    "%": ["█  █", "  █ ", " █  ", "█   ", "   █"], " ": ["  "] * 5,
    ">": ["█   ", " █  ", "  █ ", " █  ", "█   "],
}


def big(text: str) -> list[str]:
    return ["  ".join(_FONT[c][row] for c in text) for row in range(5)]


def big_result(before: float, after: float) -> Panel:
    left, mid, right = big(f"{before:.0%}"), big(">"), big(f"{after:.0%}")
    labels = ("without the addon", "with the addon")
    wl = max(len(left[0]), len(labels[0]))
    gap = " " * 4
    rows = [Text.assemble((labels[0].ljust(wl), "bold"), gap, " " * len(mid[0]), gap,
                          (labels[1], "bold"))]
    for lrow, mrow, rrow in zip(left, mid, right, strict=True):
        rows.append(Text.assemble((lrow.ljust(wl), f"bold {ratio_style(before)}"), gap,
                                  (mrow, "dim"), gap, (rrow, f"bold {ratio_style(after)}")))
    return Panel(Text("\n").join(rows), title="prompt-cache hit ratio, turns 2+", expand=False,
                 padding=(1, 3))



def team_title(w: Workload) -> str:
    what = f"{w.conversations} conversations one after another" if w.conversations else \
        f"{w.duration / 60:.0f} minutes"
    return f"{w.agents} agent(s), ~{w.rpm:g} RPM, {what}"


def team_table(w: Workload, results: list[tuple[str, Result, float, str]]) -> Table:
    t = Table(box=box.SIMPLE_HEAD, title_justify="left",
              title=f"[bold]{w.name}[/]: {team_title(w)}")
    for col in ("prompt_cache_key", "hit ratio\nall turns", "hit ratio\nfirst turns",
                "requests", "overflowed", "buckets", "wall"):
        t.add_column(col, justify="left" if col == "prompt_cache_key" else "right",
                     no_wrap=col == "prompt_cache_key")
    for row, r, wall, buckets in results:
        t.add_row(row, Text(f"{r.ratio:.2f}", style=ratio_style(r.ratio)),
                  f"{r.first_ratio:.2f}", str(r.requests), str(r.overflowed), buckets,
                  f"{wall:.1f} s")
    return t
