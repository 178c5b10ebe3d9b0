"""What plain ``sub`` writes to a terminal: control characters shown, everything else as sent."""

from __future__ import annotations

import json

import pytest

from drainbus.terminal import escape_controls, json_safe


@pytest.mark.parametrize(
    ("data", "shown"),
    [
        pytest.param(b"acme-blog\n", b"acme-blog\n", id="plain-text"),
        pytest.param(b"caf\xc3\xa9 \xc2\xa9\ttab\n", b"caf\xc3\xa9 \xc2\xa9\ttab\n", id="utf8-tab"),
        pytest.param(b"\x1b]0;pwned\x07\n", b"\\e]0;pwned\\x07\n", id="osc-title"),
        pytest.param(b"\x1b]52;c;ZXZpbA==\x07", b"\\e]52;c;ZXZpbA==\\x07", id="osc52-clipboard"),
        pytest.param(b"\x1b[2J\x1b[H", b"\\e[2J\\e[H", id="clear-screen"),
        pytest.param(b"rm -rf /\rls -l\n", b"rm -rf /\\x0dls -l\n", id="carriage-return"),
        pytest.param(b"\x00\x08\x0b\x0c\x1f\x7f", b"\\x00\\x08\\x0b\\x0c\\x1f\\x7f", id="c0-del"),
        pytest.param(b"a\xc2\x9b2J\xc2\x85", b"a\\xc2\\x9b2J\\xc2\\x85", id="c1-as-utf8"),
        pytest.param(b"chunk ends inside \xc2", b"chunk ends inside \\xc2", id="trailing-c2"),
    ],
)
def test_controls_are_shown_as_escapes(data: bytes, shown: bytes) -> None:
    """ESC is \\e, other controls but tab and newline \\xNN; text and UTF-8 pass unchanged."""
    assert escape_controls(data) == shown


def test_clean_data_is_returned_as_is() -> None:
    """No control character: the very same object, no copy (the fan-out's hot path)."""
    data = b"acme-blog\n" * 1000
    assert escape_controls(data) is data


def test_json_safe_escapes_what_json_dumps_leaves() -> None:
    """DEL, C1 (NEL included), U+2028, U+2029 and U+FEFF become \\u escapes; the JSON is equal."""
    text = json.dumps({"data": "a\x7f\x85\x9b\u2028\u2029\ufeffé"}, ensure_ascii=False)
    safe = json_safe(text)
    assert safe == '{"data": "a\\u007f\\u0085\\u009b\\u2028\\u2029\\ufeffé"}'
    assert json.loads(safe) == json.loads(text)
