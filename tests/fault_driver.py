"""Run a small study's configurations as a study worker does, dying like SIGKILL at a named point.

    python fault_driver.py OUT POINT HIT

runs every configuration of CONFIGS not yet in OUT/s.sqlite (compute, run folder, store), and calls os._exit(137)
at the HIT-th time execution reaches POINT ("none" never dies). Used by tests/test_faults.py.
"""

import os
import sqlite3
import sys

OUT, POINT, HIT = sys.argv[1], sys.argv[2], int(sys.argv[3])

COMMON = ["model=tiny", "data.source=synthetic", "data.synthetic_size=400", "data.members.n=24",
          "data.nonmembers.n=24", "train.batch_size=8", "train.epochs=2", "train.lr=1e-2", "audit.bootstrap=20",
          "audit.batch_size=16", "audit.extraction.n=8", "audit.extraction.batch_size=4", "audit.blind=false",
          "audit.references.count=2", "audit.references.holdout=20", "audit.references.tune_records=10",
          "data.canary.formatted.repeats=[1, 4]", "data.canary.formatted.per_repeat=1",
          "audit.exposure.candidates=30", f"output_dir={OUT}/runs", f"store={OUT}/s.sqlite"]
CONFIGS = [["lora.targets=[q]"], ["lora.targets=[v]"]]

_count = {"n": 0}


def hit(point: str) -> None:
    if point == POINT:
        _count["n"] += 1
        if _count["n"] == HIT:
            os._exit(137)


def wrap(obj, name: str, point: str, after: bool = False) -> None:
    real = getattr(obj, name)

    def f(*a, **k):
        if not after:
            hit(point)
        out = real(*a, **k)
        if after:
            hit(point)
        return out

    setattr(obj, name, f)


def main() -> None:
    import numpy as np
    import torch

    import memlens.audit as A
    import memlens.extraction as E
    import memlens.finetune as F
    import memlens.references as R
    import memlens.scoring as SC
    import memlens.store as S
    from memlens.config import load_config

    wrap(torch.optim.AdamW, "step", "train_step")  # every optimizer step, references' and runs' alike
    wrap(SC, "pad_batch", "batch")  # every scoring batch (and padded training batch)
    wrap(SC, "pack_batch", "batch")  # every packed training batch
    wrap(E, "_generate_batch", "generate")  # every extraction batch
    wrap(np, "savez", "stats_cache_write", after=True)  # a statistics cache file written, not yet renamed
    wrap(R, "train_reference", "reference_trained", after=True)  # a reference kept, its statistics not yet
    wrap(os, "replace", "rename")  # every atomic rename (run folder, cache files, exports)
    real_exec = sqlite3.Connection.executemany

    class Conn(sqlite3.Connection):
        def executemany(self, sql, rows):
            hit("store_insert")  # inside the run's transaction, between its tables
            return real_exec(self, sql, rows)

    real_connect = sqlite3.connect
    sqlite3.connect = lambda *a, **k: real_connect(*a, factory=Conn, **k)
    real_write = F.write_run_folder

    def write_run_folder(*a, **k):
        hit("run_folder")
        return real_write(*a, **k)

    F.write_run_folder = write_run_folder  # compute_run imports it from memlens.finetune when it runs
    for extra in CONFIGS:
        cfg = load_config(None, [*COMMON, *extra])
        db = f"{OUT}/s.sqlite"
        if os.path.exists(db):
            conn = S.connect_readonly(db)
            done = S.run_exists(conn, cfg.config_hash())
            conn.close()
            if done:
                continue
        record = A.compute_run(cfg, progress=False, study="faults", overwrite=True)
        A.store_record(db, record)


if __name__ == "__main__":
    main()
