"""Bedrock, Vertex and Azure without processes: the event stream tap, SigV4 (the simulator's, against
AWS's own test suite), the model in the URL, signed requests left alone, Converse cachePoint
planning, the platforms' minimums, 1h models and refused top-level markers, and the rules."""

import base64
import copy
import gzip
import json
import zlib

import pytest
from mitmproxy.http import Headers
from mitmproxy.test import taddons, tflow, tutils

from affinity_addon.apis import ANTHROPIC, BEDROCK_CONVERSE
from affinity_addon.catalog.platforms import parse_platforms, platform_for
from affinity_addon.catalog.providers import PROVIDER_FACTS
from affinity_addon.catalog.yamlsource import TableError
from affinity_addon.diagnosis.fingerprint import fingerprint
from affinity_addon.jsonpath import get_path, parse_path
from affinity_addon.record.schema import META
from affinity_addon.request.breakpoint_spec import (
    CacheControlSpec,
    Placement,
    PlanHint,
    min_tokens_for,
    parse_cache_control,
)
from affinity_addon.request.breakpoints import plan_breakpoints, strip_added
from affinity_addon.request.prompt import iter_segments
from affinity_addon.request.prompt_slots import count_markers
from affinity_addon.request.rules import api_for, default_rules_file, load_rules
from affinity_addon.response.eventstream import EventStreamTap, bedrock_frames, parse_headers
from affinity_addon.response.usage import UsageReader
from tests.driver import Affinity
from tests.sim import eventstream, sigv4, wire

AGENT = CacheControlSpec()
BEDROCK = "bedrock-runtime.us-east-1.amazonaws.com"
SONNET = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
SYSTEM = "You are the ledger assistant. Follow the house rules. " * 500  # ~6.5k tokens

# --- AWS event streams ---------------------------------------------------------------------------

# From botocore's tests/unit/test_eventstream.py (AWS's event stream test vectors, Apache-2.0): a
# message with one string header and a payload, and its parsed parts.
ONE_STR_HEADER = (b"\x00\x00\x00=\x00\x00\x00 \x07\xfd\x83\x96\x0ccontent-type\x07\x00\x10"
                  b"application/json{'foo':'bar'}\x8d\x9c\x08\xb1")
EMPTY_MESSAGE = b"\x00\x00\x00\x10\x00\x00\x00\x00\x05\xc2H\xeb}\x98\xc8\xff"
INT64_HEADER = (b"\x00\x00\x00\x1e\x00\x00\x00\x0e]J\xdb\x8d\x04"
                b"long\x05\xff\xff\xff\xff\xff\xff\xff\xffK\xc22\xda")


def collect() -> tuple[list[tuple[dict, bytes]], EventStreamTap]:
    frames: list[tuple[dict, bytes]] = []
    return frames, EventStreamTap(None, lambda h, p: frames.append((h, p)))


def test_aws_test_vectors_decode_byte_by_byte_and_pass_through_unchanged() -> None:
    frames, tap = collect()
    stream = EMPTY_MESSAGE + ONE_STR_HEADER + INT64_HEADER
    out = b"".join(tap(stream[i:i + 1]) for i in range(len(stream)))
    tap(b"")
    assert out == stream and tap.failed is None and tap.ended
    assert frames == [({}, b""), ({"content-type": "application/json"}, b"{'foo':'bar'}"),
                      ({"long": -1}, b"")]


@pytest.mark.parametrize("where, why", [(2, "prelude CRC"), (40, "message CRC")])
def test_a_bad_frame_stops_reading_and_the_bytes_flow_on(where: int, why: str) -> None:
    frames, tap = collect()
    bad = bytearray(ONE_STR_HEADER)
    bad[where] ^= 0x01
    stream = EMPTY_MESSAGE + bytes(bad) + EMPTY_MESSAGE
    chunks = [stream[:5], stream[5:30], stream[30:]]
    assert [tap(c) for c in chunks] == chunks
    tap(b"")
    assert len(frames) == 1  # the one before it
    assert tap.failed is not None and why in tap.failed and "frame 2" in tap.failed


