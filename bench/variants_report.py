"""The table ``bench/kernel_variants.py`` prints from its records: one line a measurement,
and under each the tuners' picks (the winner and the best of another kind, so a short card
call shows at a glance whether a persistent, split-K, staggered, sliced or reordered candidate won).
"""

from __future__ import annotations


def summary(records: list[dict]) -> str:
    lines = [f"{'what':44} {'B':>6} {'us':>9}  notes"]
    for r in records:
        sec = r.get("section")
        if sec == "gather":
            what = f"gather {r['tables']} {r['variant']}"
            note = f"{r['GBps']} GB/s ok={r['ok']} (in a graph: {r.get('graph_us')} us)"
        elif sec == "forward":
            what = f"forward {r['workload']} {r['variant']}" + (" graph" if r["graph"] else "")
            note = f"{r['TFLOPs']} TFLOP/s diff={r['max_diff_vs_eager']} ok={r['ok']}"
            chain = chain_floor(r)
            if chain is not None:
                note += (f"; {chain['ours']} kernels of ours, the shortest {chain['shortest_us']}"
                         f" us: {chain['floor_us']} us if each took that long")
        elif sec == "row_size":
            lines.append(f"{'row_size ' + r['dtype'] + ' dim ' + str(r['dim']):44} "
                         f"{r['B']:>6} {r['us']:>9.1f}  {r['M_rows_per_s']} M rows/s; a row: "
                         f"{r['bytes_read']} B, {r['sectors']} sectors, {r['bursts']} "
                         f"bursts, {r['lines']} lines")
            continue
        elif sec == "rows_floor":
            lines.append(f"{'gather vs the same rows read plainly':44} {r['B']:>6} "
                         f"{r['gather_us'] or 0:>9.1f}  floor {r['us']} us "
                         f"({r.get('M_rows_per_s')} M rows/s, ROWS, warps {r.get('shape')}): "
                         f"gather {r['gather_over_floor']}x the floor")
            continue
        elif sec == "forward_floors":
            lines.append(f"{'forward ' + r['workload'] + ': sum of kernel floors':44} "
                         f"{r['B']:>6} {r['sum_floor_us']:>9.1f}  {r['launches']} launches, "
                         f"the gather not counted (see the gather's floor)")
            continue
        elif sec == "cross_parts":
            lines.append(f"{'DCNv2 V: cross / plain / epilogue apart':44} {r['B']:>6} "
                         f"{r['cross_us']:>9.1f}  plain {r['plain_us']}, apart "
                         f"{r['epilogue_apart_us']}, U {r['u_us']}; floors: arithmetic "
                         f"{r['arithmetic_floor_us']}, epilogue bytes "
                         f"{r['epilogue_bytes_floor_us']}; one after the other "
                         f"{r['one_after_the_other_us']}, overlapped {r['overlapped_us']}")
            if r.get("served_tile"):
                lines.append(f"{'':44} {'':>6} {'':>9}  served tile {r['served_tile']}: "
                             f"{r['l2_operand_MB']} MB of operands through L2, "
                             f"{r['l2_operand_floor_us']} us at the L2 copy rate "
                             f"({r['l2_copy_GBps']} GB/s)")
            lines += [f"    {pick}" for pick in tuner_picks(r)]  # (U, V plain, V cross)
            continue
        elif sec == "int8_speedup":
            tuned = "" if r.get("tuned_by", "eager") == "eager" else f", {r['tuned_by']}-tuned"
            lines.append(f"{'int8 / bf16 lookup rate' + tuned:44} {r['B']:>6} {'':>9}  "
                         f"{r['lookup_rate_ratio']}x (target 1.6x)")
            continue
        else:
            continue
        lines.append(f"{what:44} {r['B']:>6} {r['us']:>9.1f}  {note}")
        lines += [f"    {pick}" for pick in tuner_picks(r)]
    return "\n".join(lines)


def chain_floor(record: dict) -> dict | None:
    """What a forward's chain of launches costs by itself: if each of recserve's kernels in
    one call (``kernels.one_call``, in a graph) took as long as the shortest of them, plus the
    other kernels' own times. At B=512 the shortest is a near-empty layer (the first bottom
    layer, K = 13), so this is about what a one-kernel-a-layer forward costs if every layer
    ran that fast: a count, not a hard floor (an empty kernel takes less). None without a
    per-kernel profile."""
    calls = (record.get("kernels") or {}).get("one_call") or []
    ours = [c["us"] for c in calls if c["kernel"].startswith("_")]  # Triton kernels: _name
    if not ours:
        return None
    others = sum(c["us"] for c in calls if not c["kernel"].startswith("_"))
    shortest = min(ours)
    return {"ours": len(ours), "shortest_us": shortest,
            "floor_us": round(len(ours) * shortest + others, 1)}


