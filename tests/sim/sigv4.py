"""AWS Signature Version 4, both ways: sign a request as an AWS SDK does, and check one as AWS
does, written from https://docs.aws.amazon.com/IAM/latest/UserGuide/reference_sigv-create-signed-request.html
and checked against AWS's own SigV4 test suite (tests/test_clouds.py).

The canonical request is: method, URI (each path segment percent-encoded once more: the path as
sent is encoded again, "except for Amazon S3"), query (sorted), the signed headers as
`name:value` lines (lower case, spaces squeezed), their names joined by `;`, and the hex SHA-256
of the payload. The payload's hash is what makes a changed body fail: AWS recomputes it from the
bytes it received.
"""

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from urllib.parse import quote

ALGORITHM = "AWS4-HMAC-SHA256"

# Fake credentials the simulator accepts (access key id -> secret); obviously not real.
CREDENTIALS = {"AKIASIMULATOR0000001": "simulator/secret/key/0000000000000000000"}


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def canonical_request(method: str, path: str, query: str, headers: Iterable[tuple[str, str]],
                      signed: list[str], payload_hash: str) -> str:
    values: dict[str, list[str]] = {}
    for name, value in headers:
        values.setdefault(name.lower(), []).append(" ".join(value.split()))
    lines = "".join(f"{n}:{','.join(values.get(n, []))}\n" for n in signed)
    pairs = sorted(tuple(p.partition("=")[::2]) for p in query.split("&") if p)
    return "\n".join([method.upper(), quote(path or "/", safe="/~"),
                      "&".join(f"{k}={v}" for k, v in pairs), lines, ";".join(signed),
                      payload_hash])


def signature(secret: str, amz_date: str, region: str, service: str, creq: str) -> str:
    scope = f"{amz_date[:8]}/{region}/{service}/aws4_request"
    to_sign = "\n".join([ALGORITHM, amz_date, scope,
                         hashlib.sha256(creq.encode()).hexdigest()])
    key = _hmac(f"AWS4{secret}".encode(), amz_date[:8])
    for part in (region, service, "aws4_request"):
        key = _hmac(key, part)
    return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


def sign(method: str, host: str, path: str, headers: Mapping[str, str], body: bytes, *,
         access_key: str, secret: str, region: str, service: str, amz_date: str,
         session_token: str | None = None, query: str = "") -> dict[str, str]:
    """The headers to send: the given ones plus Host, X-Amz-Date, the session token (if any)
    and Authorization. Every header given is signed, as botocore does."""
    out = {**headers, "X-Amz-Date": amz_date}
    if session_token:
        out["X-Amz-Security-Token"] = session_token
    pairs = [("host", host), *out.items()]
    signed = sorted({n.lower() for n, _ in pairs})
    creq = canonical_request(method, path, query, pairs, signed,
                             hashlib.sha256(body).hexdigest())
    sig = signature(secret, amz_date, region, service, creq)
    out["Authorization"] = (f"{ALGORITHM} Credential={access_key}/{amz_date[:8]}/{region}/"
                            f"{service}/aws4_request, SignedHeaders={';'.join(signed)}, "
                            f"Signature={sig}")
    return out


def verify(method: str, path: str, query: str, headers: list[tuple[str, str]], body: bytes,
           host: str, credentials: Mapping[str, str] = CREDENTIALS) -> str | None:
    """None when the signature holds for these bytes; else AWS's reason. `host`: the host the
    client signed (a proxy's map-remote rewrites the Host header on its way here)."""
    auth = next((v for k, v in headers if k.lower() == "authorization"), "")
    if not auth.startswith(ALGORITHM + " "):
        return "not a SigV4 request"
    fields = dict(p.strip().partition("=")[::2] for p in auth[len(ALGORITHM):].split(","))
    try:
        key_id, date, region, service, _ = fields["Credential"].split("/")
        signed = fields["SignedHeaders"].split(";")
        given = fields["Signature"]
    except (KeyError, ValueError):
        return "Authorization header requires Credential, SignedHeaders and Signature"
    secret = credentials.get(key_id)
    if secret is None:
        return "The security token included in the request is invalid."
    amz_date = next((v for k, v in headers if k.lower() == "x-amz-date"), "")
    if amz_date[:8] != date:
        return "Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date"
    actual = hashlib.sha256(body).hexdigest()
    declared = next((v for k, v in headers if k.lower() == "x-amz-content-sha256"), None)
    if declared is not None and declared != "UNSIGNED-PAYLOAD" and declared != actual:
        return "The provided 'x-amz-content-sha256' header does not match what was computed."
    rows = [(k, host if k.lower() == "host" else v) for k, v in headers]
    creq = canonical_request(method, path, query, rows, signed, declared or actual)
    if not hmac.compare_digest(signature(secret, amz_date, region, service, creq), given):
        return ("The request signature we calculated does not match the signature you provided. "
                "Check your AWS Secret Access Key and signing method.")
    return None
