"""Eager argument checks shared by every component: the message names the argument, the value and what is allowed."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["check_choice", "check_int", "check_positive_int"]


def check_choice(argument: str, value: Any, allowed: Iterable[Any]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``allowed``."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{argument}={value!r} is not supported; choose one of {allowed}")


def check_positive_int(argument: str, value: Any, allow_none: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is an integer >= 1 (or None when ``allow_none``)."""
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{argument}={value!r} must be a positive integer{' or None' if allow_none else ''}")


def check_int(argument: str, value: Any, minimum: int, why: str = "") -> None:
    """Raise ``ValueError`` unless ``value`` is an integer >= ``minimum`` (``why``: appended to the message)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{argument}={value!r} must be an integer >= {minimum}{why}")
