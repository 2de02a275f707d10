"""Argument checks shared by every public constructor, with one message template."""

from __future__ import annotations

from typing import Any


def check_int(name: str, value: Any, minimum: int) -> None:
    """Raise ``ValueError("Expected `name` to be an integer >= minimum, but got value.")`` unless it is one."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"Expected `{name}` to be an integer >= {minimum}, but got {value!r}.")


def check_positive(name: str, value: Any) -> None:
    """Raise ``ValueError("Expected `name` to be a positive number, but got value.")`` unless it is one."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"Expected `{name}` to be a positive number, but got {value!r}.")
