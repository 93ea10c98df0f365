"""Bad request bodies through a real mitmdump with the addon: a 50 MiB body in bounded time
and memory, lying or stacked Content-Encodings sent upstream unchanged, and the next
ordinary request rewritten as usual."""

import gzip
import hashlib
import json
import time
import zlib
from pathlib import Path
from typing import Any

import httpx2
import pytest
from mitmproxy.net import encoding

pytestmark = pytest.mark.slow  # starts mitmdump


def _sim_request(sim: Any, marker: str) -> Any:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        for rec in sim.requests:
            if rec.header("x-fuzz-id") == marker:
                return rec
        time.sleep(0.05)
    raise AssertionError(f"the simulator never got request {marker}")


def _vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def test_e2e_fifty_megabytes_and_lying_encodings_reach_upstream_unchanged(sim, proxy_factory):
    proxy = proxy_factory()
    client = httpx2.Client(proxy=proxy.url, timeout=120)
    url_x = "http://api.x.ai/v1/chat/completions"  # header-only rule: the body must not change
    url_o = "http://api.openai.com/v1/chat/completions"  # body rule: cannot decode, so unchanged
    chat = {"model": "grok-4", "messages": [{"role": "user", "content": "hi"}]}
    try:
        big = json.dumps({"model": "grok-4", "messages": [
            {"role": "system", "content": "s" * (50 << 20)},
            {"role": "user", "content": "hi"}]}).encode()
        t = time.monotonic()
        resp = client.post(url_x, content=big, headers={"content-type": "application/json",
                                                        "x-fuzz-id": "big"})
        elapsed = time.monotonic() - t
        assert resp.status_code == 200, resp.text
        up = _sim_request(sim, "big")
        assert hashlib.sha256(up.raw_body).digest() == hashlib.sha256(big).digest()
        assert up.header("x-grok-conv-id") is not None  # the header rule still applied
        assert elapsed < 45, elapsed
        hwm = _vm_hwm_kib(proxy.proc.pid)
        print(f"50 MiB body through mitmdump: {elapsed:.1f}s, peak RSS {hwm >> 10} MiB")
        assert hwm < 2 << 20, f"mitmdump peaked at {hwm >> 10} MiB for a 50 MiB body"
        del big

        plain = json.dumps(chat).encode()
        lies = {"gzip-says-gzip-but-plain": (plain, "gzip"),
                "stacked-but-only-gzip": (gzip.compress(plain), "gzip, br"),
                "stacked-for-real": (encoding.encode(gzip.compress(plain), "br"), "gzip, br"),
                "deflate-says-zstd": (zlib.compress(plain), "zstd"),
                "unknown-coding": (plain, "x-snappy")}
        for name, (raw, enc) in lies.items():
            resp = client.post(url_o, content=raw, headers={
                "content-type": "application/json", "content-encoding": enc, "x-fuzz-id": name})
            assert resp.status_code in (200, 400), (name, resp.status_code)
            up = _sim_request(sim, name)
            assert up.raw_body == raw, name
            assert up.header("content-encoding") == enc, name

        # And the next ordinary request is served and rewritten as usual.
        resp = client.post(url_o, json=dict(chat, model="gpt-5"), headers={"x-fuzz-id": "next"})
        assert resp.status_code == 200
        up = _sim_request(sim, "next")
        assert up.body["prompt_cache_key"].startswith("fam-")  # the default {family_key}
    finally:
        client.close()
    recs = proxy.wait_records(2 + len(lies))
    assert len(recs) == 2 + len(lies)
    out = proxy.stop()
    assert "Traceback" not in out and "has crashed" not in out
    # One warning per undecodable body, none for the big one.
    assert out.count("could not be decoded") == out.count("sent unchanged") == len(lies), out
