"""The one naming rule of every registry (optimizers, compressors, feedback rules,
communicators, presets): case, ``_`` and ``-`` do not count, so a JSON ``"type": "CDAdam"``,
``"cd_adam"`` and ``"cd-adam"`` name the same thing."""
from __future__ import annotations

import difflib
from typing import Dict, Generic, List, Optional, TypeVar

T = TypeVar("T")


def name_key(name) -> str:
    return str(name).lower().replace("_", "").replace("-", "")


class Registry(Generic[T]):
    """Named entries, each under its name and its aliases; ``get`` refuses an unknown name
    with the valid ones and the closest match."""

    def __init__(self, kind: str, entries: Dict[str, T], aliases: Optional[Dict[str, str]] = None):
        self.kind = kind
        self._names = list(entries)
        self._index: Dict[str, str] = {name_key(n): n for n in entries}
        for alias, target in (aliases or {}).items():
            self._index[name_key(alias)] = target
        self._entries = dict(entries)

    def names(self) -> List[str]:
        return list(self._names)

    def __contains__(self, name) -> bool:
        return isinstance(name, str) and name_key(name) in self._index

    def canonical(self, name) -> str:
        """The entry's own name for ``name`` (one of its aliases, any spelling)."""
        key = name_key(name)
        if key not in self._index:
            close = difflib.get_close_matches(key, list(self._index), n=1)
            hint = f". Did you mean {self._index[close[0]]!r}?" if close else ""
            raise ValueError(f"unknown {self.kind} {name!r}; valid names: {', '.join(self._names)}{hint}")
        return self._index[key]

    def get(self, name) -> T:
        return self._entries[self.canonical(name)]
