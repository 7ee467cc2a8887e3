"""The issue path's CUDA calls (``cuda_driver``) on CPU: the driver wrapper against a fake
libcuda made of ctypes callbacks with the real prototypes, ``DriverCalls`` against a
recording driver, and ``issue_streams``' calls in stream order through recording calls that
also do the host copies (so the batch they issue scores as the reference). On a GPU,
tests/test_gpu_engine.py runs the engine with ``keep_gil`` against the reference."""

from __future__ import annotations

import ctypes
import logging
import time

import numpy as np
import pytest
import torch

from recserve.engine import cuda_driver
from recserve.engine.cuda_driver import (
    _SIGNATURES,
    TORCH_CALLS,
    CudaDriver,
    CudaDriverError,
    DriverCalls,
    TorchCalls,
    issue_calls,
)

_ERROR_NAME = b"CUDA_ERROR_INVALID_CONTEXT"  # (a constant: alive while the fake points at it)


class FakeLibcuda:
    """libcuda's functions the driver uses, each a ctypes callback with its real prototype
    (so the arguments go through ctypes' conversions as they would), recording its calls;
    ``fail`` names a function that returns CUresult 201."""

    def __init__(self, fail: str = "", current_context: int = 0) -> None:
        self.calls: list[tuple] = []
        self.fail, self.current = fail, current_context
        self._keep = []
        for name, argtypes in _SIGNATURES.items():
            prototype = ctypes.CFUNCTYPE(ctypes.c_int, *argtypes)
            callback = prototype(self._behaviour(name))
            self._keep.append(callback)
            setattr(self, name, callback)

    def _behaviour(self, name: str):
        def call(*args) -> int:
            if name == "cuGetErrorName":
                args[1][0] = _ERROR_NAME
                return 0
            if name == "cuCtxGetCurrent":
                args[0][0] = self.current
            elif name == "cuDeviceGet":
                args[0][0] = 7 + args[1]  # the device handle of ordinal args[1]
            elif name == "cuDevicePrimaryCtxRetain":
                args[0][0] = 0xC0 + args[1]
            elif name == "cuCtxSetCurrent":
                self.current = args[0]
            self.calls.append((name, *(a for a in args if not _is_pointer(a))))
            return 201 if name == self.fail else 0
        return call


def _is_pointer(arg) -> bool:
    return isinstance(arg, ctypes._Pointer)


def test_driver_calls_reach_libcuda_with_their_handles_and_failures_raise_by_name():
    lib = FakeLibcuda()
    driver = CudaDriver(lib)
    driver.copy_to_device(0x7F00_0000_1000, 0x5000, 4096, 0x11)
    driver.copy_to_host(0x6000, 0x7F00_0000_2000, 64, 0x12)
    driver.record(0xE1, 0x11)
    driver.wait(0x12, 0xE1)
    driver.launch(0x9A, 0x13)
    assert lib.calls == [("cuMemcpyHtoDAsync_v2", 0x7F00_0000_1000, 0x5000, 4096, 0x11),
                         ("cuMemcpyDtoHAsync_v2", 0x6000, 0x7F00_0000_2000, 64, 0x12),
                         ("cuEventRecord", 0xE1, 0x11), ("cuStreamWaitEvent", 0x12, 0xE1, 0),
                         ("cuGraphLaunch", 0x9A, 0x13)]
    failing = CudaDriver(FakeLibcuda(fail="cuGraphLaunch"))
    with pytest.raises(CudaDriverError, match=r"cuGraphLaunch failed: "
                                              r"CUDA_ERROR_INVALID_CONTEXT \(201\)"):
        failing.launch(0x9A, 0x13)


def test_binding_a_thread_sets_the_primary_context_only_where_none_is_current():
    lib = FakeLibcuda()
    driver = CudaDriver(lib)
    driver.bind_thread(1)
    assert [c[0] for c in lib.calls] == ["cuCtxGetCurrent", "cuInit", "cuDeviceGet",
                                         "cuDevicePrimaryCtxRetain", "cuCtxSetCurrent"]
    assert ("cuDevicePrimaryCtxRetain", 8) in lib.calls and lib.current == 0xC8
    lib.calls.clear()
    driver.bind_thread(1)  # current already: nothing else
    assert lib.calls == [("cuCtxGetCurrent",)]
    lib.current, lib.calls = 0, []
    driver.bind_thread(1)  # another thread, none current: the retained context, once
    assert [c[0] for c in lib.calls] == ["cuCtxGetCurrent", "cuCtxSetCurrent"]
    assert lib.current == 0xC8


class _OnDevice:
    """A CPU tensor that says it is on a CUDA device (what DriverCalls reads of one)."""

    is_cuda = True

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self.dtype, self.shape = tensor.dtype, tensor.shape

    def __getattr__(self, name):
        return getattr(self.tensor, name)


