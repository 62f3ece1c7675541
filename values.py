"""Plain values from files and the command line: the small checks every reader shares, and how a message shows
one (light: no numpy).

A value read from a shard, an index, a run folder or an option is checked by these before any
code computes with it; a message quotes it with `shown`, cut short.
"""

from __future__ import annotations

import math


def shown(value, limit: int = 80) -> str:
    """A value from a file as a message shows it: its repr, cut short (a file may hold megabytes in one string)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}..."


def is_int(value) -> bool:
    """An int that is not a bool (True == 1 in Python, never in a file of ours)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A finite int or float that is not a bool (compared, not converted, so a huge JSON int cannot overflow)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and -math.inf < value < math.inf


def is_positive_number(value) -> bool:
    """A finite number > 0."""
    return is_number(value) and value > 0


def are_distinct_names(value) -> bool:
    """A list of distinct non-empty strings, as class lists are."""
    return (isinstance(value, list) and all(isinstance(name, str) and name for name in value)
            and len(set(value)) == len(value))


def problems_of(values: dict, rules: dict) -> list[str]:
    """"KEY VALUE is not WHAT" for each key of `rules` (key -> (holds, what)) whose value in `values` fails its
    rule; keys `values` lacks are not checked."""
    return [f"{key} {shown(values[key])} is not {what}" for key, (holds, what) in rules.items()
            if key in values and not holds(values[key])]