def test_impossible_lengths_and_a_cut_stream_are_problems() -> None:
    _, tap = collect()
    prelude = (10).to_bytes(4, "big") + (0).to_bytes(4, "big")  # shorter than a frame can be
    tap(prelude + zlib.crc32(prelude).to_bytes(4, "big"))
    assert tap.failed and "impossible lengths" in tap.failed
    _, tap = collect()
    tap(ONE_STR_HEADER[:-3])
    tap(b"")
    assert tap.failed and "ended inside a frame" in tap.failed


def test_the_tap_holds_at_most_one_unfinished_frame() -> None:
    frame = eventstream.event_frame("contentBlockDelta", {"delta": {"text": "x" * 500}})
    frames, tap = collect()
    for _ in range(200):
        tap(frame[:300])
        assert len(tap._buf) == 300
        tap(frame[300:])
        assert not tap._buf
    assert len(frames) == 200


def test_converse_stream_frames_without_usage_are_not_parsed(monkeypatch) -> None:
    # The many contentBlockDelta frames of a long answer carry no usage: only the frames the
    # API's needles name (metadata, messageStop, errors) are JSON-parsed.
    from affinity_addon.response import usage as usage_module

    parsed: list[bytes] = []
    real = usage_module.parse_json
    monkeypatch.setattr(usage_module, "parse_json", lambda d: parsed.append(d) or real(d))
    reader = UsageReader(BEDROCK_CONVERSE)
    tap = EventStreamTap(None, bedrock_frames(reader))
    tap(b"".join(eventstream.converse_stream_frames(
        {"inputTokens": 1, "outputTokens": 2, "totalTokens": 3}, wire.Ids("m", "c"))))
    tap(b"")
    assert tap.events == 5 and reader.terminal and reader.usage().output_tokens == 2
    assert [json.loads(p).popitem()[0] for p in parsed] == ["messageStop", "metadata"]
    assert reader.extras.get("stop_reason") == "end_turn"


def test_compressed_event_streams_are_decoded() -> None:
    stream = b"".join(eventstream.converse_stream_frames(
        {"inputTokens": 1, "outputTokens": 2, "totalTokens": 3}, wire.Ids("m", "c")))
    reader = UsageReader(BEDROCK_CONVERSE)
    tap = EventStreamTap("gzip", bedrock_frames(reader))
    body = gzip.compress(stream)
    for i in range(0, len(body), 50):
        tap(body[i:i + 50])
    tap(b"")
    assert tap.failed is None and tap.events == 5 and reader.terminal
    assert reader.usage() is not None and reader.usage().output_tokens == 2


def test_header_types() -> None:
    data = (b"\x01a\x00" + b"\x01b\x01" + b"\x01c\x02\xff" + b"\x01d\x03\x00\x02"
            + b"\x01e\x04\x00\x00\x00\x03" + b"\x01f\x06\x00\x02hi" + b"\x01g\x08" + bytes(8)
            + b"\x01h\x09" + bytes(range(16)))
    assert parse_headers(data) == {"a": True, "b": False, "c": -1, "d": 2, "e": 3, "f": b"hi",
                                   "g": 0, "h": bytes(range(16))}


def test_exception_frames_and_invocation_metrics_alone() -> None:
    reader = UsageReader(ANTHROPIC)
    tap = EventStreamTap(None, bedrock_frames(reader))
    start = {"type": "message_start", "message": {"id": "msg_1", "model": "claude"}}
    stop = {"type": "message_stop", "amazon-bedrock-invocationMetrics": {
        "inputTokenCount": 10, "outputTokenCount": 5, "cacheReadInputTokenCount": 900,
        "cacheWriteInputTokenCount": 0}}
    for e in (start, stop):
        tap(eventstream.event_frame("chunk", {"bytes": base64.b64encode(json.dumps(e).encode()).decode()}))
    u = reader.usage()
    assert u is not None and (u.input_tokens, u.cache_read_tokens, u.output_tokens) == (910, 900, 5)
    assert reader.terminal
    tap(eventstream.exception_frame("throttlingException", "Too many tokens"))
    assert reader.extras["error_type"] == "throttlingException"


