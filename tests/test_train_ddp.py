"""The trainer under DDP: two gloo processes on the CPU."""

from __future__ import annotations

import os

import pytest
import torch

from fastkd import train
from fastkd import trainer as trainer_mod
from tests.train_support import args_for


def _ddp_worker(rank, world, port, argv, q):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        cfg = train.parse_config(argv)
        trainer = trainer_mod.Trainer(cfg, log=lambda *_: None)
        trainer.setup()
        trainer.train()
        sd = {k: v.clone() for k, v in trainer.module.student.state_dict().items()}
        q.put((rank, None, sum(float(v.double().sum()) for v in sd.values()), trainer.global_step,
               [c["hit_rate"] for c in trainer.cache_stats]))
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    except Exception as e:  # report to the parent instead of hanging it
        q.put((rank, repr(e), None, None, None))


def test_ddp_two_processes_gloo(tiny, tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = args_for(tiny, tmp_path / "ddp", "bert-emd", "--cache-dir", str(tmp_path / "cache"))
    argv[argv.index("--cache") + 1] = "disk"
    argv[argv.index("--epochs") + 1] = "2"
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, argv, q)) for r in range(2)]
    for p in procs:
        p.start()
    got = sorted(q.get(timeout=180) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert [g[1] for g in got] == [None, None], got
    # 48 examples, batch 8, 2 ranks: 3 steps per rank and epoch; both ranks hold identical weights (synced
    # gradients and EMD layer weights).
    assert got[0][3] == got[1][3] == 6
    # Epoch 2 reads what either rank stored in epoch 1 (disk shards shared after a barrier): half the batches hit.
    assert got[0][4] == got[1][4] == [0.5]
    assert got[0][2] == pytest.approx(got[1][2], rel=0, abs=1e-6)
    assert (tmp_path / "ddp" / "metrics.jsonl").is_file()


