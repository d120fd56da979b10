"""The order key of ``dispatch = "ordered"`` (``procmqtt/orderkey.py``): pure string work."""

from __future__ import annotations

import pytest

from procmqtt import config
from procmqtt.errors import ConfigError
from procmqtt.orderkey import key_function, pattern_problem

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("pattern", "topic", "key"),
    [
        ("topic", "sensors/d1/temp", "sensors/d1/temp"),
        ("sensors/{device}/#", "sensors/d1/temp", "sensors/d1/#"),
        ("sensors/{device}/#", "sensors/d1", "sensors/d1/#"),  # '#' matches the parent level too
        ("sensors/{device}/#", "sensors", "sensors"),  # not matched: the whole topic
        ("sensors/{device}/#", "other/d1/temp", "other/d1/temp"),
        ("{site}/+/{device}", "s1/x/d1", "s1/+/d1"),
        ("{site}/+/{device}", "s1/x/d1/more", "s1/x/d1/more"),
        ("{site}/+/{device}", "$SYS/x/d1", "$SYS/x/d1"),  # a leading wildcard skips $ topics
        ("a/{x}", "a/b", "a/b"),
    ],
)
def test_key_of(pattern: str, topic: str, key: str) -> None:
    assert pattern_problem(pattern) is None
    assert key_function(pattern)(topic) == key


@pytest.mark.parametrize("pattern", ["a/b", "a/{x", "a/{1x}", "a/x{y}", "a/#/{x}", "$share/g/{x}", ""])
def test_bad_patterns_are_refused_at_load(pattern: str) -> None:
    assert pattern_problem(pattern)
    with pytest.raises(ConfigError) as e:
        config.from_mapping({"workers": {"dispatch": "ordered", "order_key": pattern}}, "f.toml")
    assert "[workers] order_key" in str(e.value) and "\n" not in str(e.value)
