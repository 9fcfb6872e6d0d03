"""Log lines: a text that came from outside (a Vault error body, a chain id, a peer's
message) cannot forge or break lines."""

from __future__ import annotations

import json
import logging

import pytest

from nebula import logs


@pytest.fixture
def captured(capsys):  # type: ignore[no-untyped-def]
    yield capsys
    logging.getLogger().handlers.clear()


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_control_characters_in_a_message_stay_on_one_line(fmt: str, captured) -> None:
    logs.setup("info", fmt)
    forged = "HTTP 500: boom\n12:00:00 INFO  nebula.service: signed height 99\r\x1b[2J\u2028x"
    logging.getLogger("nebula.test").warning("vault answered %s", forged)
    err = captured.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, err
    if fmt == "json":
        assert json.loads(lines[0])["msg"] == f"vault answered {forged}"  # JSON escapes it
    else:
        assert "\\n12:00:00 INFO" in lines[0] and "\\x1b[2J" in lines[0] and "\\u2028" in lines[0]
        assert lines[0].endswith("x")


def test_a_traceback_keeps_its_lines(captured) -> None:
    logs.setup("info", "text")
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        logging.getLogger("nebula.test").exception("failed on %s", "a\nb")
    err = captured.readouterr().err
    assert "failed on a\\nb" in err.splitlines()[0]
    assert "Traceback (most recent call last):" in err and len(err.splitlines()) > 3
