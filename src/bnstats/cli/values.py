"""Types for numeric options: a bad value is refused by argparse, naming the option
(``bnstats demo: argument --seed: expected an integer >= 0, got '-1'``)."""

from __future__ import annotations

import argparse
import math
import sys


def non_negative_int(text: str) -> int:
    return _int_at_least(text, 0)


def positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def _int_at_least(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < least:
        raise argparse.ArgumentTypeError(f"expected an integer >= {least}, got {text!r}")
    if value > sys.maxsize:
        raise argparse.ArgumentTypeError(
            f"expected an integer from {least} to {sys.maxsize}, got {text!r}"
        )
    return value


def non_negative_float(text: str) -> float:
    """A finite number of 0 or more."""
    return _finite_float(text, strictly=False)


def positive_float(text: str) -> float:
    """A finite number above 0 (``inf`` and ``nan`` are refused)."""
    return _finite_float(text, strictly=True)


def _finite_float(text: str, strictly: bool) -> float:
    """A finite number above 0 (``strictly``) or at least 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and (value > 0 if strictly else value >= 0)):
        sign = ">" if strictly else ">="
        raise argparse.ArgumentTypeError(f"expected a finite number {sign} 0, got {text!r}")
    return value
