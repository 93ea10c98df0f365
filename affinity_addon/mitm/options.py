"""The affinity options: one table (name, type, default, help, parse), declared and checked from
it, and the settings the hooks read per flow.

Each option's `parse` is its only check. It runs on the raw `--set` string while the script
loads (`check_deferred`) and on the typed value at every configure (`parse_options`):
`--set name=value` for a script's option is held back ("deferred") until the script declares
the option, and a value that then fails mitmproxy's own type conversion makes mitmproxy drop
the whole script without a word (measured with mitmproxy 12.3.1: exit status 0, nothing logged
even with -v; `process_deferred` in mitmproxy/optmanager.py, docs/mitmproxy-notes.md).
Checked first, a typo stops startup with a message naming the option and exit status 1.
"""

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from affinity_addon.request.rules import default_rules_file

logger = logging.getLogger(__name__)

_TRUE = {"", "true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_INSTANCE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ValueError(f"expected true or false, not {value!r}")


def parse_nonneg_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"expected a whole number, not {value!r}")
    if isinstance(value, int):
        v = value
    else:
        try:
            v = int(str(value).strip())
        except ValueError:
            raise ValueError(f"expected a whole number, not {value!r}") from None
    if v < 0:
        raise ValueError(f"must not be negative: {v}")
    return v


def parse_positive_int(value: Any) -> int:
    v = parse_nonneg_int(value)
    if v < 1:
        raise ValueError(f"must be at least 1: {v}")
    return v


def parse_scope(value: Any) -> str:
    v = str(value).strip()
    if v not in ("rules", "all"):
        raise ValueError(f"expected 'rules' or 'all', not {value!r}")
    return v


def parse_instance(value: Any) -> str:
    name = str(value).strip()
    if name and not _INSTANCE.fullmatch(name):
        raise ValueError(f"{name!r} (letters, digits, . _ : -; at most 64)")
    return name


def parse_address(value: Any) -> tuple[str, int] | None:
    """`host:port` (`[::1]:9464`, `:9464` = 127.0.0.1) -> (host, port); empty -> None."""
    raw = str(value).strip()
    if not raw:
        return None
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^\s:\[\]]*):(\d{1,5})", raw)
    if not m:
        raise ValueError(f"expected HOST:PORT such as 127.0.0.1:9464, not {raw!r}")
    host = m.group(1) or m.group(3) or "127.0.0.1"
    port = int(m.group(2) or m.group(4))
    if port > 65535:
        raise ValueError(f"port out of range: {port}")
    return host, port


def _text(value: Any) -> str:
    return str(value)


@dataclass(frozen=True, slots=True)
class Option:
    name: str
    type: type
    default: Any
    help: str
    parse: Callable[[Any], Any] = _text
    choices: tuple[str, ...] | None = None


