"""Meta-World step+render throughput of the collector's code path, 1 vs 2 worker processes.

Each worker (spawned, one env each, as in the collector) builds a ``MetaWorldEnv`` (64x64, corner2),
warms up, then runs expert rollouts (``rollout``: policy + env.step + render + flip) for a fixed
number of frames; workers start together and the wall time of the slowest counts.
Run: ``.venv/bin/python benchmarks/collect.py`` (on an otherwise idle machine).
Target: >= 100 frames/s per worker, near-linear speed-up from 1 to 2 workers.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time

TASK, SIZE, CAMERA, STEPS, EPISODES = "push-v3", 64, "corner2", 120, 6


def _work(barrier, q) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("MUJOCO_GL", "egl")
    from whale_pl.data.metaworld import MetaWorldEnv, rollout

    env = MetaWorldEnv(TASK, SIZE, CAMERA)
    rollout(env, "expert", 0, 20)  # warm-up (GL context, caches)
    barrier.wait()
    t0, c0 = time.perf_counter(), time.process_time()
    frames = sum(len(rollout(env, "noise_0.1", i + 1, STEPS)) for i in range(EPISODES))
    q.put((frames, time.perf_counter() - t0, time.process_time() - c0))
    env.close()


def run(workers: int) -> tuple[float, float]:
    """(frames/s in all by wall clock, frames per CPU-second per worker)."""
    ctx = mp.get_context("spawn")
    barrier, q = ctx.Barrier(workers), ctx.Queue()
    procs = [ctx.Process(target=_work, args=(barrier, q)) for _ in range(workers)]
    for p in procs:
        p.start()
    res = [q.get() for _ in procs]
    for p in procs:
        p.join()
    return sum(r[0] for r in res) / max(r[1] for r in res), sum(r[0] for r in res) / sum(r[2] for r in res)


def main() -> None:
    """1 worker, then 2; print both and the last line."""
    load0 = os.getloadavg()[0]
    one, cpu1 = run(1)
    print(f"1 worker : {one:6.1f} frames/s ({SIZE}x{SIZE}, {CAMERA}, {TASK}, step+render; {cpu1:.0f} frames/CPU-s)")
    two, cpu2 = run(2)
    print(f"2 workers: {two:6.1f} frames/s in all, speed-up {two / one:.2f}x ({cpu2:.0f} frames/CPU-s per worker)")
    print(f"load average before/after: {load0:.1f} / {os.getloadavg()[0]:.1f} (other processes on the 2 cores "
          "distort wall-clock figures; frames/CPU-s does not depend on them)")
    print(f"collect: {two / 2:.1f} frames/s per worker")


if __name__ == "__main__":
    main()
