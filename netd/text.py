"""Text from users that ends up in terminals and logs: what is refused, how it is shown.

Identifiers, handles, labels and notes may hold any printable text, but not the
characters that change what a terminal shows: control characters (an escape
sequence can rewrite the screen), format characters (bidirectional overrides
reverse what follows; zero-width characters hide differences), line and
paragraph separators, and lone surrogates (not text at all). The IPAM refuses
them (:func:`unsafe_char`); ``netctl`` escapes them in whatever it prints
(:func:`escape`), for data that came from elsewhere.
"""

from __future__ import annotations

import unicodedata

#: Unicode categories refused in identifiers: Cc control, Cf format (bidi, zero width),
#: Cs surrogate, Zl line separator, Zp paragraph separator
UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def _unsafe(c: str) -> bool:
    return unicodedata.category(c) in UNSAFE_CATEGORIES


def unsafe_char(text: str) -> str | None:
    """The first character of ``text`` that a terminal would not show as itself."""
    if text.isascii() and text.isprintable():  # the common case, without a loop
        return None
    return next((c for c in text if _unsafe(c)), None)


def describe(c: str) -> str:
    """``U+202E (RIGHT-TO-LEFT OVERRIDE)``: a character named in an error message."""
    name = unicodedata.name(c, "")
    return f"U+{ord(c):04X}" + (f" ({name})" if name else "")


def escape(text: str) -> str:
    """``text`` with every unsafe character written as ``\\xNN`` / ``\\uNNNN``."""
    if unsafe_char(text) is None:
        return text
    out = []
    for c in text:
        if not _unsafe(c):
            out.append(c)
        elif ord(c) < 0x100:
            out.append(f"\\x{ord(c):02x}")
        elif ord(c) < 0x10000:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(f"\\U{ord(c):08x}")
    return "".join(out)


__all__ = ["UNSAFE_CATEGORIES", "describe", "escape", "unsafe_char"]
