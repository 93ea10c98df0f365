"""`header_map` reads a request's headers once and must answer every lookup as mitmproxy's own
`Headers.get` does (case-insensitive names, repeated fields joined, bytes decoded alike)."""

from hypothesis import given, settings
from hypothesis import strategies as st
from mitmproxy.http import Headers

from affinity_addon.request.header_map import header_map

NAMES = st.sampled_from([b"Content-Type", b"content-type", b"X-Session-Affinity", b"x-session-affinity",
                         b"SESSION_ID", b"Host", b"x-\xc3\xa9t\xc3\xa9", b"X-\xc3\x89T\xc3\x89"])
VALUES = st.binary(max_size=12)


@given(st.lists(st.tuples(NAMES, VALUES), max_size=8))
@settings(max_examples=300, deadline=None)
def test_every_lookup_answers_as_mitmproxy_does(fields):
    headers = Headers(fields)
    hm = header_map(headers)
    for name, _ in fields:
        key = name.lower().decode("utf-8", "surrogateescape")
        assert hm.get(key) == headers.get(key)
    assert hm.get("absent") is None and header_map(hm) is hm


def test_a_plain_mapping_is_read_alike():
    assert header_map({"Content-Type": "application/json", "X-A": "1"}) == {
        "content-type": "application/json", "x-a": "1"}
