"""Model repository: ``<root>/<model>/<version>/{spec.json, weights.safetensors}``.

Versions are positive integers (folder names); the highest loads unless a version is
asked for. Weights are safetensors (no pickle), checked tensor by tensor against the
spec on load, so a bad upload is refused with a precise list of what is wrong.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .spec import ModelSpec
from .weights import check_weights

SPEC_FILE = "spec.json"
WEIGHTS_FILE = "weights.safetensors"


class RepositoryError(ValueError):
    """A model folder exists but cannot be loaded; the message says what to fix."""


class ModelNotFoundError(LookupError):
    """No such model, or no such version of it."""


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """A spec with its checked weights, as read from one version folder."""

    spec: ModelSpec
    weights: dict[str, torch.Tensor]
    name: str
    version: int
    path: Path


class ModelRepository:
    """Read access to a repository folder. Reads the disk on every call (no caching)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def models(self) -> list[tuple[str, int]]:
        """Every model with at least one version, and its latest version, sorted by name."""
        if not self.root.is_dir():
            return []
        out = []
        for entry in sorted(self.root.iterdir()):
            versions = self.versions(entry.name) if entry.is_dir() else []
            if versions:
                out.append((entry.name, versions[-1]))
        return out

    def versions(self, name: str) -> list[int]:
        """The model's versions, ascending (empty when the model is absent)."""
        folder = self._model_dir(name)
        if not folder.is_dir():
            return []
        return sorted(int(p.name) for p in folder.iterdir()
                      if p.is_dir() and p.name.isdigit() and int(p.name) > 0)

    def load(self, name: str, version: int | None = None) -> LoadedModel:
        """Load and check one version (the latest when ``version`` is None)."""
        versions = self.versions(name)
        if not versions:
            known = ", ".join(n for n, _ in self.models()) or "none"
            raise ModelNotFoundError(f"model {name!r} not found in {self.root} (models: {known})")
        if version is None:
            version = versions[-1]
        elif version not in versions:
            raise ModelNotFoundError(f"model {name!r} has no version {version} "
                                     f"(versions: {versions})")
        path = self._model_dir(name) / str(version)
        spec = _read_spec(path / SPEC_FILE)
        if spec.name != name:
            raise RepositoryError(f"{path / SPEC_FILE} names model {spec.name!r}, but its "
                                  f"folder is {name!r}; rename one so they match")
        weights = _read_weights(path / WEIGHTS_FILE)
        problems = check_weights(spec, weights)
        if problems:
            raise RepositoryError(f"{path / WEIGHTS_FILE} does not match {SPEC_FILE}:\n  "
                                  + "\n  ".join(problems))
        return LoadedModel(spec, weights, name, version, path)

    def _model_dir(self, name: str) -> Path:
        if not name or "/" in name or name.startswith("."):
            raise ModelNotFoundError(f"model name {name!r} is not valid")
        return self.root / name


def save_model(root: str | os.PathLike, spec: ModelSpec, weights: dict[str, torch.Tensor],
               version: int | None = None) -> Path:
    """Write ``spec`` and ``weights`` as a new version (next free one by default).

    The version folder appears atomically (written to a temporary folder, then renamed),
    so a server reading the repository never sees half a model.
    """
    problems = check_weights(spec, weights)
    if problems:
        raise ValueError("weights do not match the spec:\n  " + "\n  ".join(problems))
    model_dir = Path(root) / spec.name
    model_dir.mkdir(parents=True, exist_ok=True)
    existing = ModelRepository(root).versions(spec.name)
    if version is None:
        version = existing[-1] + 1 if existing else 1
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"version is {version!r}; expected a positive integer")
    target = model_dir / str(version)
    if target.exists():
        raise FileExistsError(f"{target} already exists; pick another version")
    staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=model_dir))
    (staging / SPEC_FILE).write_text(spec.to_json())
    save_file({k: v.contiguous() for k, v in weights.items()}, str(staging / WEIGHTS_FILE))
    staging.rename(target)
    return target


def _read_spec(path: Path) -> ModelSpec:
    try:
        text = path.read_text()
    except OSError as exc:
        raise RepositoryError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return ModelSpec.from_json(text)
    except ValueError as exc:
        raise RepositoryError(f"{path}: {exc}") from None


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise RepositoryError(f"{path} is missing; every version folder needs {WEIGHTS_FILE}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise RepositoryError(f"{path} is not a readable safetensors file: {exc}") from None
