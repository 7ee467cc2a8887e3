"""Autotuning results kept across processes, so a restarted server skips re-tuning.

Loading a model tunes every kernel for every batch bucket: a minute or two on a cold card,
on every start of every replica. With ``RECSERVE_TUNING_CACHE`` naming a JSON file
(``recserve serve`` sets it to its cache folder unless told otherwise), each config a
``SafeTuner`` picks is written there, and a later process on the same kind of card, with
the same Triton and torch and the same kernel sources, starts from it: the config is
launched untimed, as if just tuned. Anything else in the file (another card, an edited
kernel) is ignored and replaced. Triton's own cache (``TRITON_CACHE_DIR``) keeps the
compiled kernels; with both, a restart should neither tune nor compile (not yet timed on
a card).

The file is rewritten whole through a temporary file and a rename, so a reader never sees
half of it; two processes tuning at once may lose each other's entries, never corrupt them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

ENV = "RECSERVE_TUNING_CACHE"
log = logging.getLogger("recserve.kernels")


def fingerprint() -> dict:
    """What a tuned config depends on besides its key: the card, the compiler, the kernels."""
    import torch
    import triton

    kernels = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for source in sorted(kernels.glob("*.py")):
        digest.update(source.name.encode() + b"\0" + source.read_bytes())
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return {"device": device, "triton": triton.__version__, "torch": torch.__version__,
            "kernels": digest.hexdigest()[:16]}


class TuningCache:
    """Configs by (tuner name, key) in ``path``, valid for ``print_`` (see ``fingerprint``)."""

    def __init__(self, path: Path, print_: dict) -> None:
        self.path = Path(path)
        self.fingerprint = print_
        self.entries: dict[str, dict] = {}
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("tuning cache %s is unreadable (%s): starting afresh", self.path, exc)
            return
        if isinstance(data, dict) and data.get("fingerprint") == print_ \
                and isinstance(data.get("entries"), dict):
            self.entries = data["entries"]
        else:
            log.info("tuning cache %s was made for %s: starting afresh", self.path,
                     data.get("fingerprint") if isinstance(data, dict) else "something else")

    @staticmethod
    def entry(name: str, key: tuple) -> str:
        return f"{name}|{key!r}"

    def get(self, name: str, key: tuple) -> dict | None:
        config = self.entries.get(self.entry(name, key))
        return dict(config) if isinstance(config, dict) else None

    def put(self, name: str, key: tuple, config: dict) -> None:
        """Remember ``config`` and rewrite the file (failures are logged, not raised: a
        read-only cache folder costs the next start its tuning, nothing else)."""
        self.entries[self.entry(name, key)] = dict(config)
        text = json.dumps({"fingerprint": self.fingerprint, "entries": self.entries},
                          indent=1, sort_keys=True)
        temporary = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=self.path.parent, delete=False,
                                             prefix=self.path.name, suffix=".tmp") as out:
                temporary = out.name
                out.write(text)
            os.replace(temporary, self.path)
        except OSError as exc:
            log.warning("could not write the tuning cache %s: %s", self.path, exc)
            if temporary is not None:
                Path(temporary).unlink(missing_ok=True)


_opened: dict[str, TuningCache] = {}


def shared_cache() -> TuningCache | None:
    """The process's cache for ``$RECSERVE_TUNING_CACHE`` (None when unset or empty)."""
    path = os.environ.get(ENV, "")
    if not path:
        return None
    if path not in _opened:
        _opened[path] = TuningCache(Path(path), fingerprint())
    return _opened[path]
