"""Checks on text users send, shared by tasks, batches and webhooks."""

from __future__ import annotations


def text_problem(value: str) -> str | None:
    """Return why a text cannot be stored (NUL bytes, lone surrogates), or None."""
    if "\x00" in value:
        return "must not contain NUL characters"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "must be valid Unicode text (it contains a lone surrogate)"
    return None
