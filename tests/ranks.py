"""Several ranks on the CPU with gloo, in processes forked from the test: torchrun's code path without a new
interpreter per rank (importing torch and timm again costs seconds per process; a fork costs milliseconds).

    results = run_ranks(fn, 2, arg)   # fn(rank, arg) on ranks 0 and 1; their return values, in rank order

Each rank sees what torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and one thread. A rank
that raises fails the test with its traceback; ranks still running after `timeout` seconds are killed and
the test fails, so a collective that never matches cannot hang the suite.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import socket
import time
import traceback

from preactresnet.distributed import TIMEOUT_ENV as DIST_TIMEOUT_ENV  # the process group's timeout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RankFailed(AssertionError):
    pass


def run_ranks(fn, world: int, *args, timeout: float = 60.0, local_ranks: list[int] | None = None,
              env: dict | None = None) -> list:
    """fn(rank, *args) on `world` forked ranks of one gloo group; their results in rank order."""
    ctx = multiprocessing.get_context("fork")
    port, results = free_port(), ctx.Queue()
    local = local_ranks or list(range(world))
    procs = [ctx.Process(target=_rank_main, args=(fn, r, world, local[r], port, args, results, env or {}), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    deadline, got, failed = time.monotonic() + timeout, {}, True
    try:
        while len(got) < world:
            try:
                rank, ok, value = results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise RankFailed(f"ranks {sorted(set(range(world)) - set(got))} still running after {timeout:.0f} s") from None
            if not ok:
                raise RankFailed(f"rank {rank} failed:\n{value}")
            got[rank] = value
        failed = False
    finally:
        for p in procs:  # a rank that failed leaves the others waiting in a collective: no waiting for them
            p.join(timeout=0 if failed else max(0.1, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
    return [got[r] for r in range(world)]


def _rank_main(fn, rank, world, local_rank, port, args, results, env) -> None:
    try:
        os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": str(world),
                           "LOCAL_RANK": str(local_rank), DIST_TIMEOUT_ENV: "30", **env})
        import torch

        torch.set_num_threads(1)
        results.put((rank, True, fn(rank, *args)))
    except BaseException:  # noqa: BLE001 - the test shows every rank's failure, whatever it was
        results.put((rank, False, traceback.format_exc()))
    finally:
        from preactresnet.distributed import cleanup

        cleanup()
        results.close()
        results.join_thread()
        os._exit(0)  # no atexit handlers of the parent (pytest's) in a forked child
