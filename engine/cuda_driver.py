"""The CUDA driver calls of a batch's issue, made with the GIL kept.

Torch gives the GIL up in every CUDA call it wraps (``copy_``, ``Event.record``,
``wait_event``, ``CUDAGraph.replay``). An asynchronous call takes microseconds, but a thread
that gave the GIL up waits to get it back until whichever thread took it meanwhile drops it
again, up to the switch interval when that thread runs Python: the engine's issue path makes
10 such calls a batch and took 1.0-1.3 ms on a slow H100 host against 0.44 ms on a fast one,
and ``bench/engine_host.py --issue-calls torch|driver`` shows the cost on any machine
(8192-row requests, 2 cores: 0.48-0.50 of the simulated device with torch's calls,
0.95-0.99 with these; bench/RESULTS.md, ninth session).

``ctypes.PyDLL`` calls keep the GIL, so ``DriverCalls`` issues the same work through
``libcuda`` (the driver API, present wherever the driver is) without a hand-off. Only calls
that return at once belong here: copies between pinned host memory and the device, event
records, stream waits and graph launches. Waiting (``Event.synchronize``) stays in torch,
which gives the GIL up for it, as it must.

Handles are torch's own: ``Stream.cuda_stream``, ``Event.cuda_event``,
``CUDAGraph.raw_cuda_graph_exec()`` (runtime and driver handles are the same objects).
``TorchCalls`` is the same interface through torch, the default.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time

import torch

log = logging.getLogger("recserve.engine")

LIBRARY = "libcuda.so.1"

_VOID_P, _U64, _SIZE, _UINT = ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_uint
_SIGNATURES = {  # name: argument types (every one returns a CUresult, 0 on success)
    "cuInit": (_UINT,),
    "cuDeviceGet": (ctypes.POINTER(ctypes.c_int), ctypes.c_int),
    "cuDevicePrimaryCtxRetain": (ctypes.POINTER(_VOID_P), ctypes.c_int),
    "cuCtxGetCurrent": (ctypes.POINTER(_VOID_P),),
    "cuCtxSetCurrent": (_VOID_P,),
    "cuMemcpyHtoDAsync_v2": (_U64, _VOID_P, _SIZE, _VOID_P),
    "cuMemcpyDtoHAsync_v2": (_VOID_P, _U64, _SIZE, _VOID_P),
    "cuEventRecord": (_VOID_P, _VOID_P),
    "cuStreamWaitEvent": (_VOID_P, _VOID_P, _UINT),
    "cuGraphLaunch": (_VOID_P, _VOID_P),
    "cuGetErrorName": (ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)),
}


class CudaDriverError(RuntimeError):
    """A driver call failed (its CUresult name in the message)."""


class CudaDriver:
    """The few driver functions the issue path needs, from ``lib`` (``load()``'s
    ``ctypes.PyDLL``, whose calls keep the GIL; tests pass a fake with the same names)."""

    def __init__(self, lib) -> None:
        self._fns = {}
        for name, argtypes in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, ctypes.c_int
            self._fns[name] = fn
        self._contexts: dict[int, int] = {}
        self._lock = threading.Lock()

    def _call(self, name: str, *args) -> None:
        result = self._fns[name](*args)
        if result:
            raise CudaDriverError(f"{name} failed: {self._error_name(result)} ({result})")

    def _error_name(self, result: int) -> str:
        text = ctypes.c_char_p()
        if self._fns["cuGetErrorName"](result, ctypes.byref(text)) or not text.value:
            return "unknown CUresult"
        return text.value.decode()

    def bind_thread(self, ordinal: int) -> None:
        """Make device ``ordinal``'s primary context (the one torch's runtime uses) current
        on the calling thread, unless a context already is: driver calls act on it."""
        current = _VOID_P()
        self._call("cuCtxGetCurrent", ctypes.byref(current))
        if current.value:
            return
        with self._lock:
            if ordinal not in self._contexts:
                self._call("cuInit", 0)
                device, context = ctypes.c_int(), _VOID_P()
                self._call("cuDeviceGet", ctypes.byref(device), ordinal)
                self._call("cuDevicePrimaryCtxRetain", ctypes.byref(context), device.value)
                self._contexts[ordinal] = context.value
        self._call("cuCtxSetCurrent", self._contexts[ordinal])

    def copy_to_device(self, device_address: int, host_address: int, nbytes: int,
                       stream: int) -> None:
        self._call("cuMemcpyHtoDAsync_v2", device_address, host_address, nbytes, stream)

    def copy_to_host(self, host_address: int, device_address: int, nbytes: int,
                     stream: int) -> None:
        self._call("cuMemcpyDtoHAsync_v2", host_address, device_address, nbytes, stream)

    def record(self, event: int, stream: int) -> None:
        self._call("cuEventRecord", event, stream)

    def wait(self, stream: int, event: int) -> None:
        self._call("cuStreamWaitEvent", stream, event, 0)

    def launch(self, graph_exec: int, stream: int) -> None:
        self._call("cuGraphLaunch", graph_exec, stream)


def load(library: str = LIBRARY) -> CudaDriver:
    """The driver, its calls keeping the GIL. OSError when the library cannot be loaded."""
    return CudaDriver(ctypes.PyDLL(library))


class TorchCalls:
    """A batch's stream work through torch: each call gives the GIL up."""

    name = "torch"

    def bind_thread(self, ordinal: int) -> None:
        pass

    def copy(self, dst: torch.Tensor, src: torch.Tensor, stream) -> int:
        """Enqueue ``dst.copy_(src)`` on ``stream`` (pinned host memory on one side);
        returns the bytes copied."""
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)
        return src.numel() * src.element_size()

    def record(self, event, stream) -> None:
        event.record(stream)

    def wait(self, stream, event) -> None:
        stream.wait_event(event)

    def replay(self, graph, stream) -> None:
        with torch.cuda.stream(stream):
            graph.replay()


