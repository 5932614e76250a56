"""netd.text: which characters identifiers refuse, and how netctl shows them."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netd.text import escape, unsafe_char


@pytest.mark.parametrize("text", ["\x00", "a\x1b[31m", "\x7f", "\x85", "\u200b", "\u200e",
                                  "\u202a", "\u202e", "\u2066", "\u2069", "\u2028", "\u2029",
                                  "\ufeff", "\ud800"])
def test_unsafe(text: str) -> None:
    assert unsafe_char(text) is not None
    assert unsafe_char(escape(text)) is None


@pytest.mark.parametrize("text", ["", "web-1", "K8S_POD_NAME", "caf\u00e9", "\u65e5\u672c",
                                  "a b", "emoji \U0001f600", "x/y:z@w"])
def test_safe_text_is_left_alone(text: str) -> None:
    assert unsafe_char(text) is None and escape(text) == text


def test_escape_forms() -> None:
    assert escape("a\x1bb\u202ec\U000e0001") == "a\\x1bb\\u202ec\\U000e0001"


@given(st.text())
def test_escaped_text_is_always_safe(text: str) -> None:
    shown = escape(text)
    assert unsafe_char(shown) is None
    if unsafe_char(text) is None:
        assert shown == text
