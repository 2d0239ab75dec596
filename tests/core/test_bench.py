"""`covidseg bench`'s worker-pool measurement (cli.bench.ParallelModel): real processes, real model."""
from __future__ import annotations

import numpy as np

from cli.bench import ParallelModel
from shared.core.model import DEFAULT_WEIGHTS


def test_parallel_model_runs_every_process_and_stops_them():
    x = np.zeros((2, 448, 448, 1), np.float32)   # batch 2 keeps the test quick; the bench uses 8
    pool = ParallelModel(DEFAULT_WEIGHTS, "fp32", processes=2, x8=x, calls_per_round=1)
    try:
        assert pool.slices == 2 * 1 * 2
        assert all(p.is_alive() for p in pool.procs) and len({p.pid for p in pool.procs}) == 2
        wall, cpu = pool.round()
        # every process ran its model call: the summed child CPU time per slice is a real share of the wall time
        assert wall > 0 and cpu > 0.2 * wall, (wall, cpu)
        wall2, _ = pool.round()       # a second round reuses the loaded models
        assert wall2 > 0
    finally:
        pool.close()
    assert not any(p.is_alive() for p in pool.procs)