class DriverCalls(TorchCalls):
    """The same work through ``CudaDriver``, the GIL kept. A call torch must make first
    (an event's first record creates it; a torch without ``raw_cuda_graph_exec``) goes
    through torch once, or each time."""

    name = "driver"

    def __init__(self, driver: CudaDriver) -> None:
        self.driver = driver

    def bind_thread(self, ordinal: int) -> None:
        self.driver.bind_thread(ordinal)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, stream) -> int:
        nbytes = src.numel() * src.element_size()
        if dst.dtype != src.dtype or dst.shape != src.shape or src.is_cuda == dst.is_cuda \
                or not (dst.is_contiguous() and src.is_contiguous()):
            return super().copy(dst, src, stream)  # not a plain host <-> device byte copy
        if nbytes == 0:
            return 0
        if dst.is_cuda:
            self.driver.copy_to_device(dst.data_ptr(), src.data_ptr(), nbytes, stream.cuda_stream)
        else:
            self.driver.copy_to_host(dst.data_ptr(), src.data_ptr(), nbytes, stream.cuda_stream)
        return nbytes

    def record(self, event, stream) -> None:
        handle = event.cuda_event
        if not handle:  # torch creates its events at their first record
            event.record(stream)
            return
        self.driver.record(handle, stream.cuda_stream)

    def wait(self, stream, event) -> None:
        self.driver.wait(stream.cuda_stream, event.cuda_event)

    def replay(self, graph, stream) -> None:
        try:
            graph_exec = graph.raw_cuda_graph_exec()
        except (AttributeError, RuntimeError):  # an older torch, or no exec to hand out
            super().replay(graph, stream)
            return
        self.driver.launch(graph_exec, stream.cuda_stream)


TORCH_CALLS = TorchCalls()


class TimedCalls(TorchCalls):
    """``calls`` (torch's or the driver's) with each kind's wall time summed, for the
    executor's stats: with torch's calls a call's time includes the wait to get the GIL
    back, with the driver's it is the call alone, so the two say whether a batch's issue
    is slow in its calls or in its waits (the H200's issue stage took 0.22-0.26 ms a batch
    with the driver's calls: 25 us for each of its ~10 calls if the calls were all of it,
    where an asynchronous call should take a few). Two clock reads a call; one thread
    issues at a time (the executor's launch lock), so the sums need no lock of their own."""

    def __init__(self, calls: TorchCalls) -> None:
        self.inner, self.name = calls, calls.name
        self._totals: dict[str, list[int]] = {}  # kind: [calls, nanoseconds]

    def bind_thread(self, ordinal: int) -> None:
        self.inner.bind_thread(ordinal)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, stream) -> int:
        return self._timed("copy", self.inner.copy, dst, src, stream)

    def record(self, event, stream) -> None:
        self._timed("record", self.inner.record, event, stream)

    def wait(self, stream, event) -> None:
        self._timed("wait", self.inner.wait, stream, event)

    def replay(self, graph, stream) -> None:
        self._timed("replay", self.inner.replay, graph, stream)

    def _timed(self, kind: str, call, *args):
        start = time.perf_counter_ns()
        try:
            return call(*args)
        finally:
            totals = self._totals.get(kind)
            if totals is None:
                totals = self._totals[kind] = [0, 0]
            totals[0] += 1
            totals[1] += time.perf_counter_ns() - start

    def mean_us(self) -> dict[str, float]:
        """Mean microseconds a call, per kind (copy, record, wait, replay) made so far."""
        return {kind: round(ns / count / 1e3, 2)
                for kind, (count, ns) in sorted(list(self._totals.items()))}


def issue_calls(keep_gil: bool) -> TorchCalls:
    """``DriverCalls`` when ``keep_gil`` and the driver loads, else ``TORCH_CALLS`` (with a
    warning saying why)."""
    if not keep_gil:
        return TORCH_CALLS
    try:
        return DriverCalls(load())
    except (OSError, AttributeError) as exc:
        log.warning("CUDA driver calls unavailable (%s): batches are issued through torch, "
                    "which gives the GIL up at each call", exc)
        return TORCH_CALLS