# --- SigV4 (the simulator's signer and checker) --------------------------------------------------

# AWS's SigV4 test suite (aws4_testsuite in botocore's tests, Apache-2.0): example credentials,
# request and the signature AWS computes for it.
AWS_KEY, AWS_SECRET = "AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"


@pytest.mark.parametrize("headers, body, expected", [
    ({}, b"", "5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b"),
    ({"Content-Type": "application/x-www-form-urlencoded"}, b"Param1=value1",
     "ff11897932ad3f4e8b18135d722051e5ac45fc38421b1da7b9d196a0fe09473a"),
])
def test_sigv4_matches_the_aws_test_suite(headers: dict, body: bytes, expected: str) -> None:
    signed = sigv4.sign("POST", "example.amazonaws.com", "/", headers, body, access_key=AWS_KEY,
                        secret=AWS_SECRET, region="us-east-1", service="service",
                        amz_date="20150830T123600Z")
    assert signed["Authorization"].endswith(f"Signature={expected}")


def test_sigv4_check_refuses_a_changed_body() -> None:
    path = "/model/us.anthropic.claude-sonnet-4-5-20250929-v1%3A0/converse-stream"
    body = json.dumps({"messages": [{"role": "user", "content": [{"text": "hi"}]}]}).encode()
    key = next(iter(sigv4.CREDENTIALS))
    h = sigv4.sign("POST", BEDROCK, path, {"Content-Type": "application/json"}, body,
                   access_key=key, secret=sigv4.CREDENTIALS[key], region="us-east-1",
                   service="bedrock", amz_date="20261201T120000Z", session_token="FQoGZXIvYXdzE")
    rows = [("Host", "127.0.0.1:1"), *h.items()]
    assert sigv4.verify("POST", path, "", rows, body, BEDROCK) is None
    assert "does not match" in sigv4.verify("POST", path, "", rows, body.replace(b"hi", b"ho"),
                                            BEDROCK)
    assert "does not match" in sigv4.verify("POST", path, "", rows, body, "elsewhere.test")


# --- the request side ---------------------------------------------------------------------------

@pytest.mark.parametrize("path, model", [
    ("/model/us.anthropic.claude-sonnet-4-5-20250929-v1%3A0/invoke", SONNET),
    ("/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3Ainference-profile%2F"
     "us.anthropic.claude-opus-4-6-v1/converse-stream",
     "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.claude-opus-4-6-v1"),
    ("/model/us.anthropic.claude-haiku-4-5-20251001-v1:0/invoke-with-response-stream",
     "us.anthropic.claude-haiku-4-5-20251001-v1:0"),
    ("/v1/projects/p-1/locations/us-east5/publishers/anthropic/models/"
     "claude-sonnet-4-5@20250929:streamRawPredict", "claude-sonnet-4-5@20250929"),
    ("/v1/projects/p/locations/global/publishers/google/models/gemini-2.5-pro:generateContent",
     "gemini-2.5-pro"),
    ("/openai/deployments/gpt-5.6/chat/completions", "gpt-5.6"),
    ("/v1/messages", None), ("/model/x/other", None),
])
def test_the_model_in_the_url(path: str, model: str | None) -> None:
    assert PROVIDER_FACTS.path_model(path) == model


def test_apis_by_path() -> None:
    assert api_for("/model/x/converse") == api_for("/model/x/converse-stream") ==\
        BEDROCK_CONVERSE
    assert api_for("/v1/projects/p/locations/l/publishers/anthropic/models/m:rawPredict") ==\
        ANTHROPIC
    assert api_for("/model/x/invoke") is None  # each model's own body: the rule says
    assert api_for("/anthropic/v1/messages") == ANTHROPIC


