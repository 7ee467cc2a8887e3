"""TritonModel: a whole spec'd model's forward on the recserve kernels.

Per forward (``forward_prepared``), with E the embedding buffer and Z the top MLP input:
bottom MLP (fused bias+ReLU GEMMs, or with ``set_fused_bottom`` all its layers in one
launch, see ``mlp``; once per request when every dense input is request scope) -> E's x
slice; one table-batched gather launch per table dtype -> E's slices
(request-scope bags gathered once per request); interaction (dot kernel E -> Z, or with
``set_fused_dot`` formed inside the last gather launch, see ``gather_dot``; cat: Z = E;
dcnv2: fused cross GEMMs); top MLP with the first layer split W_u·u (per request) +
W_c·c (per row) and the last narrow layer fused into the one before it.

Deterministic for a given batch (no atomic sums, fixed reductions, cached kernel configs;
the fused gather + dot counts rows with atomics, never adds values with them). On
CPU the kernels run under Triton's interpreter in fp32 (for tests). ``prepare`` uploads a
batch once (packed CSR per table dtype) so the forward alone can be timed or captured in a
CUDA graph; call the forward once per shape bucket before capturing (it autotunes).
"""

from __future__ import annotations

import torch

from recserve.engine.inputs import Batch
from recserve.engine.spec import ModelSpec
from recserve.engine.weights import check_weights

from ._common import fused_bottom, fused_dot
from .embedding_bag import BagFeature, PackedTables, embedding_bag
from .gather_dot import ThenDot, counters
from .interaction import cross_layer, dest_map, dot_interaction
from .layout import build_layout
from .linear import MAX_FINAL_H, MAX_FINAL_N, linear
from .mlp import fits, fused_mlp
from .prepare import PreparedBatch, prepare_batch