class _Handle:
    def __init__(self, value: int) -> None:
        self.cuda_stream = self.cuda_event = value


class _RecordingDriver:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __getattr__(self, name):
        return lambda *args: self.calls.append((name, *args))


def test_driver_calls_copy_bytes_record_wait_and_launch_with_torch_handles(monkeypatch):
    driver = _RecordingDriver()
    calls = DriverCalls(driver)
    host = torch.arange(10, dtype=torch.int32)
    device = _OnDevice(torch.zeros(10, dtype=torch.int32))
    stream = _Handle(0x51)
    assert calls.copy(device, host, stream) == 40
    assert calls.copy(host, device, stream) == 40
    assert calls.copy(_OnDevice(torch.zeros(0, dtype=torch.int32)), host[:0], stream) == 0
    calls.record(_Handle(0xE0), stream)
    calls.wait(stream, _Handle(0xE0))

    class Graph:
        def raw_cuda_graph_exec(self):
            return 0x6A

    calls.replay(Graph(), stream)
    assert driver.calls == [
        ("copy_to_device", device.data_ptr(), host.data_ptr(), 40, 0x51),
        ("copy_to_host", host.data_ptr(), device.data_ptr(), 40, 0x51),
        ("record", 0xE0, 0x51), ("wait", 0x51, 0xE0), ("launch", 0x6A, 0x51)]
    # what the driver cannot do as one byte copy, or torch must do first, goes to torch
    through_torch = []
    monkeypatch.setattr(TorchCalls, "copy",
                        lambda self, dst, src, stream: through_torch.append("copy") or 0)
    monkeypatch.setattr(TorchCalls, "replay",
                        lambda self, graph, stream: through_torch.append("replay"))
    driver.calls.clear()
    calls.copy(_OnDevice(torch.zeros(10, dtype=torch.bool)), host, stream)  # a dtype change
    calls.copy(_OnDevice(torch.zeros(5, dtype=torch.int32)), host[::2], stream)  # strided
    calls.copy(torch.zeros(10, dtype=torch.int32), host, stream)  # host to host
    calls.replay(object(), stream)  # a torch without raw_cuda_graph_exec

    class Unexecutable:  # one whose graph has no exec to hand out
        def raw_cuda_graph_exec(self):
            raise RuntimeError("no graph exec")

    calls.replay(Unexecutable(), stream)

    class NewEvent:  # never recorded: torch creates it at its first record
        cuda_event = 0

        def record(self, stream):
            through_torch.append("record")

    calls.record(NewEvent(), stream)
    assert through_torch == ["copy", "copy", "copy", "replay", "replay", "record"]
    assert driver.calls == []


def test_timed_calls_pass_every_call_through_and_time_each_kind():
    """``TimedCalls`` makes the same calls (results and errors pass through) and keeps each
    kind's mean wall time, failed calls included."""
    made = []

    class Slow(TorchCalls):
        name = "slow"

        def copy(self, dst, src, stream):
            made.append(("copy", stream))
            time.sleep(0.002)
            return 64

        def record(self, event, stream):
            made.append(("record", event))

        def replay(self, graph, stream):
            raise RuntimeError("replay failed")

    timed = cuda_driver.TimedCalls(Slow())
    assert timed.name == "slow" and timed.mean_us() == {}
    assert timed.copy("dst", "src", "s1") == 64 and timed.copy("dst", "src", "s2") == 64
    timed.record("e", "s1")
    with pytest.raises(RuntimeError, match="replay failed"):
        timed.replay("g", "s1")
    assert made == [("copy", "s1"), ("copy", "s2"), ("record", "e")]
    means = timed.mean_us()
    assert set(means) == {"copy", "record", "replay"}
    assert means["copy"] >= 2000 > means["record"]


def test_without_libcuda_keep_gil_falls_back_to_torch_calls_and_says_so(monkeypatch, caplog):
    def missing(library=cuda_driver.LIBRARY):
        raise OSError(f"{library}: cannot open shared object file")

    monkeypatch.setattr(cuda_driver, "load", missing)
    with caplog.at_level(logging.WARNING, logger="recserve.engine"):
        assert issue_calls(True) is TORCH_CALLS
    assert "libcuda.so.1: cannot open" in caplog.text and "through torch" in caplog.text
    assert issue_calls(False) is TORCH_CALLS
    monkeypatch.setattr(cuda_driver, "load", lambda: CudaDriver(FakeLibcuda()))
    assert isinstance(issue_calls(True), DriverCalls)


