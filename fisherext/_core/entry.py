"""Public entry points: one error prefix, and the old spellings of renamed arguments.

Every public function and method of the package is wrapped by :func:`entry_point` (classes by
:func:`entry_points`). Inside, checks raise ``ValueError``/``TypeError`` with the message
``"<argument>: <what is wrong>"``; when such an error leaves the outermost entry point of a call it reads

    ``fisherext.<entry point>: argument '<argument>' <what is wrong>``

(the exception object itself is re-raised, its type and traceback kept). Errors already carrying the
prefix (the compiled ops write it themselves) and errors of other libraries pass unchanged. An argument
passed under a spelling of an earlier version raises a TypeError that names its new spelling.
"""
from __future__ import annotations

import contextvars
import functools
import inspect
import re

_ACTIVE = contextvars.ContextVar("fisherext_entry_point", default=None)
# "<argument>: <message>", the argument an identifier with optional indexing: v, V[3], state['P']
_ARGUMENT_MESSAGE = re.compile(r"([A-Za-z_]\w*(?:\[[^\]]*\])*): (.*)", re.DOTALL)


def _prefixed(err: Exception, where: str) -> None:
    if len(err.args) != 1 or not isinstance(err.args[0], str):
        return
    match = _ARGUMENT_MESSAGE.fullmatch(err.args[0])
    if match is not None:
        err.args = (f"fisherext.{where}: argument '{match.group(1)}' {match.group(2)}",)


def entry_point(fn=None, *, name: str | None = None, renamed: dict[str, str] | None = None):
    """Wraps a public function (or method) ``fn``: errors of its checks get the package's prefix, and a
    keyword in ``renamed`` ({old spelling: new}) is refused with the new name. ``name`` defaults to the
    function's qualified name (``Class.method``; ``Class`` for ``__init__``)."""
    if fn is None:
        return functools.partial(entry_point, name=name, renamed=renamed)
    where = name or fn.__qualname__.removesuffix(".__init__")
    old = dict(renamed or {})

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if _ACTIVE.get() is not None:
            return fn(*args, **kwargs)
        token = _ACTIVE.set(where)
        try:
            for key in old.keys() & kwargs.keys():
                raise TypeError(f"fisherext.{where}: argument '{key}' is now called '{old[key]}'")
            return fn(*args, **kwargs)
        except (ValueError, TypeError) as err:
            _prefixed(err, where)
            raise
        finally:
            _ACTIVE.reset(token)

    wrapper.__fisherext_entry__ = where
    wrapper.__fisherext_renamed__ = old
    return wrapper


def entry_points(cls=None, *, renamed: dict[str, str] | None = None):
    """Class decorator: :func:`entry_point` on ``__init__`` (with ``renamed``) and on every public method
    the class itself defines (``__matmul__`` included)."""
    if cls is None:
        return functools.partial(entry_points, renamed=renamed)
    for attr, value in list(vars(cls).items()):
        if attr == "__init__":
            setattr(cls, attr, entry_point(value, renamed=renamed))
        elif attr.startswith("_") and attr != "__matmul__":
            continue
        elif isinstance(value, (staticmethod, classmethod)):
            setattr(cls, attr, type(value)(entry_point(value.__func__, name=f"{cls.__name__}.{attr}")))
        elif inspect.isfunction(value):
            setattr(cls, attr, entry_point(value, name=f"{cls.__name__}.{attr}"))
    return cls
