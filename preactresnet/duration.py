"""A --time-budget's text ('90s', '10m', '1h30m') in seconds: read by the config's checks and by the budget."""

from __future__ import annotations

import re

_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?")


def parse_duration(text: str) -> float:
    """'90s', '10m', '2h', '1h30m', '1.5h' or a bare number of seconds -> seconds (> 0)."""
    value = str(text).strip().lower()
    match = _DURATION.fullmatch(value)
    if re.fullmatch(r"\d+(?:\.\d+)?", value):
        seconds = float(value)
    elif value and match:
        h, m, s = (float(g) if g else 0.0 for g in match.groups())
        seconds = 3600 * h + 60 * m + s
    else:
        raise ValueError(f"--time-budget '{text}' is not a duration; use e.g. 90s, 10m, 2h or 1h30m")
    if seconds <= 0:
        raise ValueError(f"--time-budget must be longer than 0 s, got '{text}'")
    return seconds


__all__ = ["parse_duration"]
