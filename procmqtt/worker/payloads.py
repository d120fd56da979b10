"""Typed payloads: a handler parameter annotated with the body's type gets the JSON body decoded and
validated, once, before the handler runs.

    @route("sensors/{device}/temperature")
    def temperature(self, message: Message, device: str, reading: Reading) -> None: ...

``body_of`` finds that parameter and builds its decoder when the app is loaded (supervisor, before
any fork; ``procmqtt.testing``), so a type procmqtt cannot decode is a one-line error at start
(exit 2), never a failure at the first message. The decoder runs in the worker process, after fork:
a body that does not decode raises ``InvalidPayload`` naming the field, which ``handling.Runner``
turns into ``Outcome.INVALID`` (dead-lettered or dropped at once by the agent, never retried).

The body parameter is the one annotated parameter after ``message`` that is neither a topic
parameter nor given a default. Its type may be a dataclass, a ``TypedDict``, a pydantic model or a msgspec
``Struct`` (when those are installed; neither is a dependency), or what fields of those may be:
``str``, ``int``, ``float``, ``bool``, ``None``, ``Any``, ``Literal``, an ``Enum``, unions,
``list[T]``, ``tuple[T, ...]``, ``dict[str, T]``, and nested dataclasses and TypedDicts. A
dataclass's ``__post_init__`` may raise ``ValueError`` or ``TypeError`` to refuse a value; keys the
type does not declare are ignored.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import json
import sys
import types
import typing
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from procmqtt.errors import HandlerError
from procmqtt.message import InvalidPayload

Convert = Callable[[Any, str], Any]  # (JSON value, its path for errors) -> the typed value

_SHOWN = 60  # characters of a bad value quoted in the log line


@dataclass(frozen=True)
class Body:
    """A handler's body parameter: its name, its type, and the decoder built for it."""

    name: str
    annotation: Any
    decode: Callable[[bytes], Any] = dataclasses.field(compare=False, repr=False)

    @property
    def described(self) -> str:
        """The type as ``procmqtt check`` lists it: ``reading: Reading (dataclass)``."""
        return f"{self.name}: {_kind(self.annotation)}"


class _Unsupported(Exception):
    """A type (or a field's type) procmqtt cannot decode JSON into; becomes a ``HandlerError``."""


