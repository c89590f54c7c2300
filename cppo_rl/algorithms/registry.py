"""Named registries: policy losses, divergences and advantage estimators are selected by name.

One `Registry` per kind, each holding functions of one signature (see the kind's module):
`POLICY_LOSSES` (`policy_losses.py`), `DIVERGENCES` (`divergence.py`), `ADVANTAGES` (`advantages.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
    """name -> function of one kind. `register(name)` decorates, `get(name)` looks up, `names()` lists."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._functions: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator: make `fn` selectable as `name`; a name can be registered once."""

        def decorator(fn: F) -> F:
            if name in self._functions:
                raise ValueError(f"{self.kind} {name!r} is already registered (by {self._functions[name].__name__})")
            self._functions[name] = fn
            return fn

        return decorator

    def get(self, name: str) -> F:
        """The function registered as `name`, or a ValueError listing the known names."""
        if name not in self._functions:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}")
        return self._functions[name]

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._functions)

    def __contains__(self, name: object) -> bool:
        return name in self._functions

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
