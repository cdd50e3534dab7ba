"""Sizes as users write them: ``2GB``, ``500MB``, ``1.5GiB``."""

from __future__ import annotations

import re

from statecli.errors import UsageError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?B?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``2GB`` -> 2*10**9, ``2GiB`` -> 2*2**30, ``500MB``, ``123`` (bytes); the units transformers accepts."""
    m = _SIZE.match(text)
    if m is None:
        raise UsageError(f"cannot read size {text!r} (examples: 2GB, 500MB, 1.5GiB)")
    number, unit, suffix = float(m.group(1)), m.group(2).upper(), m.group(3).upper()
    base = 1024 if suffix.startswith("I") else 1000
    power = " KMGT".index(unit) if unit else 0
    size = int(number * base**power)
    if size <= 0:
        raise UsageError(f"size {text!r} must be positive")
    return size
