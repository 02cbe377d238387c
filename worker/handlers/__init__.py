"""The handler registry: job type name -> `Handler` class.

Built-ins are `debug.*` (always) and the media job types, whose modules are
imported lazily and skipped with a log line when their heavy dependencies
(torch, PyAV, OpenCV) are missing. User modules come from
`SPOOL_WORKER_HANDLERS=pkg.module:Class,pkg.other` (a module without `:Class`
contributes every concrete Handler subclass it defines).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
from types import ModuleType

from worker.sdk import Handler

log = logging.getLogger("spool.worker.handlers")

#: always available
BUILTIN_MODULES = ("worker.handlers.debug",)
#: available when their dependencies import
OPTIONAL_MODULES = (
    "worker.handlers.video_remove_overlay",
    "worker.handlers.video_transcode",
    "worker.handlers.model_infer",
)
HANDLERS_ENV = "SPOOL_WORKER_HANDLERS"
#: the values `Handler.isolation` may take
ISOLATIONS = ("process", "thread", "async")


def handlers_in_module(module: ModuleType) -> list[type[Handler]]:
    """Concrete Handler subclasses defined in `module` that declare a `name`."""
    found = []
    for _, obj in inspect.getmembers(module, inspect.isclass):
        if (
            issubclass(obj, Handler)
            and obj.__module__ == module.__name__
            and not inspect.isabstract(obj)
            and isinstance(getattr(obj, "name", None), str)
        ):
            found.append(obj)
    return found


def _load_spec(spec: str) -> list[type[Handler]]:
    module_name, _, attr = spec.strip().partition(":")
    module = importlib.import_module(module_name)
    if not attr:
        found = handlers_in_module(module)
        if not found:
            raise ValueError(f"{module_name} defines no Handler subclass with a name")
        return found
    obj = getattr(module, attr)
    if not (isinstance(obj, type) and issubclass(obj, Handler)):
        raise TypeError(f"{spec} is not a Handler subclass")
    return [obj]


def load_handlers(
    extra: str | list[str] | None = None,
    *,
    types: list[str] | None = None,
    optional: bool = True,
) -> dict[str, type[Handler]]:
    """Build the registry: built-ins, optional media handlers, then `extra` specs.

    `extra` defaults to `$SPOOL_WORKER_HANDLERS`; a bad user spec raises (a
    typo should stop the worker, not silently drop a job type). With `types`,
    only those job types are kept (and optional modules are skipped unless a
    requested type could come from them).
    """
    if extra is None:
        extra = os.environ.get(HANDLERS_ENV, "")
    specs = [s for s in (extra.split(",") if isinstance(extra, str) else extra) if s.strip()]
    registry: dict[str, type[Handler]] = {}

    def add(classes: list[type[Handler]]) -> None:
        for cls in classes:
            if types is not None and cls.name not in types:
                continue
            registry[cls.name] = cls

    for mod in BUILTIN_MODULES:
        add(handlers_in_module(importlib.import_module(mod)))
    user_classes = [cls for spec in specs for cls in _load_spec(spec)]
    provided = set(registry) | {cls.name for cls in user_classes}
    # Skip the heavy imports when the wanted types are all provided already.
    if optional and (types is None or any(t not in provided for t in types)):
        for mod in OPTIONAL_MODULES:
            try:
                add(handlers_in_module(importlib.import_module(mod)))
            except ModuleNotFoundError as exc:
                # Absent module: not built here. A dependency missing: say which.
                level = logging.DEBUG if exc.name == mod else logging.WARNING
                log.log(level, "job types from %s unavailable: %s", mod, exc)
            except Exception as exc:
                log.warning("job types from %s unavailable: %s: %s", mod, type(exc).__name__, exc)
    # User handlers last: they may replace a built-in of the same name.
    add(user_classes)
    return registry


def thread_handlers(
    extra: str | list[str] | None = None, *, types: list[str] | None = None
) -> dict[str, type[Handler]]:
    """The job types of the registry that run in the worker process itself
    (`isolation = "thread"` or `"async"`).

    Read in the worker process, which runs those itself; the optional media
    modules are not imported for it (they are process types, and the worker
    process never imports torch). A value of `isolation` other than
    "process", "thread" or "async" raises: a typo must not silently pick one,
    and so does an "async" type whose `run` is not an `async def` (or a
    "thread" one whose `run` is).
    """
    found = {}
    for name, cls in load_handlers(extra, types=types, optional=False).items():
        if isolation_of(name, cls) != "process":
            found[name] = cls
    return found


def isolation_of(name: str, cls: type[Handler]) -> str:
    """The `isolation` a handler class declares, checked: a value not in ISOLATIONS, an
    "async" type whose `run` is not an `async def`, or another whose `run` is, raises."""
    isolation = getattr(cls, "isolation", "process")
    if isolation not in ISOLATIONS:
        raise ValueError(f"{name}: isolation must be one of {ISOLATIONS}, got {isolation!r}")
    if (isolation == "async") != inspect.iscoroutinefunction(cls.run):
        raise ValueError(f'{name}: isolation "async" goes with an `async def run` (and only it)')
    return isolation
