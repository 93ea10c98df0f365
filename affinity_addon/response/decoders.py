"""Moved to `affinity_addon.decoding`, shared by the request and response sides."""

from affinity_addon.decoding import (  # noqa: F401
    DEFAULT_MAX_OUTPUT,
    MAX_CHUNK_OUTPUT,
    MAX_FLOW_OUTPUT,
    DecodeLimit,
    Decoder,
    decode_body,
    make_decoder,
)
