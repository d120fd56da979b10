"""The key of ``dispatch = "ordered"``: messages with one key are handled one at a time, in order.

``order_key = "topic"`` keys each message on its whole topic. A pattern such as
``sensors/{device}/#`` is a topic filter whose ``{name}`` levels match one level each: a topic it
matches keys on the pattern with those levels filled in (``sensors/d1/#``); any other topic keys on
its whole topic. A filled-in pattern still holds a wildcard or differs from every topic it
matches unless it names every level, so it never collides with another topic's key.
Pure string work, shared by the config check, ``procmqtt check --key-of`` and the agent.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from procmqtt.topics import filter_problem

WHOLE_TOPIC = "topic"
_NAMED = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")

KeyOf = Callable[[str], str]


def _identity(topic: str) -> str:
    return topic


def pattern_problem(pattern: str) -> str | None:
    """What is wrong with an ``order_key`` value, or None."""
    if pattern == WHOLE_TOPIC:
        return None
    levels = pattern.split("/")
    if any(("{" in level or "}" in level) and not _NAMED.fullmatch(level) for level in levels):
        return "a topic filter whose {name} levels are whole levels named like Python identifiers"
    if not any(_NAMED.fullmatch(level) for level in levels):
        return '"topic" or a topic filter with at least one {name} level, like "sensors/{device}/#"'
    filter_ = "/".join("+" if _NAMED.fullmatch(level) else level for level in levels)
    problem = filter_problem(filter_) or ("no $share/ prefix" if filter_.startswith("$share/") else None)
    return f"a valid topic filter once each {{name}} is read as + ({problem})" if problem else None


def key_function(pattern: str) -> KeyOf:
    """The key of a topic under ``pattern`` (checked by :func:`pattern_problem` first)."""
    if pattern == WHOLE_TOPIC:
        return _identity
    levels = pattern.split("/")
    multi = levels[-1] == "#"
    fixed = levels[:-1] if multi else levels
    named = frozenset(i for i, level in enumerate(fixed) if _NAMED.fullmatch(level))
    count = len(fixed)
    wild_first = not fixed or 0 in named or fixed[0] == "+"  # MQTT: such a filter skips $SYS/... topics

    def key_of(topic: str) -> str:
        parts = topic.split("/")
        if len(parts) < count or (len(parts) > count and not multi):
            return topic
        if wild_first and topic.startswith("$"):
            return topic
        out = []
        for i, want in enumerate(fixed):
            got = parts[i]
            if i in named:
                out.append(got)
            elif want == "+" or want == got:
                out.append(want)
            else:
                return topic
        if multi:
            out.append("#")
        return "/".join(out)

    return key_of