def test_default_rules_cover_the_clouds() -> None:
    rs = load_rules(default_rules_file())
    names = {(h, p): [r.name for r in rs.candidates(h, p, "POST")] for h, p in [
        (BEDROCK, "/model/m/invoke"), ("bedrock-runtime-fips.us-east-1.amazonaws.com",
                                       "/model/m/converse-stream"),
        ("bedrock-mantle.us-east-1.api.aws", "/anthropic/v1/messages"),
        ("us-east5-aiplatform.googleapis.com",
         "/v1/projects/p/locations/us-east5/publishers/anthropic/models/m:rawPredict"),
        ("aiplatform.googleapis.com",
         "/v1/projects/p/locations/global/publishers/google/models/g:streamGenerateContent"),
        ("res.openai.azure.com", "/openai/deployments/d/chat/completions"),
        ("res.services.ai.azure.com", "/openai/v1/responses")]}
    assert names == {
        (BEDROCK, "/model/m/invoke"): ["bedrock-claude", "observe-bedrock"],
        ("bedrock-runtime-fips.us-east-1.amazonaws.com", "/model/m/converse-stream"):
            ["bedrock-converse-claude", "observe-bedrock"],
        ("bedrock-mantle.us-east-1.api.aws", "/anthropic/v1/messages"):
            ["bedrock-claude", "observe-bedrock"],
        ("us-east5-aiplatform.googleapis.com",
         "/v1/projects/p/locations/us-east5/publishers/anthropic/models/m:rawPredict"):
            ["vertex-claude"],
        ("aiplatform.googleapis.com",
         "/v1/projects/p/locations/global/publishers/google/models/g:streamGenerateContent"):
            ["vertex-gemini"],
        ("res.openai.azure.com", "/openai/deployments/d/chat/completions"):
            ["azure-openai-cache-key", "observe-azure-openai"],
        ("res.services.ai.azure.com", "/openai/v1/responses"):
            ["azure-openai-cache-key", "observe-azure-openai"],
    }
    assert not rs.candidates("bedrock.us-east-1.amazonaws.com", "/model/m/invoke", "POST")
    assert not rs.candidates("evil-bedrock-runtime.example.com", "/model/m/invoke", "POST")


def cloud_req(host: str, path: str, body: dict, headers: dict[str, str] | None = None):
    h = Headers(content_type="application/json")
    for k, v in (headers or {}).items():
        h[k] = v
    return tflow.tflow(req=tutils.treq(method=b"POST", host=host, port=443, scheme=b"https",
                                       authority=b"", path=path.encode(), headers=h,
                                       content=json.dumps(body).encode()))


def invoke_body() -> dict:
    return {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 64, "system": SYSTEM,
            "messages": [{"role": "user", "content": "What changed in the ledger?"}]}


def converse_body() -> dict:
    return {"system": [{"text": SYSTEM}],
            "messages": [{"role": "user", "content": [{"text": "What changed?"}]}],
            "toolConfig": {"tools": [{"toolSpec": {"name": "ledger", "inputSchema": {
                "json": {"type": "object"}}}}]}}


@pytest.fixture
def addon():
    a = Affinity()
    with taddons.context(*a.addons) as tctx:
        tctx.configure(a.bundle, affinity_rules=str(default_rules_file()))
        yield a


def test_a_bearer_invoke_request_gets_markers(addon) -> None:
    path = "/model/us.anthropic.claude-sonnet-4-5-20250929-v1%3A0/invoke"
    f = cloud_req(BEDROCK, path, invoke_body(), {"authorization": "Bearer ABSKQmVkcm9ja0FQSUtleQ"})
    addon.request(f)
    sent = json.loads(f.request.content)
    facts = f.metadata[META]
    assert facts["model"] == SONNET and facts["api"] == ANTHROPIC
    assert facts["rules"] == ["bedrock-claude", "observe-bedrock"]
    assert sent["system"][0]["cache_control"] == {"type": "ephemeral"}
    assert "cache_control" not in sent and not facts["dry_run"] and facts["rewrite_skipped"] is None


