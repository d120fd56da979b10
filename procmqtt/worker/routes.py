"""Topic routes on Worker methods: the ``@route`` decorator, ``routes_of`` and the matcher.

``@route`` only marks a method. ``routes_of`` collects and checks a class's routes when the app is
loaded in the supervisor, before any fork, so a bad pattern stops procmqtt at once (exit code 2)
instead of failing on the first message. ``Router`` picks the route for each message, in the worker.
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from procmqtt.config import Config, Subscription
from procmqtt.errors import RouteError
from procmqtt.topics import filter_problem, unshared
from procmqtt.worker.payloads import Body, body_of

F = TypeVar("F", bound=Callable[..., Any])

MAX_UNROUTED_REMEMBERED = 1000
"""Distinct unrouted topics remembered so each is logged once; the set starts over when full."""

_MARK = "__procmqtt_routes__"
_PARAM = re.compile(r"\{(.*)\}\Z", re.DOTALL)


@dataclass(frozen=True)
class Route:
    pattern: str  # as written, e.g. "sensors/{device}/temperature"
    topic_filter: str  # what is subscribed, e.g. "sensors/+/temperature"
    qos: int
    name: str  # the method's name
    params: tuple[str, ...]  # the {name} parameters, in order
    body: Body | None = None  # the typed body parameter, when the method declares one (``payloads``)


def route(pattern: str, qos: int = 0) -> Callable[[F], F]:
    """Route messages whose topic matches ``pattern`` to the decorated method.

    ``{name}`` matches one level (subscribed as ``+``) and is passed as the keyword argument
    ``name``; ``+`` and ``#`` work as in MQTT. One more parameter annotated with a type receives the
    JSON body decoded and validated as that type (``payloads``; docs/typed-payloads.md). The filter
    is subscribed with ``qos``. Stacking
    several ``@route`` on one method is allowed. Nothing is checked here: ``routes_of`` checks
    everything when the app is loaded, so a mistake is a one-line startup error, not an import
    traceback.
    """

    def mark(func: F) -> F:
        setattr(func, _MARK, ((pattern, qos), *getattr(func, _MARK, ())))
        return func

    return mark


def routes_of(app: type[Any]) -> tuple[Route, ...]:
    """The validated routes of a Worker subclass, in declaration order (base classes first).

    A method is looked up as the class resolves it, so a subclass that overrides a routed method
    without ``@route`` removes that route. Raises ``RouteError`` (exit code 2) naming the method and
    the pattern for an invalid filter, a bad qos, a ``{param}`` the method does not accept, a
    parameter used twice, or two routes with the same filter (the second could never be reached).
    """
    names: dict[str, None] = {}
    for klass in reversed(app.__mro__):
        names.update(dict.fromkeys(vars(klass)))
    found: list[Route] = []
    for name in names:
        attr = inspect.getattr_static(app, name)
        marks = getattr(attr, _MARK, None)
        if not isinstance(marks, tuple) or not marks:
            continue
        if not inspect.isfunction(attr):
            raise RouteError(
                f"{app.__qualname__}.{name}: @route must decorate a plain method "
                "(def or async def), not a static/class method or other object"
            )
        found += [_checked(attr, name, pattern, qos) for pattern, qos in marks]
    seen: dict[str, Route] = {}
    for r in found:
        earlier = seen.setdefault(r.topic_filter, r)
        if earlier is not r:
            raise RouteError(
                f"{app.__qualname__}.{r.name}: @route({r.pattern!r}) has the same filter "
                f"{r.topic_filter!r} as @route({earlier.pattern!r}) on {earlier.name}; "
                "the second could never be reached"
            )
    return tuple(found)


def with_route_subscriptions(config: Config, app: type[Any]) -> Config:
    """``config`` with the app's route filters added to ``[mqtt.topics]``, so they take the same
    path to the broker; a filter in both is subscribed once, with the higher qos."""
    qos = {s.topic_filter: s.qos for s in config.mqtt.topics}
    for r in routes_of(app):
        qos[r.topic_filter] = max(r.qos, qos.get(r.topic_filter, 0))
    topics = tuple(Subscription(f, q) for f, q in qos.items())
    return replace(config, mqtt=replace(config.mqtt, topics=topics))


def _checked(func: Callable[..., Any], name: str, pattern: Any, qos: Any) -> Route:
    where = f"{func.__qualname__}: @route({pattern!r})"
    if not isinstance(pattern, str):
        raise RouteError(f"{where}: the pattern must be a string")
    if qos not in (0, 1, 2) or isinstance(qos, bool):
        raise RouteError(f"{where}: qos must be 0, 1 or 2, got {qos!r}")
    levels, params = [], []
    for level in pattern.split("/"):
        param = _PARAM.match(level)
        if param:
            key = param.group(1)
            if not key.isidentifier():
                raise RouteError(f"{where}: {{{key}}} is not a valid parameter name (a Python identifier)")
            if key in params:
                raise RouteError(f"{where}: the parameter {{{key}}} appears twice")
            params.append(key)
            levels.append("+")
        elif "{" in level or "}" in level:
            raise RouteError(f"{where}: a parameter must be a whole level, like sensors/{{device}}/temperature")
        else:
            levels.append(level)
    topic_filter = "/".join(levels)
    problem = filter_problem(topic_filter)
    if problem:
        raise RouteError(f"{where}: not a valid MQTT topic filter ({problem})")
    body = body_of(func, params, where)
    try:
        inspect.signature(func).bind(None, None, **dict.fromkeys(params, ""), **({body.name: None} if body else {}))
    except TypeError as exc:
        takes = f"(self, message, {', '.join(params)})" if params else "(self, message)"
        raise RouteError(f"{where}: the method must accept {takes}: {exc}") from None
    return Route(pattern, topic_filter, qos, name, tuple(params), body)


def specificity(r: Route) -> tuple[int, int, int]:
    """Sort key, most specific first: more literal levels; then no ``#`` before ``#``; then more
    levels. Ties keep declaration order (``sorted`` is stable). ``{param}`` counts as ``+``."""
    levels = _levels(r.topic_filter)
    literals = sum(1 for level in levels if level not in ("+", "#"))
    return (-literals, int(levels[-1] == "#"), -len(levels))


def _levels(topic_filter: str) -> list[str]:
    """The levels that topics are matched against (a shared subscription's group is not one)."""
    return unshared(topic_filter).split("/")


def _regex(r: Route) -> re.Pattern[str]:
    """A full-match pattern for topics; the named groups are the route's parameters."""
    levels = _levels(r.pattern)
    parts = []
    for level in levels:
        param = _PARAM.match(level)
        if param:
            parts.append(f"(?P<{param.group(1)}>[^/]*)")
        elif level == "+":
            parts.append("[^/]*")
        elif level != "#":
            parts.append(re.escape(level))
    if levels[-1] == "#":  # "a/#" matches "a" and everything below it
        text = "/".join(parts) + "(?:/.*)?" if parts else ".*"
    else:
        text = "/".join(parts)
    if levels[0] in ("+", "#") or _PARAM.match(levels[0]):
        text = r"(?!\$)" + text  # MQTT: a wildcard first level does not match topics starting with $
    return re.compile(text, re.DOTALL)


class Router:
    """Picks the most specific route for a topic (``specificity``); built once per worker process."""

    def __init__(self, routes: Iterable[Route], worker: Any, log: logging.Logger) -> None:
        ranked = sorted(routes, key=specificity)
        self.routes = tuple(ranked)
        self._table = [(_regex(r), getattr(worker, r.name), r.body) for r in ranked]
        self._log = log
        self._unrouted: set[str] = set()

    def match(self, topic: str) -> tuple[Callable[..., Any], dict[str, Any], Body | None] | None:
        """The bound method, its topic parameters and its typed body (or None), or None when no route
        matches."""
        for regex, handler, body in self._table:
            found = regex.fullmatch(topic)
            if found is not None:
                return handler, found.groupdict(), body
        return None

    def unrouted(self, topic: str) -> None:
        """Log a topic no route matches, once per topic (bounded memory)."""
        if topic in self._unrouted:
            return
        if len(self._unrouted) >= MAX_UNROUTED_REMEMBERED:
            self._unrouted.clear()
        self._unrouted.add(topic)
        self._log.debug("no route matches topic %r; acknowledged as unrouted (logged once per topic)", topic)