# The candidate kinds whose wins a short card call should see at a glance.
_KINDS = {"PER_SM": "persistent", "SPLIT_K": "split-K", "EPILOGUE_FIRST": "epilogue first",
          "L2_KEEP": "L2 keep", "BATCHED": "batched", "SMALL_LAST": "small tables last",
          "STAGGER": "staggered", "SUBTILE": "sliced epilogue", "maxnreg": "registers <=",
          "GRAM_ROWS": "Grams of rows together:", "PROGRAM_ROWS": "rows a program",
          "LONG_ONLY": "(long bags)", "CUBLAS": "cuBLAS", "GROUP_M": "M tiles a group"}


_COUNTED = ("SPLIT_K", "PER_SM", "SUBTILE", "maxnreg", "GRAM_ROWS", "PROGRAM_ROWS",
            "GROUP_M")
"""Kinds labelled with their count (K slices, programs an SM, epilogue slices, the
register cap, rows a Gram product, a gather program's rows, M tiles a program group)."""
_ONE_IS_PLAIN = ("SPLIT_K", "SUBTILE", "GRAM_ROWS", "GROUP_M")
"""Kinds whose count 1 (or 0) is the plain kernel (one K slice, the whole epilogue at once,
one row's Gram a product, launch order; one persistent program an SM is still
persistent)."""


def _is(config: dict, key: str) -> bool:
    value = config.get(key)
    if key in _ONE_IS_PLAIN:
        return (value or 1) > 1
    return value is not None and value is not False


def _kinds(config: dict) -> list[str]:
    """The ``_KINDS`` keys a config has (empty: a plain tiled one)."""
    return [key for key in _KINDS if _is(config, key)]


def config_label(config: dict) -> str:
    """A tuning config in a few words: its tile (or bags / rows), warps and kind."""
    if config.get("CUBLAS"):  # (torch's addmm: no tile of ours)
        return "cuBLAS"
    if "BLOCK_M" in config:
        shape = f"{config['BLOCK_M']}x{config['BLOCK_N']}x{config['BLOCK_K']}"
        if "num_stages" in config:  # (the deep-pipeline candidates differ by it alone)
            shape += f" s{config['num_stages']}"
    elif "BAGS" in config:
        shape = f"bags {config['BAGS']} lanes {config['LANES']} unroll {config['UNROLL']}"
    else:
        shape = f"rows {config.get('ROWS')}"
    kinds = [f"{_KINDS[key]} {config[key]}" if key in _COUNTED else _KINDS[key]
             for key in _kinds(config)]
    return " ".join([shape, f"w{config.get('num_warps')}"] + kinds)


def tuner_picks(record: dict) -> list[str]:
    """For each kernel shape a record's run tuned: the winner and the runner-up of another
    kind (tiled vs persistent, split-K, hinted), with their tuning times."""
    out = []
    for entry in (record.get("linear_configs") or []) + (record.get("interaction_configs") or []) \
            + (record.get("gather_dot_configs") or []) + (record.get("configs") or []):
        timings = entry.get("timings_ms") or []
        if len(timings) < 2:
            continue
        spilled = entry.get("spilled") or []

        def label(c: dict, spilled=spilled) -> str:  # (the tuner picks these last)
            return config_label(c) + (" (spills)" if c in spilled else "")

        (best_ms, best), rest = timings[0], timings[1:]
        other = next(((ms, c) for ms, c in rest if _kinds(c) != _kinds(best)), rest[0])
        out.append(f"{entry['key'][:60]}: {label(best)} {best_ms:.4f} ms; "
                   f"next of another kind {label(other[1])} {other[0]:.4f} ms")
        if any(c.get("EPILOGUE_FIRST") for _, c in timings):  # (only cross layers get those)
            out.append(f"    by tile: {by_tile(timings)}")
    return out


def by_tile(timings: list) -> str:
    """The fastest time of each tile shape among a layer's candidates, fastest first: for
    DCNv2's V, whether larger tiles (fewer operand bytes through L2) win once they no
    longer spill (bench/notes-kernels.md, fifteenth session)."""
    best: dict[str, tuple[float, dict]] = {}
    for ms, c in timings:  # (fastest first)
        best.setdefault(f"{c['BLOCK_M']}x{c['BLOCK_N']}", (ms, c))
    return ", ".join(f"{tile} {ms:.4f} ({config_label(c).split(' ', 1)[1]})"
                     for tile, (ms, c) in best.items())
