"""Strategies and methods found by name: one registry per config key."""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from tfuse.errors import TfuseError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> strategy for the setting ``key`` (``fusion.<key>``); adding one is one
    ``@REGISTRY.register("name")`` line over a function or a class (a class is registered as
    one instance of it, which knows its ``name``)."""

    def __init__(self, key: str):
        self.key = key
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(item: T) -> T:
            if name in self._items:
                raise ValueError(f"fusion.{self.key}={name!r} is registered twice")
            if isinstance(item, type):
                instance = item()
                instance.name = name
                self._items[name] = instance
            else:
                self._items[name] = item
            return item
        return add

    def __getitem__(self, name: str) -> T:
        if name not in self._items:
            raise TfuseError(f"fusion.{self.key}={name!r} is not a known value; allowed: {', '.join(self._items)}")
        return self._items[name]

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def names(self) -> tuple[str, ...]:
        return tuple(self._items)
