"""A GPU batch's answers per piece: from its scores and bad-id flags, or, when the batch
could not run (an out-of-memory, say), from scoring each piece alone."""

from __future__ import annotations

import numpy as np
import torch

from .executor import Job, PieceResult, index_problem, slice_rows
from .inputs import RequestInputs, collate
from .scheduler import EngineError
from .spec import ModelSpec


def piece_results(job: Job, scores: np.ndarray, bad: np.ndarray) -> tuple[PieceResult, ...]:
    """Each piece's rows of the batch's ``scores``, or its error where the gather kernel
    flagged it (``bad``, one flag per piece)."""
    results, start = [], 0
    for i, (piece, inputs) in enumerate(zip(job.plan.pieces, job.inputs, strict=True)):
        if bad[i]:
            results.append(bad_ids(job.model.spec, inputs))
        else:
            results.append(PieceResult(scores=scores[start:start + piece.count]))
        start += piece.count
    return tuple(results)


def score_one_by_one(job: Job, exc: Exception) -> tuple[PieceResult, ...]:
    """Score each piece alone on the default stream, without graphs (after the batch
    failed with ``exc``): a piece that fails again gets an ``internal`` error alone."""
    model = job.model
    results = []
    for piece, inputs in zip(job.plan.pieces, job.inputs, strict=True):
        try:  # (slicing decodes DeferredInputs, which refuse malformed bytes: this piece's)
            rows = slice_rows(model.spec, inputs, piece.start, piece.count)
            scores, bad = model.triton.forward(collate(model.spec, [rows]))
            if bool(bad.any()):
                results.append(bad_ids(model.spec, rows))
            else:
                results.append(PieceResult(scores=scores.float().cpu().numpy()))
        except Exception as piece_exc:
            kind = "out of memory" if isinstance(piece_exc, torch.OutOfMemoryError) \
                else f"{type(piece_exc).__name__}: {piece_exc}"
            results.append(PieceResult(error=EngineError(
                "internal", f"scoring failed ({kind}) after the batch failed ({exc})")))
    return tuple(results)


def bad_ids(spec: ModelSpec, inputs: RequestInputs) -> PieceResult:
    """The answer for a request the gather kernel flagged: an id outside its table."""
    problem = index_problem(spec, inputs) or "an id is outside its table"
    return PieceResult(error=EngineError("bad_request", problem))
