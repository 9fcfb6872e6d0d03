"""Nebula's own HTTP/1.1 answer parser on the Vault hot path (backends/_vault_common.py).

BENCHMARKS.md explains why the signing path keeps its own small client rather than
aiohttp; this is what keeps that client honest. Properties, for any bytes a server
sends after its status line:

* the parser returns, or raises only what ``AsyncVaultHTTP.request`` turns into a
  BackendError (BackendError, IncompleteReadError, LimitOverrunError) - never anything
  else, and never waits for more than the answer it was given;
* a well-formed answer (Content-Length, chunked with any chunking and extensions,
  or close-delimited) gives back exactly its body, status and keep-alive flag.
"""

from __future__ import annotations

import asyncio
import itertools

from hypothesis import given
from hypothesis import strategies as st

from nebula.backends._vault_common import _MAX_BODY, _read_response
from nebula.errors import BackendError
from tests.fuzz.conftest import fuzz_settings

_ALLOWED = (BackendError, asyncio.IncompleteReadError, asyncio.LimitOverrunError)


def _parse(status_line: bytes, rest: bytes, method: str = "POST"):
    async def go():
        reader = asyncio.StreamReader(limit=_MAX_BODY)
        reader.feed_data(rest)
        reader.feed_eof()  # the server sent this and closed: nothing else will come
        return await asyncio.wait_for(_read_response(reader, status_line, method), 5)

    return asyncio.run(go())


@fuzz_settings(300)
@given(
    st.binary(max_size=40).map(lambda b: b"HTTP/1.1 200 OK\r\n" if not b else b),
    st.binary(max_size=600),
)
def test_any_answer_parses_or_fails_cleanly(status_line: bytes, rest: bytes) -> None:
    try:
        status, body, keep = _parse(status_line, rest)
    except _ALLOWED:
        return
    assert isinstance(status, int) and isinstance(body, bytes) and isinstance(keep, bool)
    assert len(body) <= _MAX_BODY


_HEADER_NOISE = st.lists(
    st.sampled_from(
        [b"Server: bao\r\n", b"Cache-Control: no-store\r\n", b"X-Pad: \xff\r\n", b"Date: x\r\n"]
    ),
    max_size=4,
)


def _chunked(body: bytes, cuts: list[int], ext: bool) -> bytes:
    out = b""
    points = sorted({c % (len(body) + 1) for c in cuts} | {0, len(body)})
    for a, b in itertools.pairwise(points):
        if b > a:
            size = f"{b - a:x}".encode() + (b";ext=1" if ext else b"")
            out += size + b"\r\n" + body[a:b] + b"\r\n"
    return out + b"0\r\nTrailer: t\r\n\r\n"


@fuzz_settings(200)
@given(
    st.binary(max_size=3000),
    st.sampled_from(["length", "chunked", "close"]),
    st.lists(st.integers(min_value=0, max_value=4000), max_size=8),
    st.booleans(),
    _HEADER_NOISE,
    st.sampled_from([200, 400, 403, 500]),
)
def test_well_formed_answers_give_back_their_body(
    body: bytes, framing: str, cuts: list[int], ext: bool, noise: list[bytes], status: int
) -> None:
    head = b"".join(noise)
    if framing == "length":
        raw = head + b"Content-Length: %d\r\n\r\n" % len(body) + body + b"NEXT ANSWER"
    elif framing == "chunked":
        raw = head + b"Transfer-Encoding: chunked\r\n\r\n" + _chunked(body, cuts, ext)
    else:
        raw = head + b"Connection: close\r\n\r\n" + body
    got = _parse(b"HTTP/1.1 %d X\r\n" % status, raw)
    assert got == (status, body, framing != "close")