OPTIONS: tuple[Option, ...] = (
    Option("affinity_rules", str, str(default_rules_file()),
           "Path of the affinity rules file (YAML). Default: the shipped rules/default.yaml."),
    Option("affinity_log", str, "",
           "Append one JSON line per matched LLM response to this file. Empty: no log."),
    Option("affinity_dry_run", bool, False,
           "Compute and log every rewrite, but send requests upstream unchanged.", parse_bool),
    Option("affinity_key", str, "", """
           Key for the hashes that turn prompt roots and long client IDs into affinity IDs.
           Empty: a random key generated once into the confdir (file affinity-key). Proxies
           that share a key derive the same IDs; set one per tenant to keep tenants' IDs (and
           so their provider-side cache keys) apart.
           """),
    Option("affinity_keep_bodies", int, 1 << 20, """
           Keep the raw bytes of matched streamed (SSE) responses up to this many bytes per
           flow, so mitmweb can show them; larger streams are not kept. 0 keeps none.
           """, parse_nonneg_int),
    Option("affinity_scope", str, "rules", """
           Which TLS connections to decrypt: "rules" intercepts only hosts that the rules name
           and passes every other connection through untouched (no certificate swap for
           unrelated apps); "all" leaves the choice to mitmproxy (allow_hosts/ignore_hosts).
           """, parse_scope, ("rules", "all")),
    Option("affinity_diagnose", bool, True, """
           Fingerprint every matched request to explain cache misses (miss_reason). Costs a
           few ms per MB of prompt; turn it off for the thinnest proxy (records keep usage).
           """, parse_bool),
    Option("affinity_provider_diagnostics", bool, True, """
           Ask the provider why a request missed the cache, where it offers that
           (catalog/provider_diagnostics.yaml: Anthropic's Claude API, OpenAI Responses on
           GPT-5.6+): each request names its conversation's previous response id, and the
           answer is recorded next to our own verdict (provider_diagnosis). Anthropic keeps a
           fingerprint (hashes, token counts) of each request that asks. false: nothing added.
           """, parse_bool),
    Option("affinity_max_conversations", int, 10_000, """
           How many conversations to remember for the cache-miss verdicts (least recently
           used are forgotten). Each costs about a few KB: hashes and lengths, never text.
           """, parse_nonneg_int),
    Option("affinity_instances", int, 1, """
           How many gateway instances share the traffic (behind a load balancer, each seeing
           about 1/N of it). The observed per-family request rate is multiplied by it to size
           the {family_key} buckets, and per-key rates (summary, overflow verdict) are scaled
           alike, so every instance picks the bucket count one proxy seeing all would pick.
           """, parse_positive_int),
    Option("affinity_summary", bool, True,
           "Print a cache summary (rich tables) to stderr when the proxy shuts down.",
           parse_bool),
    Option("affinity_instance", str, "",
           "Name of this proxy instance, added to every record as `instance`. Empty: none.",
           parse_instance),
    Option("affinity_metrics", str, "", """
           Serve Prometheus metrics (/metrics) and health checks (/healthz, /readyz) on this
           HOST:PORT, e.g. 127.0.0.1:9464. Empty: off.
           """, parse_address),
    Option("affinity_otel", bool, False, """
           Send one OpenTelemetry span per LLM response (GenAI attributes, cache verdict) over
           OTLP/HTTP to OTEL_EXPORTER_OTLP_ENDPOINT. Needs: pip install 'affinity-addon[otel]'.
           """, parse_bool),
)
BY_NAME: Mapping[str, Option] = {o.name: o for o in OPTIONS}


def add_options(loader: Any) -> None:
    for o in OPTIONS:
        if o.choices:
            loader.add_option(o.name, o.type, o.default, o.help, choices=list(o.choices))
        else:
            loader.add_option(o.name, o.type, o.default, o.help)


def parse_options(options: Any, names: set[str]) -> dict[str, Any]:
    """The parsed value of each of our options in `names`; ValueError("name: reason")."""
    out = {}
    for name in sorted(names & BY_NAME.keys()):
        try:
            out[name] = BY_NAME[name].parse(getattr(options, name))
        except ValueError as e:
            raise ValueError(f"Cannot parse {name} option: {e}") from None
    return out


@dataclass(frozen=True, slots=True)
class Settings:
    """The options the hooks read per flow, parsed once at configure: `ctx.options.x`
    deep-copies the value on every read (a few µs each, several times a request)."""

    dry_run: bool = False
    diagnose: bool = True
    provider_diagnostics: bool = True
    keep_bodies: int = 1 << 20
    instance: str = ""  # affinity_instance: added to every record (gateways, merged logs)
    scope: str = "rules"

    @classmethod
    def from_options(cls, options: Any) -> "Settings":
        return cls(dry_run=parse_bool(options.affinity_dry_run),
                   diagnose=parse_bool(options.affinity_diagnose),
                   provider_diagnostics=parse_bool(options.affinity_provider_diagnostics),
                   keep_bodies=parse_nonneg_int(options.affinity_keep_bodies),
                   instance=parse_instance(options.affinity_instance),
                   scope=parse_scope(options.affinity_scope))


def check_deferred(options: Any) -> None:
    """Parse our raw `--set` strings before mitmproxy converts them (see the module's doc); a
    bad one is logged as an error naming the option and dropped, and mitmproxy's startup error
    check then exits with status 1."""
    deferred = getattr(options, "deferred", None)
    if not isinstance(deferred, dict):
        return
    for o in OPTIONS:
        if o.type is str and not o.choices:
            continue  # any string converts: configure checks it, naming the option
        held = deferred.get(o.name)
        values = getattr(held, "val", None)  # the strings given, held until declared
        if held is None or not isinstance(values, list):
            continue
        try:
            if len(values) > 1:
                raise ValueError("given more than once")
            parsed = o.parse(values[0] if values else "")
        except ValueError as e:
            logger.error("Cannot parse option %s: %s", o.name, e)
            del deferred[o.name]
            continue
        if o.type is bool:  # mitmproxy only knows true/false/toggle for bools
            held.val = ["true" if parsed else "false"]
        elif o.type is int:
            held.val = [str(parsed)]