class _RecordingCalls(TorchCalls):
    """Records each call (events and streams by name) and does the host copies for real;
    a replay runs the graph's step (``_Graph``)."""

    def __init__(self, names: dict) -> None:
        self.log: list[tuple] = []
        self.names = names

    def copy(self, dst, src, stream) -> int:
        dst.copy_(src)
        self.log.append(("copy", self._which(dst), stream))
        return src.numel() * src.element_size()

    def record(self, event, stream) -> None:
        self.log.append(("record", event, stream))

    def wait(self, stream, event) -> None:
        self.log.append(("wait", stream, event))

    def replay(self, graph, stream) -> None:
        graph.run()
        self.log.append(("replay", stream))

    def _which(self, tensor) -> str:
        return next(name for name, t in self.names.items()
                    if t.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr())


class _Graph:
    """A captured graph's stand-in: replaying runs the device step into fixed outputs."""

    def __init__(self, step) -> None:
        self.step = step
        self.scores, self.bad = step()
        self.scores.fill_(float("nan"))

    def run(self) -> None:
        scores, bad = self.step()
        self.scores.copy_(scores)
        self.bad.copy_(bad)


@pytest.mark.parametrize("streams, outputs_in_graph, timed",
                         [(3, False, False), (3, False, True), (1, False, False),
                          (3, True, False), (3, True, True)])
def test_issue_streams_makes_every_call_through_its_calls_in_stream_order(
        streams, outputs_in_graph, timed):
    """What ``issue_streams`` enqueues, call by call, on the copy-in, compute and copy-out
    streams (or one), here done on the host: the batch it issues scores as the reference."""
    import functools

    from test_staging import small_spec

    from recserve.engine.demo import random_inputs
    from recserve.engine.gpu_issue import issue_streams
    from recserve.engine.gpu_slots import GpuModel, SlotState, copy_in, device_step, outputs_step
    from recserve.engine.inputs import collate
    from recserve.engine.reference import ReferenceModel
    from recserve.engine.staging import host_buffers, pack, staging_layout
    from recserve.engine.tensor_buffers import allocate, as_tensors
    from recserve.engine.weights import init_weights
    from recserve.kernels.model import TritonModel

    spec = small_spec()
    weights = init_weights(spec, seed=21)
    rng = np.random.default_rng(21)
    pieces = [random_inputs(spec, rng, n) for n in (4, 1, 3)]
    model = TritonModel(spec, weights, "cpu")
    layout = staging_layout(spec, [names for _, _, names in model.groups], 16,
                            model.layout.x_request)
    host, device = host_buffers(layout), allocate(layout, "cpu")
    slot = SlotState(host, device, torch.full((16, 1), float("nan")),
                     torch.ones(17, dtype=torch.bool), None, host_tensors=as_tensors(host),
                     events={f"{s}_{e}": f"{s}_{e}" for s in ("h2d", "compute", "d2h")
                             for e in ("start", "end")},
                     timed=timed)
    gpu = GpuModel(spec, model, layout, [slot])
    sizes = pack(layout, host, pieces, bucket=12)
    step = outputs_step if outputs_in_graph else device_step
    copy_in(slot, 12, sizes.nnz, None)  # the warm-up a capture makes, then the device poisoned
    graph = _Graph(functools.partial(step, gpu, slot, 12))
    device.block.fill_(0xF9)
    device.weights.fill_(float("nan"))
    slot.scores_out.fill_(float("nan"))
    slot.bad_out.fill_(True)
    slot.graphs[12] = (graph, graph.scores, graph.bad)
    h2d, compute, out = ("h2d", "compute", "d2h") if streams == 3 else ("one",) * 3
    calls = _RecordingCalls({"block": device.block, "weights": device.weights,
                             "scores_out": slot.scores_out, "bad_out": slot.bad_out})
    copied = issue_streams(gpu, slot, sizes, h2d, compute, out, outputs_in_graph, calls)

    views = host.bucket(12)
    assert copied == views.ids_at + views.ids.itemsize * sizes.nnz + 4 * sizes.nnz  # + weights
    want_log = [("record", "h2d_start", h2d)] if timed else []
    want_log += [("copy", "block", h2d), ("copy", "weights", h2d)]
    if streams == 3:
        want_log += [("record", "h2d_end", h2d), ("wait", compute, "h2d_end")]
    elif timed:
        want_log += [("record", "h2d_end", h2d)]
    want_log += [("record", "compute_start", compute), ("replay", compute)]
    if outputs_in_graph:
        want_log += [("record", "d2h_end", compute)]
    else:
        want_log += [("record", "compute_end", compute)]
        want_log += [("wait", out, "compute_end")] if streams == 3 else []
        want_log += [("record", "d2h_start", out)] if timed else []
        want_log += [("copy", "scores_out", out), ("copy", "bad_out", out),
                     ("record", "d2h_end", out)]
    assert calls.log == want_log
    want = ReferenceModel(spec, weights).forward(collate(spec, pieces))
    torch.testing.assert_close(slot.scores_out[:sizes.rows], want, rtol=1e-4, atol=1e-5)
    assert not bool(slot.bad_out[:sizes.requests].any())
