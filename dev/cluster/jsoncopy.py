"""A deep copy of a JSON value (dicts, lists, scalars), which is all the API server stores.

copy.deepcopy handles any object graph (memo, cycles, __deepcopy__) and was most of the local
cluster's time under load: every write, read and watch event copies an object. For JSON values
this is about 3.5x faster.
"""

from __future__ import annotations

from typing import TypeVar

T = TypeVar("T")


def clone(value: T) -> T:
    kind = type(value)
    if kind is dict:
        return {key: clone(item) for key, item in value.items()}  # type: ignore[attr-defined, return-value]
    if kind is list:
        return [clone(item) for item in value]  # type: ignore[attr-defined, return-value]
    return value
