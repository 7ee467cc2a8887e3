"""Compile every kernel config for a GPU target without a GPU (Triton's ahead-of-time path).

The interpreter is not the compiler: a kernel can pass every CPU test and still fail in an
MLIR pass or in ptxas for some block sizes. This compiles each autotune config of each
kernel, for the dtype and epilogue variants the model uses, down to a cubin, with the
argument specialization the card's JIT applies (aligned pointers, unit strides as
constants, 16-divisible sizes), and checks its shared memory against the target's:

    TRITON_INTERPRET=0 python -m recserve.kernels.compile_check [--arch 90] [--quick] [--spills]

It needs no CUDA device (Triton ships ptxas), but it uses this host's Triton version, which
may differ from the card's; the GPU run (autotuning prunes configs that fail) is the proof.
To compile with the card's own version (Triton 3.6.0 on the lent H100s and H200s), give it
a virtual environment of its own: ``pip install triton==3.6.0 torch==2.13.0 numpy`` and
``pip install --no-deps -e .``, then run this module with that Python. The nineteenth
session did (``--quick``: 151 configs, none failed, as on the card); the twentieth, with
the multi-tile gathers, 168, none failed.
Exit status 1 when any config fails; each result is printed on one line.
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import os
import re
import struct
import sys
import time
from concurrent.futures import ThreadPoolExecutor

_PTR = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16", "u8": "*u8"}


def card_attrs(fn, constexprs: dict, div16: tuple[str, ...] = ()) -> dict:
    """Divisibility attributes as the card's JIT sets them: every pointer (allocations are
    16-byte aligned) and the integer arguments in ``div16`` (sizes and strides that are
    multiples of 16 in the served shapes). Integers equal to 1 (unit strides) are
    specialized to constants on the card: pass them in ``constexprs``."""
    return {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
            if n not in constexprs and (n.endswith("_ptr") or n in div16)}


def compile_kernel(fn, signature: dict, constexprs: dict, options: dict, arch: int = 90,
                   div16: tuple[str, ...] = ()):
    """Compile ``fn`` for ``sm_<arch>`` with the card's argument specialization; returns
    the compiled kernel (``.asm`` holds ttgir, ptx, sass-ready cubin)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    # meta-parameters a job leaves out take their defaults, as at a launch (read from the
    # Python function: the same whatever Triton's version)
    defaults = {n: p.default for n, p in inspect.signature(fn.fn).parameters.items()
                if p.default is not inspect.Parameter.empty}
    constexprs = {**defaults, **constexprs}
    sig = {n: ("constexpr" if n in constexprs else signature[n]) for n in fn.arg_names}
    attrs = card_attrs(fn, constexprs, div16)
    return triton.compile(ASTSource(fn, sig, constexprs, attrs),
                          target=GPUTarget("cuda", arch, 32), options=options)


# Shared memory per block (bytes) by compute capability: a config over it compiles but
# cannot launch, so it counts as a failure here.
_SMEM = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448}


def register_count(cubin: bytes) -> int | None:
    """Registers per thread that ptxas gave the kernel: the EIATTR_REGCOUNT (0x2f) entry of
    the cubin's ``.nv.info`` section, so occupancy can be judged without a GPU."""
    shoff = struct.unpack_from("<Q", cubin, 0x28)[0]
    entsize, count, names = struct.unpack_from("<HHH", cubin, 0x3A)
    sections = [struct.unpack_from("<I4xQ8xQQ", cubin, shoff + i * entsize)
                for i in range(count)]  # (name offset, flags, offset, size)
    strtab = sections[names][2]
    for name, _, offset, size in sections:
        if not cubin[strtab + name:].startswith(b".nv.info"):
            continue
        p = offset
        while p < offset + size:  # entries: format byte, attribute byte, then a value
            fmt, attr = cubin[p], cubin[p + 1]
            if fmt == 0x04:  # sized value: u16 length, then (symbol u32, value u32) here
                if attr == 0x2F:
                    return struct.unpack_from("<I", cubin, p + 8)[0]
                p += 4 + struct.unpack_from("<H", cubin, p + 2)[0]
            else:
                p += 2 if fmt == 0x01 else 4
    return None


