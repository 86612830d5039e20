"""A tiny name -> factory registry in timm's style, with helpful errors.

Every registry in canonwrap (groups, canonicalizers, backbones, optimizers, attacks, ...) is a
``Registry``: ``register`` is a decorator, ``get`` raises ``KeyError`` listing the valid names and
the nearest match when a name is unknown.
"""
from __future__ import annotations

import difflib
from typing import Callable, Dict, Generic, Iterator, List, TypeVar

T = TypeVar("T")


def unknown_name_message(kind: str, name: str, valid: List[str]) -> str:
    """Message for an unknown ``name``: the valid list and the closest match, if any."""
    close = difflib.get_close_matches(str(name).lower(), [v.lower() for v in valid], n=1, cutoff=0.5)
    hint = ""
    if close:
        hint = f" Did you mean {valid[[v.lower() for v in valid].index(close[0])]!r}?"
    return f"unknown {kind} {name!r}; expected one of {sorted(valid)}.{hint}"


class Registry(Generic[T]):
    """Maps lower-case names to objects (usually factories)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: Dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        key = name.lower()

        def deco(obj: T) -> T:
            if key in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[key] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        key = str(name).lower()
        if key not in self._items:
            raise KeyError(unknown_name_message(self.kind, name, list(self._items)))
        return self._items[key]

    def names(self) -> List[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return str(name).lower() in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
