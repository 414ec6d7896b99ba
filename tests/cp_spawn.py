"""Spawning a torch.distributed group for the context-parallel tests: ``world`` processes on 127.0.0.1, each
running a list of cases, every wait bounded.

``run_group(world, cases, run_case)`` starts the processes; each calls ``run_case(case, rank, world)`` (a
module-level function, so that it pickles) for every case and sends back ``{case name: result}``.  A rank
that raises sends its traceback, and the test fails with it instead of hanging.
"""
from __future__ import annotations

import datetime
import os
import queue
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

JOIN_TIMEOUT_S = 120          # for all of a group's results
COLLECTIVE_TIMEOUT_S = 60     # for one collective inside a worker


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank, world, port, cases, results, backend, run_case):
    """Entry point of one spawned process (``backend`` "gloo" on CPU, "nccl" on GPU ``rank``, where every case
    gets ``device="cuda:<rank>"``); puts ``(rank, {case name: result})`` or ``(rank, traceback)``."""
    try:
        torch.set_num_threads(1)
        if backend == "nccl":
            torch.cuda.set_device(rank)
            cases = [dict(case, device=f"cuda:{rank}") for case in cases]
        else:
            os.environ.setdefault("TRITON_INTERPRET", "1")
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        out = {case["name"]: run_case(case, rank, world) for case in cases}
        results.put((rank, out))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:  # report to the parent instead of hanging it
        results.put((rank, traceback.format_exc()))


def run_group(world: int, cases: list, run_case, backend: str = "gloo") -> dict:
    """Spawn ``world`` processes that run ``cases``; ``{rank: {case name: result}}``, or the test fails with
    the first rank's traceback (or a timeout)."""
    spawn = mp.get_context("spawn")
    results = spawn.Queue()
    port = free_port()
    procs = [spawn.Process(target=worker, args=(r, world, port, cases, results, backend, run_case), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    collected = {}
    try:
        for _ in range(world):
            rank, out = results.get(timeout=JOIN_TIMEOUT_S)
            if isinstance(out, str):
                pytest.fail(f"rank {rank} of {world} failed:\n{out}")
            collected[rank] = out
    except queue.Empty:
        pytest.fail(f"no result from {world - len(collected)} of {world} ranks within {JOIN_TIMEOUT_S} s")
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
    return collected
