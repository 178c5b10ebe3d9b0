"""What may reach a viewer's terminal: publishers' bytes with their control characters shown.

A message is whatever a publisher sent, and ``sub`` writes it to someone else's terminal.
Written unchanged, control characters there act instead of showing: ``ESC`` sequences set the
window title, clear the screen or write the clipboard (OSC 52), ``\\r`` hides a line behind
another. So plain ``sub`` output shows each one as a visible escape instead: ``ESC`` as
``\\e``, every other C0 control but tab and newline, and ``DEL``, as ``\\xNN``, and a C1
control (U+0080 to U+009F, which UTF-8 terminals may obey too) as the two bytes of its UTF-8
form, ``\\xc2\\xNN``. Newline stays: it ends a message (and moves down inside a ``pub --raw``
chunk) but cannot change what was already shown. A literal backslash is left alone, so
``\\e`` on screen may have been typed as such: ``sub --json`` or ``sub --raw`` tell them apart.

Most messages hold no control character, and plain rendering is the fan-out's hot path: the
check is one C-speed pass (``bytes.translate``), and only a message that needs it is
rewritten.
"""

from __future__ import annotations

import re

__all__ = ["escape_controls", "json_safe"]

_C0 = bytes([*range(0x09), *range(0x0B, 0x20), 0x7F])  # not tab (09), not newline (0a)
_C1 = re.compile(rb"\xc2[\x80-\x9f]")
_CONTROL = re.compile(rb"[\x00-\x08\x0b-\x1f\x7f]|\xc2[\x80-\x9f]|\xc2\Z")
_ESCAPES = {bytes([b]): b"\\x%02x" % b for b in _C0} | {b"\x1b": b"\\e", b"\xc2": b"\\xc2"}
_ESCAPES |= {b"\xc2" + bytes([b]): b"\\xc2\\x%02x" % b for b in range(0x80, 0xA0)}

# Characters JSON may carry unescaped that still act on a terminal or a JavaScript reader:
# DEL and C1 controls, NEL (U+0085, a C1), the line and paragraph separators, and the BOM.
_JSON_UNSAFE = re.compile("[\x7f-\x9f\u2028\u2029\ufeff]")


def escape_controls(data: bytes) -> bytes:
    """``data`` with its control characters shown as escapes (see the module docstring).

    Returns ``data`` itself when nothing needed escaping. A trailing ``\\xc2`` (a ``pub
    --raw`` chunk may end inside a character) is escaped too, so the next write cannot
    complete it into a C1 control.
    """
    if len(data.translate(None, _C0)) == len(data) and not (
        b"\xc2" in data and (_C1.search(data) or data.endswith(b"\xc2"))
    ):
        return data
    return _CONTROL.sub(lambda found: _ESCAPES[found[0]], data)


def json_safe(text: str) -> str:
    """JSON text with DEL, C1 controls, U+2028, U+2029 and U+FEFF written as ``\\uXXXX``.

    ``json.dumps`` already escapes the C0 controls; these it leaves as they are. Only valid
    inside JSON strings, which is where such characters can be.
    """
    if _JSON_UNSAFE.search(text) is None:
        return text
    return _JSON_UNSAFE.sub(lambda found: f"\\u{ord(found[0]):04x}", text)
