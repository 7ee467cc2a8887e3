"""The engine's loaded models: which versions serve, which are retired, when to free them.

A model is keyed ``(name, version)``. Adding a version makes it the name's serving one
and retires the name's others: new requests no longer reach a retired version, but its
queued and running work (counted with ``begin`` / ``end``) finishes on it, then it is
dropped, so its memory goes with the last batch that used it.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from .scheduler import EngineError

ModelKey = tuple[str, int]


class ModelTable:
    """Built models by key, with retirement and per-model work counts (event loop only)."""

    def __init__(self) -> None:
        self._models: dict[ModelKey, Any] = {}
        self._retired: set[ModelKey] = set()
        self._latest: dict[str, ModelKey] | None = None  # resolve's cache: name -> newest key
        self._work: Counter[ModelKey] = Counter()

    def add(self, key: ModelKey, model: Any) -> None:
        """Serve ``model`` as ``key`` (an atomic swap: planned batches hold the old handle)
        and retire the name's other versions."""
        self._models[key] = model
        self._retired.discard(key)
        for other in [k for k in self._models if k[0] == key[0] and k != key]:
            self._retire(other)
        self._latest = None

    def unload(self, name: str, version: int | None = None) -> None:
        """Retire one version (or every version) of a model; running work finishes first."""
        keys = [k for k in self._models if k[0] == name and version in (None, k[1])
                and k not in self._retired]
        if not keys:
            raise EngineError("not_found", f"model {name!r} version {version} is not loaded")
        for key in keys:
            self._retire(key)

    def models(self) -> list[ModelKey]:
        """Every servable (name, version), sorted."""
        return sorted(k for k in self._models if k not in self._retired)

    def resolve(self, name: str, version: int | None = None) -> ModelKey:
        """The servable key for ``name``: ``version`` None means the highest loaded one."""
        # Every request asks this, often more than once: the common answers take a lookup.
        if version is None:
            if self._latest is None:
                self._latest = {n: (n, v) for n, v in self.models()}  # sorted: newest wins
            if name in self._latest:
                return self._latest[name]
        elif (name, version) in self._models and (name, version) not in self._retired:
            return name, version
        versions = [k[1] for k in self.models() if k[0] == name]
        if version is None and versions:
            return name, max(versions)
        if version in versions:
            return name, version
        loaded = sorted({n for n, _ in self.models()})
        if not versions:
            raise EngineError("not_found", f"model {name!r} is not served here; models: {loaded}")
        raise EngineError("not_found", f"model {name!r} has no version {version} loaded; "
                                       f"versions: {sorted(versions)}")

    def __getitem__(self, key: ModelKey) -> Any:
        return self._models[key]

    def loaded(self) -> dict[ModelKey, Any]:
        """Every model still held, retired ones that have work left included."""
        return dict(self._models)

    def begin(self, key: ModelKey) -> None:
        """A request for ``key`` was queued."""
        self._work[key] += 1

    def end(self, key: ModelKey) -> None:
        """A request for ``key`` was answered or dropped; a drained retired model goes."""
        self._work[key] -= 1
        if not self._work[key]:
            del self._work[key]
            if key in self._retired:
                self._drop(key)

    def _retire(self, key: ModelKey) -> None:
        self._retired.add(key)
        self._latest = None
        if not self._work[key]:
            self._drop(key)

    def _drop(self, key: ModelKey) -> None:
        self._retired.discard(key)
        self._latest = None
        self._work.pop(key, None)
        del self._models[key]  # running batches keep their own reference until they finish
