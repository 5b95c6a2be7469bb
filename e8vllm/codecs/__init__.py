"""Codec registry: every KV codec by name, with a stable numeric id stored with the data.

>>> import e8vllm.codecs as codecs
>>> codecs.names()                      # doctest: +SKIP
['e8-2bit', 'e8-3bit', 'e8-4bit', ...]
>>> c = codecs.get("e8-4bit", head_dim=64)
>>> codes = c.encode(x)                  # x: float [N, 64] -> uint8 [N, c.code_bytes]
>>> xhat = c.decode(codes)               # -> float32 [N, 64]

Ids never change once released: a cache or file that stores an id decodes with the
same codec forever. Adding a codec = one module that calls :func:`register` + its name
in ``_MODULES``; it then joins every parametrized test.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from .base import Codec, DecodeCost, check_codes, check_vectors

__all__ = ["Codec", "DecodeCost", "register", "names", "get", "codec_id", "name_of", "info", "check_vectors", "check_codes"]


@dataclass(frozen=True)
class _Entry:
    name: str
    codec_id: int
    factory: Callable[..., Codec]
    family: str
    nominal_bits: float
    summary: str


_REGISTRY: dict[str, _Entry] = {}
_BY_ID: dict[int, str] = {}


def register(name: str, codec_id: int, factory: Callable[..., Codec], *, family: str, nominal_bits: float, summary: str) -> None:
    """Add a codec. ``factory(head_dim=D, **kw)`` builds it. Name and id must be new."""
    if name in _REGISTRY and _REGISTRY[name].codec_id != codec_id:
        raise ValueError(f"codec name {name!r} already registered with id {_REGISTRY[name].codec_id}")
    if codec_id in _BY_ID and _BY_ID[codec_id] != name:
        raise ValueError(f"codec id {codec_id} already used by {_BY_ID[codec_id]!r}")
    _REGISTRY[name] = _Entry(name, codec_id, factory, family, nominal_bits, summary)
    _BY_ID[codec_id] = name


# One module per family. Order = order of names().
_MODULES = ("e8", "e8s", "e8c", "e8p", "uniform", "lloydmax", "fp8", "pq", "peers")
for _m in _MODULES:
    importlib.import_module(f"{__name__}.{_m}")


def names(family: str | None = None) -> list[str]:
    """All registered codec names (optionally of one family), in registration order."""
    return [n for n, e in _REGISTRY.items() if family is None or e.family == family]


def _entry(name: str) -> _Entry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown codec {name!r}; known: {', '.join(names())}") from None


def get(name: str, head_dim: int, **kwargs) -> Codec:
    """Build codec ``name`` for vectors of size ``head_dim``. Raises ValueError if unknown/unsupported."""
    return _entry(name).factory(head_dim=head_dim, **kwargs)


def codec_id(name: str) -> int:
    return _entry(name).codec_id


def name_of(codec_id_: int) -> str:
    try:
        return _BY_ID[codec_id_]
    except KeyError:
        raise ValueError(f"unknown codec id {codec_id_}") from None


def info(name: str) -> _Entry:
    return _entry(name)