def local_spills(cubin: bytes) -> int | None:
    """Local-memory stores in the kernel's SASS (``STL``: registers spilled, or arrays too
    big for them), by the ``nvdisasm`` Triton ships; None without it. A config at the
    register limit that spills loses to one that does not (V's 128x256 tiles: ~200 a
    tile, bench/notes-kernels.md)."""
    import subprocess
    import tempfile
    from pathlib import Path

    import triton

    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    if not nvdisasm.exists():
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([str(nvdisasm), f.name], capture_output=True, text=True)
    if sass.returncode != 0:
        return None
    return len(re.findall(r"\bSTL(?:\.\w+)?\s", sass.stdout))


def _compile(fn, signature: dict, constexprs: dict, options: dict, arch: int,
             div16: tuple[str, ...] = (), spills: bool = False) -> tuple[str | None, str]:
    """(error or None, what the compile produced: registers and programs per SM, and with
    ``spills`` its local stores)."""
    try:
        kernel = compile_kernel(fn, signature, constexprs, options, arch, div16)
    except Exception as exc:  # noqa: BLE001 - report every failure, keep going
        return f"{type(exc).__name__}: {str(exc)[-600:]}", ""
    shared = kernel.metadata.shared
    if shared > _SMEM.get(arch, 101376):
        return (f"needs {shared} bytes of shared memory; sm_{arch} has "
                f"{_SMEM.get(arch, 101376)}"), ""
    regs = register_count(kernel.asm["cubin"])
    threads = 32 * options["num_warps"]
    resident = min(65536 // (regs * threads) if regs else 32, 2048 // threads, 32,
                   _SMEM.get(arch, 101376) // shared if shared else 32)
    stores = local_spills(kernel.asm["cubin"]) if spills else None
    spilled = "" if not stores else f", {stores} local stores (spilled registers)"
    return None, f"{regs} regs, {shared} B shared, {resident} programs/SM{spilled}"


def _embedding_jobs(quick: bool):
    from . import embedding_bag as eb

    dtypes = ["bf16", "u8"] if quick else ["fp32", "fp16", "bf16", "u8"]
    for table in dtypes:
        for out in (["bf16"] if quick else ["bf16", "fp32"]):
            sig = {n: "*i32" for n in eb._embedding_bag_kernel.arg_names if n.endswith("_ptr")}
            sig.update(table_ptr=_PTR[table], weights_ptr="*fp32",
                       out_ptr=_PTR[out], meta_ptr="*i64", out_stride="i32")
            seen = set()  # (configs differing only in PROGRAM_ROWS, host-side: one compile)
            for cfg in eb.CONFIGS + eb.TRIAL_CONFIGS + [None]:
                if cfg is not None and "PROGRAM_ROWS" in cfg:
                    kernel = tuple(sorted((k, v) for k, v in cfg.items() if k != "PROGRAM_ROWS"))
                    if kernel in seen:
                        continue
                    seen.add(kernel)
                # (ALIGN, PREFETCH): the launcher's candidates for dim-128 tables, for odd
                # dims (no alignment hint), and (None) the proven fallback of the first run
                # (and the L2 hint of kept tables, on the unpipelined configs)
                variants = [(16, True, False)] if quick else [(16, True, False), (1, True, False)]
                if cfg is not None and cfg["STAGES"] == 1:
                    variants.append((16, True, True))
                if cfg is None:
                    cfg, variants = eb.CONFIGS[0], [(1, False, False)]
                for align, prefetch, keep in variants:
                    const = {"BAGS": cfg["BAGS"], "LANES": cfg["LANES"], "BLOCK_D": 128,
                             "QUANT": table == "u8", "WEIGHTED": table != "fp32",
                             "ALIGN": align, "PREFETCH": prefetch and cfg["STAGES"] == 1,
                             "UNROLL": cfg["UNROLL"], "STAGES": cfg["STAGES"], "L2_KEEP": keep,
                             "MULTI_TILE": eb.multi_tile(cfg)}
                    yield (eb._embedding_bag_kernel, sig, const,
                           {"num_warps": cfg["num_warps"]}, ("out_stride",))


def _gather_dot_jobs(quick: bool):
    """The fused gather + dot (``gather_dot``): each gather job whose config it takes (with
    ``quick``, bf16 tables without the L2 hint only), with dlrm-dot's interaction (27
    vectors, BLOCK_T 32), the aligned 4-warp ones also with their register cap, and the
    aligned ones forming GRAM_ROWS rows' Grams together."""
    from . import gather_dot as gd

    for _, sig, const, options, div16 in _embedding_jobs(quick):
        # the launcher's own rule: which gather configs it takes, which it also caps
        if const.pop("MULTI_TILE"):  # (the fused launch takes one tile a program)
            continue
        config = {"BAGS": const["BAGS"], "ALIGN": const["ALIGN"], **options}
        variants = gd.ThenDot.candidates([config])
        if not variants or (quick and (sig["table_ptr"] != "*bf16" or const["L2_KEEP"])):
            continue
        out = sig["out_ptr"]
        sig = {**sig, "z_ptr": out, "dest_ptr": "*i32", "counts_ptr": "*i32",
               **{n: "i32" for n in ("B", "F", "T", "D", "x_dest", "stride_z")}}
        const = {**const, "FEATURE_SLOTS": gd.FEATURE_SLOTS, "BLOCK_T": 32, "HAS_X": True,
                 "IEEE": out == "*fp32"}
        for variant in variants:
            cap = {"maxnreg": variant["maxnreg"]} if "maxnreg" in variant else {}
            yield (gd._gather_dot_kernel, sig, {**const, "GRAM_ROWS": variant.get("GRAM_ROWS", 1)},
                   {**options, **cap}, div16 + ("D", "stride_z"))


def _linear_jobs(quick: bool):
    from . import linear as li
    from . import linear_configs as lc

    variants = [_PLAIN,
                dict(ACT=0, HAS_BIAS=True, A_ROWS=True, ADD_ROWS=True, CROSS=True, FINAL=False),
                dict(ACT=1, HAS_BIAS=True, A_ROWS=False, ADD_ROWS=True, CROSS=False,
                     FINAL=True)]
    for dtype in (["bf16"] if quick else ["bf16", "fp16", "fp32"]):
        for flags in variants:
            # the launcher's candidates for this dtype (FINAL: the 256-wide last layer)
            # (a cross layer's opt-in candidates too, so a benchmark can turn them on, and
            # its persistent ones)
            extra = [c for c in lc.CROSS_CANDIDATES + lc.PERSISTENT_CROSS_CONFIGS
                     + lc.SUBTILE_CROSS_CONFIGS
                     if lc.fits(c, 4 if dtype == "fp32" else 2)] if flags["CROSS"] else []
            if not (flags["CROSS"] or flags["FINAL"]):  # (a long-K layer's deep pipelines)
                extra = [c for c in lc.DEEP_PIPELINE_CONFIGS
                         if lc.fits(c, 4 if dtype == "fp32" else 2)]
            for c in lc.base_configs(256 if flags["FINAL"] else None, None,
                                 4 if dtype == "fp32" else 2) + extra:
                sig = _linear_signature(dtype, flags["FINAL"])
                # as the card specializes dlrmv2's layers: unit strides are constants, the
                # other sizes and strides multiples of 16; K = 13 (the first bottom layer)
                # is the odd one, compiled with EVEN_K off.
                orders = (False, True) if flags["CROSS"] and "PER_SM" not in c \
                    and "SUBTILE" not in c else (False,)
                # split-K: the small-batch tiles of a plain layer (what linear() adds)
                plain = not (flags["CROSS"] or flags["FINAL"] or flags["ADD_ROWS"])
                deep = c in lc.DEEP_PIPELINE_CONFIGS  # (tuned unsplit only)
                splits = (1, 4) if plain and c["BLOCK_M"] <= 64 and not deep else (1,)
                if plain:  # and the large split-K tiles where this is their tile
                    splits += tuple(t["SPLIT_K"] for t in lc.SPLIT_K_TILES
                                    if t == {**c, "SPLIT_K": t["SPLIT_K"]})
                for even_k, first, split in itertools.product(
                        (True,) if quick else (True, False), orders, splits):
                    const = _linear_constants(c, flags, dtype == "fp32", even_k, first, split)
                    div16 = ("N", "stride_am", "stride_wn", "stride_om", "stride_addm",
                             "stride_x0m", "stride_xm") + (("K",) if even_k else ())
                    yield li._linear_kernel, sig, const, {"num_warps": c["num_warps"],
                                                          "num_stages": c["num_stages"]}, div16


_PLAIN = dict(ACT=1, HAS_BIAS=True, A_ROWS=False, ADD_ROWS=False, CROSS=False, FINAL=False)
"""``linear``'s flags for a plain layer: bias and ReLU."""


def _linear_constants(config: dict, flags: dict, ieee: bool, even_k: bool,
                      first: bool = False, split: int = 1) -> dict:
    """``linear``'s constexprs for one candidate ``config`` with the epilogue ``flags``, as
    the launcher passes them (unit strides constant)."""
    group = {"GROUP_M": config["GROUP_M"]} if "GROUP_M" in config else {}
    return {"BLOCK_M": config["BLOCK_M"], "BLOCK_N": config["BLOCK_N"],
            "BLOCK_K": config["BLOCK_K"], "IEEE": ieee, "stride_ak": 1, "stride_wk": 1,
            "stride_on": 1, "EVEN_K": even_k, "EPILOGUE_FIRST": first, "SPLIT_K": split,
            "PERSISTENT": "PER_SM" in config, "FLATTEN": config.get("FLATTEN", True),
            "STAGGER": config.get("STAGGER", False), "SUBTILE": config.get("SUBTILE", 1),
            **group, **flags}


def _linear_signature(dtype: str, final: bool, a_dtype: str | None = None) -> dict:
    """``linear``'s pointer and size types: operands in ``dtype`` (A in ``a_dtype``)."""
    from . import linear as li

    sig = {n: _PTR[dtype] for n in li._linear_kernel.arg_names if n.endswith("_ptr")}
    sig.update(a_ptr=_PTR[a_dtype or dtype], a_rows_ptr="*i32", add_rows_ptr="*i32",
               fact_ptr="*i32", bf_ptr="*fp32", part_ptr="*fp32", stagger_ptr="*i32",
               out_ptr="*fp32" if final else _PTR[dtype])
    sig.update({n: "i32" for n in li._linear_kernel.arg_names
                if n in ("M", "N", "K", "H") or n.startswith("stride")})
    return sig


def _fp32_input_jobs(quick: bool):
    """The first bottom layer as the engine runs it: fp32 dense inputs with bf16 weights,
    each rounded as it loads (``linear``'s A with every config it offers an fp32 A, K = 13
    so EVEN_K off; ``mlp``'s x with every config)."""
    from . import linear as li
    from . import linear_configs as lc

    for c in lc.base_configs(None, None, 4):
        const = _linear_constants(c, _PLAIN, False, False)
        yield (li._linear_kernel, _linear_signature("bf16", False, "fp32"), const,
               {"num_warps": c["num_warps"], "num_stages": c["num_stages"]},
               ("N", "stride_wn", "stride_om"))
    for fn, sig, const, options, div16 in _mlp_jobs(True):
        yield fn, {**sig, "x_ptr": "*fp32"}, const, options, div16


def _grouped_jobs(quick: bool):
    """The plain large-batch layers' configs with their programs in groups of M tiles
    (``linear_configs.GROUP_M``; bias and ReLU, K a multiple of the tile's)."""
    from . import linear as li
    from . import linear_configs as lc

    for c in lc.base_configs(None, 8192, 2):
        const = _linear_constants({**c, "GROUP_M": lc.GROUP_M}, _PLAIN, False, True)
        yield (li._linear_kernel, _linear_signature("bf16", False), const,
               {"num_warps": c["num_warps"], "num_stages": c["num_stages"]},
               ("N", "K", "stride_am", "stride_wn", "stride_om"))


def _split_k_jobs(quick: bool):
    from . import linear as li

    for dtype, split in itertools.product(["bf16"] if quick else ["bf16", "fp16", "fp32"],
                                          (4, 8)):
        sig = {"part_ptr": "*fp32", "bias_ptr": _PTR[dtype], "out_ptr": _PTR[dtype],
               "M": "i32", "N": "i32", "stride_om": "i32"}
        const = {"stride_on": 1, "SPLIT_K": split, "BLOCK_M": 32, "BLOCK_N": 128, "ACT": 1,
                 "HAS_BIAS": True}
        yield li._split_k_reduce, sig, const, {"num_warps": 4}, ("N", "stride_om")


def _dot_jobs(quick: bool):
    from . import interaction as it

    for dtype in (["bf16"] if quick else ["bf16", "fp32"]):
        for (block_t, block_d), cfg in itertools.product(((32, 128), (16, 16)), it.CONFIGS):
            if not it.fits(cfg, block_t, block_d, 4 if dtype == "fp32" else 2):
                continue  # (the launcher never offers it)
            sig = {"v_ptr": _PTR[dtype], "out_ptr": _PTR[dtype], "dest_ptr": "*i32"}
            sig.update({n: "i32" for n in ("B", "T", "D", "x_dest", "stride_vm", "stride_om")})
            const = {"ROWS": cfg["ROWS"], "BLOCK_T": block_t, "BLOCK_D": block_d,
                     "HAS_X": True, "IEEE": dtype == "fp32", "BATCHED": cfg["BATCHED"]}
            div16 = ("D", "stride_vm", "stride_om") if block_d == 128 else ()
            yield it._dot_interaction_kernel, sig, const, {"num_warps": cfg["num_warps"]}, div16


def _mlp_jobs(quick: bool):
    """The bottom MLP in one launch (``mlp``) at dlrmv2's widths, 13 -> 512 -> 256 -> 128,
    writing into E's x slice (row stride a multiple of 16), every config."""
    from . import mlp

    for dtype in (["bf16"] if quick else ["bf16", "fp32"]):
        sig = {n: _PTR[dtype] for n in mlp._mlp_kernel.arg_names if n.endswith("_ptr")}
        sig.update({n: "i32" for n in ("M", "K0", "N1", "N2", "N3", "stride_xm",
                                        "stride_om", "stride_w1k", "stride_w2k",
                                        "stride_w3k")})
        for cfg in mlp.CONFIGS:
            const = {"stride_xk": 1, "stride_on": 1, "stride_w1n": 1, "stride_w2n": 1,
                     "stride_w3n": 1, "BLOCK_M": cfg["BLOCK_M"], "K0P": 16,
                     "CHUNK": cfg["CHUNK"], "N2P": 256, "N_CHUNK": cfg["N_CHUNK"],
                     "THREE": True, "IEEE": dtype == "fp32"}
            yield (mlp._mlp_kernel, sig, const, {"num_warps": cfg["num_warps"]},
                   ("N1", "N2", "N3", "stride_om", "stride_w1k", "stride_w2k", "stride_w3k"))


def _pdl_jobs(quick: bool):
    """The first job of each kernel family again with programmatic dependent launch
    (``_common.pdl``): its ``griddepcontrol`` wait and trigger, and the launch option."""
    for jobs in (_embedding_jobs, _gather_dot_jobs, _linear_jobs, _split_k_jobs, _dot_jobs):
        fn, sig, const, options, div16 = next(iter(jobs(quick)))
        yield fn, sig, {**const, "USE_GDC": True}, {**options, "launch_pdl": True}, div16


def main(argv: list[str] | None = None) -> int:
    """Compile every job; print one line each; return the number of failures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100/H200)")
    ap.add_argument("--quick", action="store_true", help="bf16 variants only")
    ap.add_argument("--spills", action="store_true",
                    help="also count each kernel's local stores in its SASS (registers "
                    "spilled; nvdisasm, about 0.4 s a kernel)")
    ap.add_argument("--threads", type=int, default=None,
                    help="kernels compiled at once (default: the usable cores; Triton's "
                    "compile leaves the GIL: with Triton 3.6, --quick's 186 kernels took "
                    "116.6 s one by one and 64.1 s on 4 threads of a 2-core host, the "
                    "same cubins)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("set TRITON_INTERPRET=0: the interpreter does not compile", file=sys.stderr)
        return 1
    from .precompile import usable_cores  # (after the check: it imports the kernels)

    threads = args.threads if args.threads is not None else usable_cores()
    jobs = [job for make in (_embedding_jobs, _gather_dot_jobs, _linear_jobs, _split_k_jobs,
                             _dot_jobs, _mlp_jobs, _fp32_input_jobs, _grouped_jobs, _pdl_jobs)
            for job in make(args.quick)]

    def timed(job: tuple) -> tuple[str | None, str, float]:
        fn, sig, const, options, div16 = job
        t0 = time.time()
        return (*_compile(fn, sig, const, options, args.arch, div16, args.spills),
                time.time() - t0)

    failures = 0
    with ThreadPoolExecutor(max(1, threads)) as pool:  # (results in the jobs' order)
        for (fn, _, const, options, _), (error, produced, seconds) in zip(
                jobs, pool.map(timed, jobs), strict=True):
            failures += error is not None
            status = "OK  " if error is None else "FAIL"
            print(f"{status} {fn.__name__} {const} {options} {seconds:.1f}s"
                  + (f"\n     {error}" if error else f": {produced}"), flush=True)
    print(f"{failures} failure(s)")
    return failures


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "0")
    sys.exit(1 if main() else 0)