@pytest.mark.parametrize("path, headers", [
    ("/model/us.anthropic.claude-sonnet-4-5-20250929-v1%3A0/converse",
     {"authorization": "AWS4-HMAC-SHA256 Credential=AKIASIMULATOR0000001/20261201/us-east-1/"
                       "bedrock/aws4_request, SignedHeaders=host;x-amz-date, Signature=00ff"}),
    ("/model/us.anthropic.claude-sonnet-4-5-20250929-v1%3A0/converse?X-Amz-Signature=00ff", {}),
])
def test_a_signed_request_is_never_changed(addon, path: str, headers: dict) -> None:
    f = cloud_req(BEDROCK, path, converse_body(), headers)
    before_body, before_headers = f.request.raw_content, list(f.request.headers.fields)
    addon.request(f)
    assert f.request.raw_content == before_body
    assert list(f.request.headers.fields) == before_headers
    facts = f.metadata[META]
    assert facts["rewrite_skipped"] == "signed (aws-sigv4)" and facts["dry_run"]
    assert facts["added"]["markers"]  # what it would have sent, for the record and the verdict


def test_a_top_level_marker_is_never_added_on_bedrock_or_vertex() -> None:
    spec = parse_cache_control({"placements": ["auto"]})
    for host, added in ((BEDROCK, []), ("us-east5-aiplatform.googleapis.com", []),
                        ("api.anthropic.com", ["cache_control"])):
        body = invoke_body()
        marks = plan_breakpoints(body, ANTHROPIC, SONNET, spec, host=host)
        assert [m.path for m in marks] == added and ("cache_control" in body) == bool(added)


def test_bedrock_minimums_and_one_hour_models() -> None:
    assert min_tokens_for("us.anthropic.claude-opus-4-7", BEDROCK) == 4096
    assert min_tokens_for("claude-opus-4-7") == 2048  # the Anthropic API's
    hint = PlanHint(ttl="1h")
    for model, ttl in ((SONNET, "1h"), ("us.anthropic.claude-3-7-sonnet-20250219-v1:0", "5m")):
        body = converse_body()
        marks = plan_breakpoints(body, BEDROCK_CONVERSE, model,
                                 CacheControlSpec(ttl="auto"), hint, host=BEDROCK)
        assert {m.ttl for m in marks} == {ttl}
        points = [b["cachePoint"] for b in body["system"] if "cachePoint" in b]
        assert points == [{"type": "default", "ttl": "1h"} if ttl == "1h" else {"type": "default"}]
    body = converse_body()
    plan_breakpoints(body, BEDROCK_CONVERSE, "us.anthropic.claude-3-7-sonnet-20250219-v1:0",
                     CacheControlSpec(ttl="1h"), host=BEDROCK)  # a rule asking 1h
    assert all("ttl" not in b["cachePoint"] for b in body["system"] if "cachePoint" in b)


def conversation(turns: int) -> dict:
    body = converse_body()
    for i in range(turns):
        body["messages"] += [{"role": "assistant", "content": [{"text": f"answer {i} " * 40}]},
                             {"role": "user", "content": [{"text": f"question {i} " * 40}]}]
    return body


def test_converse_points_follow_their_blocks_and_undo_exactly() -> None:
    body = conversation(3)
    before = copy.deepcopy(body)
    marks = plan_breakpoints(body, BEDROCK_CONVERSE, SONNET, AGENT, host=BEDROCK)
    assert 0 < len(marks) <= 4 and all(m.inserted for m in marks)
    for m in marks:
        assert get_path(body, parse_path(m.path)) == {"cachePoint": {"type": "default"}}
        owner, _, index = m.path.rpartition("[")
        before_it = get_path(body, parse_path(f"{owner}[{int(index[:-1]) - 1}]"))
        assert "cachePoint" not in before_it  # a point always follows a real block
    assert count_markers(body, BEDROCK_CONVERSE) == len(marks)
    assert "messages[6].content[1]" in [m.path for m in marks]  # the newest user turn
    # the prompt's blocks and their digests are the same with or without the points
    fp_with, fp_without = fingerprint(body, BEDROCK_CONVERSE, SONNET),\
        fingerprint(before, BEDROCK_CONVERSE, SONNET)
    assert fp_with.plan_digests() == fp_without.plan_digests()
    assert [s.path for s in iter_segments(body, BEDROCK_CONVERSE)] ==\
        [s.path for s in iter_segments(before, BEDROCK_CONVERSE)]
    assert plan_breakpoints(body, BEDROCK_CONVERSE, SONNET, AGENT, host=BEDROCK) == []
    strip_added(body, marks)
    assert body == before


