"""Histogram: buckets, quantile estimates, dict form."""

import math
import threading

import numpy as np
import pytest

from recserve.engine.histogram import Histogram, quantile_from


def test_buckets_sum_and_dict():
    h = Histogram((1.0, 2.0, 4.0))
    for v in (0.5, 1.0, 1.5, 3.0, 9.0):
        h.observe(v)
    d = h.to_dict()
    assert d == {"bounds": [1.0, 2.0, 4.0], "counts": [2, 1, 1, 1], "sum": 15.0, "count": 5}


def test_quantiles_track_the_data_within_a_bucket():
    rng = np.random.default_rng(0)
    values = rng.uniform(0.0, 0.01, 20_000)
    h = Histogram()
    for v in values:
        h.observe(v)
    for q in (0.5, 0.9, 0.99):
        exact = float(np.quantile(values, q))
        assert abs(h.quantile(q) - exact) / exact < 0.1
    assert math.isnan(Histogram().quantile(0.5))
    assert quantile_from([1.0], [0, 3], 1.0) == 1.0  # all above the last bound


def test_concurrent_observations_are_all_counted():
    h = Histogram()
    threads = [threading.Thread(target=lambda: [h.observe(1e-3) for _ in range(5000)])
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert h.count == 20_000 and h.sum == pytest.approx(20.0)


def test_bounds_must_ascend():
    with pytest.raises(ValueError, match="strictly ascending"):
        Histogram((2.0, 1.0))
