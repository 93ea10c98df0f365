"""Which TLS connections to decrypt: with `affinity_scope=rules`, only hosts the rules name."""

import logging
from pathlib import Path

from mitmproxy import ctx, tls

from affinity_addon.mitm.state import State

logger = logging.getLogger(__name__)

# What to tell a client that rejected our certificate, by the runtime it probably is.
CA_HINT = (
    "set NODE_EXTRA_CA_CERTS={ca} (Node: Claude Code, opencode, pi), SSL_CERT_FILE={ca} "
    "(Python httpx, Codex), REQUESTS_CA_BUNDLE={ca} (Python requests), "
    "CODEX_CA_CERTIFICATE={ca} (Codex), or use reverse mode with a base URL"
)


class Scope:
    name = "affinity-scope"

    def __init__(self, state: State) -> None:
        self.state = state

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        if self.state.settings.scope != "rules" or data.ignore_connection:
            return
        # The SNI names the host in regular mode; in reverse mode the client may send any SNI
        # (or none) and the upstream address is what the rules are about.
        hosts = [data.client_hello.sni or ""]
        if data.context.server.address:
            hosts.append(str(data.context.server.address[0]))
        if not any(self.state.in_scope(h) for h in hosts if h):
            data.ignore_connection = True  # not an LLM host we know: pass TLS through untouched

    def tls_failed_client(self, data: tls.TlsData) -> None:
        host = data.conn.sni or "?"
        if not self.state.in_scope(host):
            return
        ca = Path(ctx.options.confdir).expanduser() / "mitmproxy-ca-cert.pem"
        peer = data.context.client.peername[0] if data.context.client.peername else ""
        self.state.warn_once(
            f"ca:{peer}",
            "affinity: a client refused the proxy's certificate for %s: it does not trust the "
            "mitmproxy CA. %s", host, CA_HINT.format(ca=ca),
        )
