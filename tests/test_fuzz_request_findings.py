"""The bugs the request fuzzing found (tests/test_fuzz_requests.py), one named test each; each
failed before its fix (53a2e89)."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from affinity_addon.record.schema import META
from affinity_addon.request import body as request_body
from tests.fuzz_rig import CHAT, MESSAGES, RESPONSES, make_flow, one_request, rig


def test_header_templates_never_carry_control_characters(tmp_path):
    # The {model} header template used to copy CR/LF from the body: header injection.
    with rig(tmp_path) as r:
        body = json.dumps({"model": "gpt\r\nx-injected: 1", "messages": []}).encode()
        f, warned = one_request(r, body, CHAT)
        assert "x-model" not in f.request.headers and "x-injected" not in f.request.headers
        assert len(warned) == 1 and "control characters" in warned[0]
        assert f.request.headers["x-rule"] == "every-path"  # the other headers still apply


def test_a_null_field_is_replaced_not_shadowed(tmp_path):
    # It used to be spliced in front of the null, which then won when the body was parsed.
    with rig(tmp_path) as r:
        body = json.dumps({"model": "gpt-5", "prompt_cache_key": None, "input": "hi"}).encode()
        f, _ = one_request(r, body, RESPONSES)
        sent = json.loads(f.request.content)
        assert sent["prompt_cache_key"] == f.metadata[META]["affinity_id"] is not None


def test_an_unhashable_role_leaves_the_request_whole(tmp_path):
    # `role in SYSTEM_ROLES` raised TypeError after the headers were set: half a rewrite.
    with rig(tmp_path) as r:
        for role in ([], {}, [["system"]]):
            body = json.dumps({"model": "gpt-5", "messages": [{"role": role, "content": "hi"}]})
            f, _ = one_request(r, body.encode(), CHAT)
            assert f.metadata[META]["rules"] == ["chat", "every-path"]


@pytest.mark.parametrize("path", [CHAT, MESSAGES])
def test_messages_as_a_string_is_not_a_message_list(tmp_path, path):
    # A string `messages` was planned as a message; the marker was then assigned into it.
    with rig(tmp_path) as r:
        body = json.dumps({"model": "claude-sonnet-4-5", "messages": "hi"}).encode()
        f, _ = one_request(r, body, path)
        assert json.loads(f.request.content)["messages"] == "hi"
        assert f.metadata[META]["added"]["markers"] == []


@pytest.mark.parametrize("number", ["-9223372036854775809", "18446744073709551616", "1" * 40])
def test_integers_beyond_64_bits_survive_a_reserialize(tmp_path, number):
    # orjson read them as floats, so a reserialized body changed their value.
    with rig(tmp_path) as r:
        body = b'{"model":"gpt-5","seed":%s,"messages":[{"role":"user","content":"hi"}]}' % (
            number.encode())
        f, _ = one_request(r, body, CHAT)
        assert f.metadata[META]["body_write"] == "reserialize"
        assert b'"seed":' + number.encode() + b"," in f.request.content


@given(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 30)), max_size=60),
       st.randoms(use_true_random=False))
@settings(max_examples=400, deadline=None)
def test_long_digit_scan_finds_every_run_of_19(runs, rnd):
    # The sampled scan (every 9th byte first) must answer as a scan of every byte does, for
    # runs of digits of any length at any offset, and for bodies full of digits.
    parts = []
    for digits, other in runs:
        parts.append(bytes(rnd.choice(b"0123456789") for _ in range(digits)))
        parts.append(b"x" * other)
    text = b"".join(parts)
    naive = b"0" * 19 in text.translate(bytes.maketrans(b"123456789", b"000000000"))
    assert request_body._has_long_digits(text) == naive


@pytest.mark.parametrize("offset", range(0, 20))
@pytest.mark.parametrize("length", [18, 19, 20, 27, 28])
def test_long_digit_scan_at_every_alignment(offset, length):
    text = b"a" * offset + b"1" * length + b"b" * 30
    assert request_body._has_long_digits(text) == (length >= 19)
    many = (b"12345678 " * 200) + text  # many near misses first: the whole-body fallback
    assert request_body._has_long_digits(many) == (length >= 19)


@pytest.mark.parametrize("exotic", [b'"x":1e400', b'"x":"\\ud800 hi"', b'"x":-1E+999'])
def test_bodies_json_cannot_round_trip_go_out_unchanged(tmp_path, exotic):
    # 1e400 was written back as `Infinity` and a lone surrogate as invalid UTF-8.
    with rig(tmp_path) as r:
        body = (b'{"model":"gpt-5",' + exotic + b',"input":"hi",'
                b'"messages":[{"role":"user","content":"hi"}]}')
        f, warned = one_request(r, body, CHAT)  # the dotted metadata.session needs a reserialize
        assert f.request.raw_content == body and len(warned) == 1
        assert f.request.headers["x-conv"] == f.metadata[META]["affinity_id"]
        f, warned = one_request(r, body, RESPONSES)  # a top-level splice keeps every other byte
        assert f.metadata[META]["body_write"] == "splice" and not warned
        assert f.request.raw_content.endswith(body[1:])


def test_several_problems_in_one_request_make_one_warning(tmp_path):
    with rig(tmp_path) as r:
        body = {"model": "gpt\r\n", "metadata": [],
                "messages": [{"role": "user", "content": "hi"}]}
        f = make_flow(json.dumps(body).encode(), CHAT)
        r.addon.request(f)
        assert r.quiet("a request with two problems") == 1


@pytest.mark.parametrize("body", [{"system": ["a", "b"], "messages": []},
                                  {"messages": [{"role": "user", "content": ["x", "y"]}]}],
                         ids=["system", "content"])
def test_string_elements_of_a_block_list_are_never_dropped(tmp_path, body):
    with rig(tmp_path) as r:
        one_request(r, json.dumps(body).encode(), MESSAGES)


@pytest.mark.parametrize("where", ["content", "extra-key"])
def test_deep_nesting_is_one_warning_not_a_traceback(tmp_path, where):
    # A body nested ~1000 deep (json.loads takes it) used to log tracebacks at ERROR.
    nested = "[" * 1500 + "]" * 1500
    inner = nested if where == "content" else '"hi","x":' + nested
    body = '{"model":"gpt-5","messages":[{"role":"user","content":' + inner + "}]}"
    with rig(tmp_path) as r:
        for path in (CHAT, MESSAGES):
            _, warned = one_request(r, body.encode(), path)
            assert len(warned) == 1, (path, warned)
        r.still_works()


def test_very_deep_nesting_beyond_the_parser_is_one_warning(tmp_path):
    body = '{"messages":[{"role":"user","content":' + "[" * 100_000 + "]" * 100_000 + "}]}"
    with rig(tmp_path) as r:
        f = make_flow(body.encode(), CHAT)
        before = f.request.raw_content
        r.addon.request(f)
        recs = r.capture.take()
        assert len(recs) == 1 and "RecursionError" in recs[0].getMessage()
        assert f.request.raw_content == before
        r.still_works()