def test_converse_keeps_the_clients_points_and_the_four_point_limit() -> None:
    body = conversation(30)  # long enough for lookback bridges: every free slot is used
    body["system"].append({"cachePoint": {"type": "default"}})
    spec = CacheControlSpec(client_markers="fill")
    marks = plan_breakpoints(body, BEDROCK_CONVERSE, SONNET, spec, host=BEDROCK)
    assert count_markers(body, BEDROCK_CONVERSE) == 4 and len(marks) == 3
    assert body["system"][1] == {"cachePoint": {"type": "default"}}  # the client's, in place
    assert plan_breakpoints(conversation(1) | {"system": [{"text": SYSTEM},
                                                           {"cachePoint": {"type": "default"}}]},
                            BEDROCK_CONVERSE, SONNET, AGENT, host=BEDROCK) == []  # skip


def test_converse_tool_and_reasoning_blocks() -> None:
    body = {"toolConfig": {"tools": [{"toolSpec": {"name": f"t{i}", "description": "d " * 900}}
                                     for i in range(3)]},
            "messages": [{"role": "user", "content": [{"text": "go"}]},
                         {"role": "assistant", "content": [
                             {"reasoningContent": {"reasoningText": {"text": "hmm " * 900}}}]}]}
    spec = parse_cache_control({"placements": ["tools", {"last_n": 1}]})
    marks = plan_breakpoints(body, BEDROCK_CONVERSE, SONNET, spec, host=BEDROCK)
    assert [m.path for m in marks] == ["toolConfig.tools[3]"]  # not on reasoning
    assert body["toolConfig"]["tools"][3] == {"cachePoint": {"type": "default"}}


def test_platform_table_errors_name_the_entry() -> None:
    with pytest.raises(TableError, match="unknown key"):
        parse_platforms({"platforms": {"x": {"hosts": ["a"], "nope": 1}}})
    with pytest.raises(TableError, match="hosts"):
        parse_platforms({"platforms": {"x": {"hosts": []}}})
    assert platform_for("BEDROCK-RUNTIME.eu-west-1.AMAZONAWS.com").name == "bedrock"
    assert platform_for("api.anthropic.com") is None
    assert Placement("auto") in parse_cache_control("auto").placements


def test_json_path_filter() -> None:
    usage = {"cacheDetails": [{"ttl": "1h", "inputTokens": 7}, {"ttl": "5m", "inputTokens": 3}]}
    assert get_path(usage, parse_path("cacheDetails[ttl=5m].inputTokens")) == 3
    assert get_path(usage, parse_path("cacheDetails[ttl=1d].inputTokens")) is None
    assert get_path({"cacheDetails": "x"}, parse_path("cacheDetails[ttl=5m]")) is None


def test_scope_rules_intercept_the_clouds(addon) -> None:
    """`affinity_scope=rules` decrypts only hosts the rules name: these are among them."""
    state = addon.state
    for host in (BEDROCK, "bedrock-runtime-fips.us-gov-west-1.amazonaws.com",
                 "bedrock-mantle.eu-west-1.api.aws", "us-east5-aiplatform.googleapis.com",
                 "aiplatform.googleapis.com", "myres.openai.azure.com",
                 "myres.services.ai.azure.com"):
        assert state.in_scope(host), host
    for host in ("bedrock.us-east-1.amazonaws.com", "oauth2.googleapis.com",
                 "s3.us-east-1.amazonaws.com", "storage.googleapis.com"):
        assert not state.in_scope(host), host
