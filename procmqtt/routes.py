"""Topic routes on Worker methods (issue 5). Interface fixed here; the implementation lands with
the routes work: ``route`` decorator, ``routes_of`` collecting and validating a class's routes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Route:
    pattern: str  # as written, e.g. "sensors/{device}/temperature"
    topic_filter: str  # what is subscribed, e.g. "sensors/+/temperature"
    qos: int
    name: str  # the method's name
    params: tuple[str, ...]  # the {name} parameters, in order


def routes_of(app: type[Any]) -> tuple[Route, ...]:
    """The validated routes of a Worker subclass (none until the routes work lands)."""
    return ()