def _kn(w: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[N, K] weight as a view of a K-major copy, so the GEMM reads it coalesced."""
    return w.to(device=device, dtype=dtype).t().contiguous().t()


def table_groups(spec: ModelSpec) -> list[list[str]]:
    """The model's tables that features read, grouped by dtype: one gather launch each."""
    by_dtype: dict[str, list[str]] = {}
    for t in spec.tables:
        if any(f.table == t.name for f in spec.sparse):
            by_dtype.setdefault(t.dtype, []).append(t.name)
    return list(by_dtype.values())


def feature_groups(spec: ModelSpec) -> list[tuple[str, ...]]:
    """Feature names per gather launch, in the order the kernels read them: candidate-scope
    features first, then request-scope ones (each in spec order), the layout the engine's
    staging writes a request's bag bounds in (one 2-D block per scope)."""
    return [tuple(f.name for scope in ("candidate", "request") for f in spec.sparse
                  if f.table in names and f.scope == scope)
            for names in table_groups(spec)]


class TritonModel:
    """Forward of ``spec`` with Triton kernels; ``forward(batch) -> (scores, bad_request)``."""

    def __init__(self, spec: ModelSpec, weights: dict[str, torch.Tensor],
                 device: str | torch.device = "cuda",
                 compute_dtype: torch.dtype | None = None) -> None:
        problems = check_weights(spec, weights)
        if problems:
            raise ValueError("weights do not match the spec:\n  " + "\n  ".join(problems))
        self.spec = spec
        self.device = torch.device(device)
        if compute_dtype is None:
            compute_dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.dtype = compute_dtype
        self.layout = build_layout(spec)
        self._pack_tables(weights)
        self._load_layers(weights)
        self._side: torch.cuda.Stream | None = None
        self._fused: int | None = None
        self.set_fused_dot(fused_dot())
        self.set_fused_bottom(fused_bottom())

    def set_bottom_beside_gather(self, on: bool) -> None:
        """Run the bottom MLP on a side stream while the gather runs on the caller's (CUDA
        only; captured graphs keep the fork and join). The two are independent: the bottom
        MLP is three small GEMMs (19 us at B=8192 on the H200, mostly launch and ramp) and
        the gather is bound by memory, so the GEMMs may hide under it. Same kernels, same
        bits; off by default until a card's ``bench/kernel_variants.py`` says it pays."""
        wanted = on and self.device.type == "cuda" and bool(self.spec.dense)
        self._side = torch.cuda.Stream(self.device) if wanted else None

    def set_fused_bottom(self, on: bool) -> bool:
        """Run the bottom MLP in one launch (``mlp.fused_mlp``) instead of one a layer;
        returns whether it is on: only for 2 or 3 layers that ``mlp.fits``. The same
        rounding points, another summation order inside the second layer: the same scores
        within the dtype's tolerance. Off by default (``RECSERVE_FUSED_BOTTOM=1`` turns it
        on for every new model): not yet measured on a card."""
        self._fused_bottom = on and fits(self.bottom) is None
        return self._fused_bottom

    def set_fused_dot(self, on: bool) -> bool:
        """Form the dot interaction inside the gather's last launch (``gather_dot``) instead
        of in a launch of its own; returns whether it is on. Only for dot models with a
        candidate-scope feature; the fused launch takes the table group with the most
        candidate-scope features (its request-scope ones go in a plain launch before it).
        The same sums (the Gram's 32 columns at a time), so the same scores up to rounding;
        off by default: on the H200 it lost (the dlrm-dot forward 385 us against 320 at
        B=8192, bench/RESULTS.md, nineteenth session; ``RECSERVE_FUSED_DOT=1`` turns it on
        for every new model, a server's too)."""
        self._fused = None
        if on and self.spec.interaction.kind == "dot":
            counts = [sum(not f.request_scope for f in feats) for _, feats, _ in self.groups]
            if max(counts, default=0) > 0:
                self._fused = counts.index(max(counts))
        return self._fused is not None

    def _pack_tables(self, weights: dict[str, torch.Tensor]) -> None:
        spec, dev = self.spec, self.device
        self.groups = []  # (PackedTables, BagFeatures, feature names)
        first_vector = 1 if spec.dense else 0
        by_name = {f.name: (k, f) for k, f in enumerate(spec.sparse)}
        for names, fnames in zip(table_groups(spec), feature_groups(spec), strict=True):
            stems = [f"tables.{n}" for n in names]
            tables = [weights[f"{s}.weight"].to(dev) for s in stems]
            quant = tables[0].dtype == torch.uint8
            packed = PackedTables(
                tables,
                [weights[f"{s}.scale"].to(dev) for s in stems] if quant else None,
                [weights[f"{s}.offset"].to(dev) for s in stems] if quant else None)
            feats = []
            for name in fnames:
                k, f = by_name[name]
                feats.append(BagFeature(
                    names.index(f.table), self.layout.vector_cols[first_vector + k],
                    f.scope == "request", f.pooling == "mean", f.weighted, f.max_bag))
            self.groups.append((packed, tuple(feats), fnames))

    def _load_layers(self, weights: dict[str, torch.Tensor]) -> None:
        spec, dev, dt, lay = self.spec, self.device, self.dtype, self.layout
        self.bottom = [(_kn(weights[f"bottom.{k}.weight"], dt, dev),
                        weights[f"bottom.{k}.bias"].to(dev, dt))
                       for k in range(len(spec.bottom_mlp))]
        self.cross = [(_kn(weights[f"cross.{n}.u"], dt, dev),
                       _kn(weights[f"cross.{n}.v"], dt, dev),
                       weights[f"cross.{n}.bias"].to(dev, dt))
                      for n in range(spec.interaction.layers)]
        top = [(weights[f"top.{k}.weight"], weights[f"top.{k}.bias"])
               for k in range(len(spec.top_mlp))]
        w0 = top[0][0][:, list(lay.z_order)]
        self.top_u = _kn(w0[:, :lay.ku], dt, dev) if lay.ku else None
        self.top = [(_kn(w0[:, lay.ku:], dt, dev), top[0][1].to(dev, dt))]
        self.top += [(_kn(w, dt, dev), b.to(dev, dt)) for w, b in top[1:]]
        self.sigmoid = torch.tensor([o.activation == "sigmoid" for o in spec.outputs],
                                    dtype=torch.int32, device=dev)
        self.fuse_final = (len(top) >= 2 and spec.top_mlp[-2] <= MAX_FINAL_N
                           and len(spec.outputs) <= MAX_FINAL_H)
        if self.fuse_final:
            wf, bf = top[-1]
            self.final = (wf.to(dev, dt).contiguous(), bf.to(dev, torch.float32), self.sigmoid)
            self.top.pop()
        self.dest = None
        if spec.interaction.kind == "dot":
            self.dest = dest_map(spec.num_vectors, list(lay.pairs), spec.interaction_dim, dev)

    def prepare(self, batch: Batch, validate: bool = True) -> PreparedBatch:
        """Upload ``batch`` in the kernels' packed form; see ``prepare.prepare_batch``."""
        return prepare_batch(self, batch, validate)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores [B, H] fp32 and bad_request [R] bool (an id outside its table)."""
        scores, bad_flags = self.forward_prepared(self.prepare(batch))
        return scores, bad_flags != 0

    @torch.no_grad()
    def forward_prepared(self, p: PreparedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The forward on an already uploaded batch: kernel launches only, no host sync.
        Scores [B, H] fp32 and each request's bad-id flag [R] int32, nonzero where one of
        its ids was outside its table: the gathers' own flags (``p.bad_flags`` when the
        caller brings them zeroed), not turned into bools here, which would take one more
        kernel (1.3 us of the 128 at B=512 on the H200) where the engine copies the flags
        out and reads them on the host anyway."""
        spec, lay = self.spec, self.layout
        e = torch.empty(p.num_rows, lay.e_width, device=self.device, dtype=self.dtype)
        side = self._side
        main = torch.cuda.current_stream(self.device) if side is not None else None
        if side is not None:
            side.wait_stream(main)  # the fork: p's inputs and e are ready on main
            with torch.cuda.stream(side):
                self._bottom(p, e)
        elif spec.dense:
            self._bottom(p, e)
        # One set of flags for every gather launch (each only sets flags), zeroed by the
        # caller (the engine's staging) or here
        bad = p.bad_flags
        if bad is None:
            bad = torch.zeros(p.num_requests, dtype=torch.int32, device=self.device)
        for k, ((packed, feats, _), (indices, offsets, ends, weights)) in enumerate(
                zip(self.groups, p.groups, strict=True)):
            if k != self._fused:
                embedding_bag(packed, feats, indices, offsets, e, weights=weights,
                              row_request=p.row_request, request_offsets=p.request_offsets,
                              ends=ends, bad=bad)
        if side is not None:
            main.wait_stream(side)  # the join: e's x slice is written
        z = self._interact(e) if self._fused is None else self._gather_and_dot(p, e, bad)
        return self._top(p, z), bad

    def _gather_and_dot(self, p: PreparedBatch, e: torch.Tensor, bad: torch.Tensor
                        ) -> torch.Tensor:
        """The fused group's request-scope features (a plain launch), then its
        candidate-scope ones with the dot interaction (``gather_dot``), flagging into
        ``bad``. Returns z."""
        packed, feats, _ = self.groups[self._fused]
        indices, offsets, ends, weights = p.groups[self._fused]
        # feature_groups put a group's candidate-scope features first: their offsets are
        # the first (B + 1) per feature, the request-scope ones' (R + 1) each follow
        cand = sum(not f.request_scope for f in feats)
        split = cand * (p.num_rows + 1)
        common = dict(weights=weights, row_request=p.row_request,
                      request_offsets=p.request_offsets, bad=bad)
        if cand < len(feats):
            embedding_bag(packed, feats[cand:], indices, offsets[split:], e,
                          ends=None if ends is None else ends[split:], **common)
        z = self._z(e)
        then = ThenDot(self.spec.num_vectors, self._vector_dim(), self.dest, z,
                       self.layout.x_col_in_z, counters(p.num_rows, self.device))
        embedding_bag(packed, feats[:cand], indices, offsets[:split], e,
                      ends=None if ends is None else ends[:split], then_dot=then, **common)
        return z

    def _bottom(self, p: PreparedBatch, e: torch.Tensor) -> None:
        lay, spec = self.layout, self.spec
        x_cols = slice(lay.vector_cols[0], lay.vector_cols[0] + spec.bottom_out_dim)
        x = p.dense
        if self._fused_bottom:
            x = fused_mlp(x, self.bottom, out=None if lay.x_request else e[:, x_cols])
        else:
            for k, (w, b) in enumerate(self.bottom):
                last = k == len(self.bottom) - 1 and not lay.x_request
                x = linear(x, w, b, activation="relu", out=e[:, x_cols] if last else None)
        if lay.x_request or not self.bottom:
            e[:, x_cols] = x[p.row_request] if lay.x_request else x

    def _interact(self, e: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        kind = spec.interaction.kind
        if kind == "cat":
            return e
        if kind == "dcnv2":
            x = e
            for u, v, b in self.cross:
                x = cross_layer(e, x, u, v, b)
            return x
        return dot_interaction(e, spec.num_vectors, self._vector_dim(), self.dest, self._z(e),
                               self.layout.x_col_in_z)

    def _vector_dim(self) -> int:
        """D of the dot interaction's vectors."""
        spec = self.spec
        return spec.bottom_out_dim if spec.dense else spec.table(spec.sparse[0].table).dim

    def _z(self, e: torch.Tensor) -> torch.Tensor:
        """The dot interaction's output [B, K]: rows padded to 16 bytes so the next GEMM's
        loads stay aligned (479 -> 480 columns)."""
        width = self.spec.interaction_dim
        return torch.empty(e.shape[0], -(-width // 8) * 8, device=e.device,
                           dtype=self.dtype)[:, :width]

    def _top(self, p: PreparedBatch, z: torch.Tensor) -> torch.Tensor:
        ku = self.layout.ku
        h = z[:, ku:]
        extra = {}
        if ku:
            u_half = linear(z[:, :ku], self.top_u, a_rows=p.first_rows)
            extra = {"add": u_half, "add_rows": p.row_request}
        n = len(self.top)
        for k, (w, b) in enumerate(self.top):
            kw = extra if k == 0 else {}
            if k == n - 1 and self.fuse_final:
                return linear(h, w, b, activation="relu", final=self.final, **kw)
            h = linear(h, w, b, activation="none" if k == n - 1 else "relu", **kw)
        logits = h.float()
        return torch.where(self.sigmoid.bool()[None, :], torch.sigmoid(logits), logits)


def capture_graph(fn, *args, pool=None, device: torch.device | None = None):
    """Warm ``fn(*args)`` up on a side stream (this also autotunes every kernel for these
    shapes), then capture one call in a CUDA graph (in ``pool`` when given). Returns
    (graph, outputs of the captured call); ``graph.replay()`` recomputes those outputs from
    the same input tensors. The capture is thread-local: other threads may keep launching
    work (the engine captures one model while serving others)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            fn(*args)
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        outputs = fn(*args)
    return graph, outputs
