"""Loading the user's app: ``package.module:Class`` or ``path/to/file.py:Class``."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import traceback

from procmqtt.errors import AppError, ConfigError
from procmqtt.worker.base import Worker, check_app

SHOWN_FRAMES = 4
"""An app that fails on import: the last frames of its own code shown, not procmqtt's or importlib's."""

_PROCMQTT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep  # the procmqtt package
_IMPORTLIB_DIR = os.path.dirname(os.path.abspath(importlib.__file__)) + os.sep
_EXPECTED = "expected package.module:Class or path/to/file.py:Class"


def split_spec(spec: str) -> tuple[str, str]:
    """``APP`` as (module or file, attribute path); a malformed one is a command-line mistake (exit 2)."""
    module_part, sep, attr = spec.rpartition(":")
    if not sep or not module_part or not attr:
        raise ConfigError(f"APP {spec!r}: {_EXPECTED}")
    if not all(part.isidentifier() for part in attr.split(".")):
        raise ConfigError(f"APP {spec!r}: {attr!r} is not a class name; {_EXPECTED}")
    if not _is_file(module_part) and not all(part.isidentifier() for part in module_part.split(".")):
        raise ConfigError(f"APP {spec!r}: {module_part!r} is not a module name (a file name ends in .py); {_EXPECTED}")
    return module_part, attr


def _is_file(module_part: str) -> bool:
    return module_part.endswith(".py") or os.sep in module_part


def load_app(spec: str) -> type[Worker]:
    """Import the Worker subclass named by ``spec``, in the supervisor before any fork.

    Importing once, before fork, means an import error stops ``procmqtt`` at once (exit 3) and the
    workers share the imported code's memory. The ``@route`` methods are checked here too, so a bad
    route stops it before any fork (exit 2).
    """
    module_part, attr = split_spec(spec)
    try:
        if _is_file(module_part):
            module = _import_file(spec, module_part)
        else:
            if os.getcwd() not in sys.path and "" not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_part)
    except AppError:
        raise
    except ModuleNotFoundError as exc:
        raise AppError(f"APP {spec!r}: cannot import {module_part}: {exc}{_user_frames(exc)}") from None
    except Exception as exc:
        raise AppError(
            f"APP {spec!r}: importing {module_part} raised {type(exc).__name__}: {exc}{_user_frames(exc)}"
        ) from exc
    obj = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AppError(f"APP {spec!r}: {module_part} has no attribute {attr!r}") from None
    if not (isinstance(obj, type) and issubclass(obj, Worker)) or obj is Worker:
        raise AppError(f"APP {spec!r}: {attr} is not a subclass of procmqtt.Worker")
    try:
        check_app(obj)
    except AppError as exc:
        raise type(exc)(f"APP {spec!r}: {exc}") from None
    return obj


def _user_frames(exc: BaseException) -> str:
    """Where in the app's own code the import failed, as Python prints it ("File ..., line N, in f"
    and the source line), most recent call last; procmqtt's and importlib's frames left out.

    Empty when no frame is the app's (a module that does not exist), so that error stays one line.
    """
    frames = [
        frame
        for frame in traceback.extract_tb(exc.__traceback__)
        if not frame.filename.startswith((_PROCMQTT_DIR, _IMPORTLIB_DIR, "<frozen "))
    ]
    lines = traceback.format_list(frames[-SHOWN_FRAMES:])
    if isinstance(exc, SyntaxError) and exc.filename:  # the bad line is not a frame: Python's own layout
        lines += traceback.format_exception_only(type(exc), exc)[:-1]
    return "\n" + "".join(lines).rstrip("\n") if lines else ""


def _import_file(spec: str, path: str):  # type: ignore[no-untyped-def]
    if not os.path.isfile(path):
        raise AppError(f"APP {spec!r}: no such file {path}")
    name = os.path.splitext(os.path.basename(path))[0]
    directory = os.path.dirname(os.path.abspath(path))
    if directory not in sys.path:
        sys.path.insert(0, directory)
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise AppError(f"APP {spec!r}: cannot load {path}")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    module_spec.loader.exec_module(module)
    return module


def reload_app(spec: str) -> type[Worker]:
    """SIGHUP: import the app again from its source, in the supervisor; new workers fork from it.

    The app's modules are dropped from ``sys.modules`` first: the module itself and, for
    ``package.module:Class``, every module of its top-level package (not procmqtt's). Any other
    module (libraries) stays as imported. If the import fails, the previous modules are put back,
    so the running code is untouched.
    """
    module_part = spec.rpartition(":")[0]
    if _is_file(module_part):
        owned = [os.path.splitext(os.path.basename(module_part))[0]]  # what _import_file names it
    else:
        top = module_part.split(".")[0]
        owned = [module_part] if top == "procmqtt" else [top]

    def mine(name: str) -> bool:
        return any(name == o or name.startswith(o + ".") for o in owned)

    saved = {name: module for name, module in sys.modules.items() if mine(name)}
    for name in saved:
        del sys.modules[name]
    importlib.invalidate_caches()
    try:
        return load_app(spec)
    except BaseException:
        for name in [name for name in sys.modules if mine(name)]:
            del sys.modules[name]
        sys.modules.update(saved)
        for name, module in saved.items():  # an import binds a submodule on its package too
            parent, _, child = name.rpartition(".")
            if parent in sys.modules:
                setattr(sys.modules[parent], child, module)
        raise
