"""recserve's msgpack-over-TCP server and its Python clients.

Layers (DESIGN.md): ``codec`` (frames, msgpack, typed arrays; no I/O), ``protocol``
(asyncio adapter, backpressure), ``dispatch`` (ops, ids to futures, typed errors),
``validate`` (wire inputs against a model spec), ``backend`` (what scores), ``app``
(the TCP server). PROTOCOL.md is the wire contract.
"""

from .aclient import AsyncClient
from .client import Client
from .errors import (
    BadRequest,
    DeadlineExceeded,
    ErrorCode,
    InternalError,
    NotFound,
    Overloaded,
    RecserveError,
    TooLarge,
    Unauthorized,
)

__all__ = [
    "AsyncClient",
    "BadRequest",
    "Client",
    "DeadlineExceeded",
    "ErrorCode",
    "InternalError",
    "NotFound",
    "Overloaded",
    "RecserveError",
    "TooLarge",
    "Unauthorized",
]