def body_of(func: Callable[..., Any], topic_params: Collection[str], where: str) -> Body | None:
    """The body parameter of a handler (after ``self`` and ``message``), or None when it has none.

    Raises ``HandlerError`` (exit 2), one line naming ``where`` (the handler) and the parameter, for
    two body parameters, an annotation that does not resolve, or a type that cannot be decoded.
    """
    try:
        params = list(inspect.signature(func).parameters.values())[2:]
    except (TypeError, ValueError):
        return None
    found = [
        p
        for p in params
        if p.name not in topic_params
        and p.default is p.empty
        and p.annotation is not p.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    if not found:
        return None  # an unannotated extra parameter is left to the route's signature check
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise HandlerError(f"{where}: one body parameter at most, got {names} (give the others a default)")
    param = found[0]
    annotation = _resolve(func, param.name, param.annotation, where)
    try:
        convert = converter(annotation)
    except _Unsupported as exc:
        raise HandlerError(f"{where}: parameter {param.name!r}: {exc}") from None
    return Body(param.name, annotation, _decoder(param.name, annotation, convert))


def message_body(app: type[Any]) -> Body | None:
    """The typed body an ``on_message`` override declares, or None (the base class's declares none)."""
    func = inspect.getattr_static(app, "on_message")
    func = getattr(func, "__func__", func)
    if getattr(func, "__module__", None) == "procmqtt.worker.base" or not callable(func):
        return None
    return body_of(func, (), getattr(func, "__qualname__", "on_message"))


def _resolve(func: Callable[..., Any], name: str, annotation: Any, where: str) -> Any:
    """The annotation as a type: a string (``from __future__ import annotations``) is evaluated in the
    handler's module, as ``typing.get_type_hints`` would."""
    if not isinstance(annotation, str):
        return annotation
    func = inspect.unwrap(func)
    try:
        return eval(annotation, getattr(func, "__globals__", {}))
    except Exception as exc:  # noqa: BLE001 - any failure is the same user mistake
        raise HandlerError(
            f"{where}: parameter {name!r}: cannot resolve the annotation {annotation!r} ({exc}); "
            "define the type at module level"
        ) from None


TOO_DEEP = "nested too deeply (past Python's recursion limit)"


def _decoder(name: str, annotation: Any, convert: Convert) -> Callable[[bytes], Any]:
    pydantic_model = _pydantic_model(annotation)
    if pydantic_model is not None:  # pydantic parses the JSON itself: one pass, its own messages
        return lambda payload: _pydantic_call(pydantic_model.model_validate_json, payload, name)
    msgspec = _msgspec_struct(annotation)
    if msgspec is not None:
        return lambda payload: _msgspec_call(msgspec.json.decode, payload, name, type=annotation)

    def decode(payload: bytes) -> Any:
        # RecursionError: a body nested past Python's limit, in the parser or the converter; it
        # never validates, so it is invalid (once), not a failure to retry
        try:
            value = json.loads(payload)
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
            raise InvalidPayload(name, f"not JSON ({exc})") from None
        except RecursionError:
            raise InvalidPayload(name, TOO_DEEP) from None
        try:
            return convert(value, name)
        except RecursionError:
            raise InvalidPayload(name, TOO_DEEP) from None

    return decode


def converter(tp: Any) -> Convert:
    """A function that checks a JSON value against ``tp`` and returns the typed value, raising
    ``InvalidPayload`` with the path of the first bad field. ``_Unsupported`` for a type it cannot."""
    return _converter(tp, {})


def _converter(tp: Any, seen: dict[Any, Convert]) -> Convert:
    if tp in (Any, object):
        return lambda v, path: v
    if tp is None or tp is type(None):
        return _exact(type(None), "null")
    if tp is bool:
        return _exact(bool, "true or false")
    if tp is int:
        return lambda v, path: v if type(v) is int else _bad(path, "an integer", v)
    if tp is float:
        return _float
    if tp is str:
        return _exact(str, "a string")
    if tp is list or tp is dict:
        return _exact(tp, "an array" if tp is list else "an object")
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:  # the metadata is for other tools
        return _converter(args[0], seen)
    if origin is typing.Literal:
        return _literal(args)
    if origin in (typing.Union, types.UnionType):
        return _union(tp, [_converter(a, seen) for a in args], none_ok=type(None) in args)
    if origin is list or (origin is tuple and len(args) == 2 and args[1] is Ellipsis):
        return _sequence(_converter(args[0], seen) if args else _converter(Any, seen), origin)
    if origin is dict:
        if args and args[0] is not str:
            raise _Unsupported(f"JSON object keys are strings, so {_name(tp)} cannot be decoded; use dict[str, ...]")
        return _mapping(_converter(args[1], seen) if args else _converter(Any, seen))
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return _enum(tp)
    if _pydantic_model(tp) is not None:
        return lambda v, path: _pydantic_call(tp.model_validate, v, path)
    msgspec = _msgspec_struct(tp)
    if msgspec is not None:
        return lambda v, path: _msgspec_call(msgspec.convert, v, path, type=tp)
    if (dataclasses.is_dataclass(tp) and isinstance(tp, type)) or typing.is_typeddict(tp):
        if tp in seen:  # a recursive type: look the converter up when called
            return lambda v, path: seen[tp](v, path)
        seen[tp] = _unbuilt
        built = _record(tp, seen)
        seen[tp] = built
        return built
    raise _Unsupported(
        f"{_name(tp)} cannot be decoded from JSON; use a dataclass, a TypedDict, a pydantic model, "
        "a msgspec Struct, or str, int, float, bool, list, dict, Literal, Enum and unions of them"
    )


def _unbuilt(value: Any, path: str) -> Any:  # pragma: no cover - replaced before any call
    raise RuntimeError("converter called while being built")


def _record(tp: type[Any], seen: dict[Any, Convert]) -> Convert:
    """A dataclass or a TypedDict from a JSON object: each declared field converted, extras ignored."""
    try:
        hints = typing.get_type_hints(tp)
    except Exception as exc:  # noqa: BLE001 - an unresolvable field annotation, whatever it raised
        raise _Unsupported(f"{_name(tp)}: cannot resolve its field types ({exc})") from None
    if typing.is_typeddict(tp):
        required = frozenset(getattr(tp, "__required_keys__", hints))
        fields = {name: (name in required, hints[name]) for name in hints}
        make: Callable[[dict[str, Any]], Any] = dict
    else:
        fields = {
            f.name: (f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING, hints[f.name])
            for f in dataclasses.fields(tp)
            if f.init
        }

        def make(values: dict[str, Any]) -> Any:
            return tp(**values)

    converters: dict[str, tuple[bool, Convert]] = {}
    for name, (needed, hint) in fields.items():
        try:
            converters[name] = (needed, _converter(hint, seen))
        except _Unsupported as exc:
            raise _Unsupported(f"{_name(tp)}.{name}: {exc}") from None

    def convert(value: Any, path: str) -> Any:
        if type(value) is not dict:
            _bad(path, f"an object ({_name(tp)})", value)
        values = {}
        for name, (needed, field_convert) in converters.items():
            if name in value:
                values[name] = field_convert(value[name], f"{path}.{name}")
            elif needed:
                raise InvalidPayload(f"{path}.{name}", "missing")
        try:
            return make(values)
        except (TypeError, ValueError) as exc:  # __post_init__ refusing a value
            raise InvalidPayload(path, str(exc) or type(exc).__name__) from None

    return convert


def _float(value: Any, path: str) -> Any:
    if type(value) is float:
        return value
    if type(value) is int:
        try:
            return float(value)
        except OverflowError:  # JSON allows any number of digits
            return _bad(path, "a number within a float's range", value)
    return _bad(path, "a number", value)


def _exact(kind: type, described: str) -> Convert:
    return lambda v, path: v if type(v) is kind else _bad(path, described, v)


def _literal(values: tuple[Any, ...]) -> Convert:
    for v in values:
        if not isinstance(v, (str, int, bool)) and v is not None:
            raise _Unsupported(f"Literal[{v!r}] cannot come from JSON")
    allowed = {(type(v), v) for v in values}
    shown = " or ".join(json.dumps(v) if not isinstance(v, enum.Enum) else repr(v) for v in values)
    scalar = (str, int, bool, type(None))  # a JSON array or object is unhashable, and never allowed
    return lambda v, path: v if type(v) in scalar and (type(v), v) in allowed else _bad(path, shown, v)


def _union(tp: Any, options: list[Convert], *, none_ok: bool) -> Convert:
    shown = _name(tp)
    if none_ok and len(options) == 2:  # Optional[X]: X's own message says what is wrong
        inner = options[0] if typing.get_args(tp)[1] is type(None) else options[1]
        return lambda v, path: None if v is None else inner(v, path)

    def convert(value: Any, path: str) -> Any:
        for option in options:
            try:
                return option(value, path)
            except InvalidPayload:
                continue
        return _bad(path, shown, value)

    return convert


def _sequence(item: Convert, origin: Any) -> Convert:
    def convert(value: Any, path: str) -> Any:
        if type(value) is not list:
            _bad(path, "an array", value)
        items = [item(v, f"{path}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)

    return convert


def _mapping(item: Convert) -> Convert:
    def convert(value: Any, path: str) -> Any:
        if type(value) is not dict:
            _bad(path, "an object", value)
        return {k: item(v, f"{path}[{k!r}]") for k, v in value.items()}

    return convert


def _enum(tp: type[enum.Enum]) -> Convert:
    shown = " or ".join(json.dumps(m.value) if isinstance(m.value, (str, int)) else repr(m.value) for m in tp)

    def convert(value: Any, path: str) -> Any:
        try:
            return tp(value)
        except ValueError:
            return _bad(path, f"{shown} ({tp.__name__})", value)

    return convert


def _bad(path: str, expected: str, value: Any) -> Any:
    shown = json.dumps(value) if value is None or isinstance(value, (bool, int, float)) else repr(value)
    if len(shown) > _SHOWN:
        shown = shown[:_SHOWN] + "..."
    raise InvalidPayload(path, f"expected {expected}, got {shown}")


def _pydantic_model(tp: Any) -> Any:
    """``tp`` when it is a pydantic model (pydantic imported by the app), else None."""
    pydantic = sys.modules.get("pydantic")
    if pydantic is None or not isinstance(tp, type):
        return None
    return tp if issubclass(tp, pydantic.BaseModel) else None


def _pydantic_call(validate: Callable[[Any], Any], value: Any, path: str) -> Any:
    pydantic = sys.modules["pydantic"]
    try:
        return validate(value)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join([path, *(str(part) for part in first.get("loc", ()))])
        raise InvalidPayload(where, str(first.get("msg", "invalid"))) from None


def _msgspec_struct(tp: Any) -> Any:
    """The ``msgspec`` module when ``tp`` is a msgspec ``Struct`` (msgspec imported by the app), else None."""
    msgspec = sys.modules.get("msgspec")
    if msgspec is None or not isinstance(tp, type):
        return None
    return msgspec if issubclass(tp, msgspec.Struct) else None


def _msgspec_call(decode: Callable[..., Any], value: Any, path: str, **kwargs: Any) -> Any:
    msgspec = sys.modules["msgspec"]
    try:
        return decode(value, **kwargs)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        text, _, at = str(exc).partition(" - at `$")
        raise InvalidPayload(path + at.rstrip("`"), text) from None
    except RecursionError:
        raise InvalidPayload(path, TOO_DEEP) from None


def _kind(tp: Any) -> str:
    if _pydantic_model(tp) is not None:
        return f"{tp.__name__} (pydantic)"
    if _msgspec_struct(tp) is not None:
        return f"{tp.__name__} (msgspec)"
    if typing.is_typeddict(tp):
        return f"{tp.__name__} (TypedDict)"
    if dataclasses.is_dataclass(tp):
        return f"{_name(tp)} (dataclass)"
    return _name(tp)


def _name(tp: Any) -> str:
    return tp.__qualname__ if isinstance(tp, type) and not typing.get_args(tp) else inspect.formatannotation(tp)
