"""Peak RSS, wall and CPU seconds of one validation pass of a random-init SASRec on
ml-latest-small, as one JSON line (run one process per setting, from the repository root)::

    python bench/results/real_data/eval_memory/eval_mem.py MAX_LEN|all EVAL_CELLS
"""

from __future__ import annotations

import json
import resource
import sys
import time

import torch

from lmat_platform.datasets.commands import resolve_prepared
from lmat_platform.models.sasrec import SASRec, SASRecConfig
from lmat_platform.tenants import Tenant
from lmat_platform.train import TrainConfig, eval_batches, evaluate_model


def main() -> None:
    torch.set_num_threads(1)
    prep = resolve_prepared("ml-latest-small", tie_order="hidden")
    length = prep.max_history if sys.argv[1] == "all" else int(sys.argv[1])
    cfg = TrainConfig(eval_cells=int(sys.argv[2]))
    torch.manual_seed(0)
    net = SASRec(SASRecConfig(n_items=prep.n_items, max_len=length))
    batches = eval_batches(prep.store, prep.thin["valid"],
                           Tenant("next_item", ("item_id",), length), config=cfg)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    c0, w0 = time.process_time(), time.perf_counter()
    m = evaluate_model(net, batches, config=cfg)
    print(json.dumps({
        "max_len": length, "eval_cells": cfg.eval_cells,
        "rows": max(1, cfg.eval_cells // min(length, prep.max_history) ** 2),
        "peak_rss_before_eval_mb": rss0 / 1024,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "eval_wall_s": round(time.perf_counter() - w0, 1),
        "eval_cpu_s": round(time.process_time() - c0, 1), "metrics": m,
    }))


if __name__ == "__main__":
    main()
