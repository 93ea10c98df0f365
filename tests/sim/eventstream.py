"""AWS event streams, as Bedrock streams its answers (InvokeModelWithResponseStream and
ConverseStream), framed as AWS documents the encoding."""

import base64
import struct
import zlib
from typing import Any

from tests.sim.render import CONVERSE
from tests.sim.wire import Ids, Usage, _anthropic_event_objects, dumps


def frame(headers: dict[str, str], payload: bytes) -> bytes:
    """One event stream message: total length, headers length, CRC32 of those 8 bytes; headers
    (name length u8, name, type 7 = string, u16 length, value); payload; CRC32 of all before.
    As AWS documents its event stream encoding
    (https://docs.aws.amazon.com/lexv2/latest/dg/event-stream-encoding.html)."""
    head = b"".join(bytes([len(k)]) + k.encode() + b"\x07" + struct.pack("!H", len(v.encode()))
                    + v.encode() for k, v in headers.items())
    prelude = struct.pack("!II", 16 + len(head) + len(payload), len(head))
    message = prelude + struct.pack("!I", zlib.crc32(prelude)) + head + payload
    return message + struct.pack("!I", zlib.crc32(message))


def event_frame(event: str, data: dict[str, Any]) -> bytes:
    return frame({":event-type": event, ":content-type": "application/json",
                  ":message-type": "event"}, dumps(data))


def exception_frame(kind: str, message: str) -> bytes:
    return frame({":exception-type": kind, ":content-type": "application/json",
                  ":message-type": "exception"}, dumps({"message": message}))


def _pad(n: int) -> str:
    """Bedrock pads its events with a `p` field of varying length (hides the text's size)."""
    return "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"[: 4 + n % 40]


def invoke_stream_frames(model: str, usage: Usage, ids: Ids) -> list[bytes]:
    """InvokeModelWithResponseStream: each of Claude's stream events as a `chunk` event,
    `{"bytes": <base64 of the event>}`; the last one also carries
    `amazon-bedrock-invocationMetrics` (counts without cache reads and writes)."""
    events = _anthropic_event_objects(model, usage, ids)
    events[-1]["amazon-bedrock-invocationMetrics"] = {
        "inputTokenCount": usage["input_tokens"], "outputTokenCount": usage["output_tokens"],
        "invocationLatency": 420, "firstByteLatency": 120,
        "cacheReadInputTokenCount": usage["cache_read_input_tokens"],
        "cacheWriteInputTokenCount": usage["cache_creation_input_tokens"]}
    return [event_frame("chunk", {"bytes": base64.b64encode(dumps(e)).decode(), "p": _pad(i)})
            for i, e in enumerate(events)]


def converse_stream_frames(usage: Usage, ids: Ids) -> list[bytes]:
    """ConverseStream: messageStart, contentBlockDelta, contentBlockStop, messageStop, then
    `metadata` with the usage (ConverseStreamOutput in the bedrock-runtime API reference)."""
    steps: list[tuple[str, dict[str, Any]]] = [
        ("messageStart", {"role": "assistant"}),
        ("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": ids.text}}),
        ("contentBlockStop", {"contentBlockIndex": 0}),
        ("messageStop", {"stopReason": "end_turn"}),
        ("metadata", {"usage": usage, "metrics": {"latencyMs": 42}}),
    ]
    return [event_frame(name, data | {"p": _pad(i)}) for i, (name, data) in enumerate(steps)]


def eventstream_frames(api: str, model: str, usage: Usage, ids: Ids) -> list[bytes]:
    if api == CONVERSE:
        return converse_stream_frames(usage, ids)
    return invoke_stream_frames(model, usage, ids)
