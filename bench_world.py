"""
Part world of bench.py (run through it: python bench.py, or --gpu-check for world sizes 1 and 8): one rank's
training step at world sizes 1, 2, 4, 8, simulated in one process (simulated_world): the objective gets
the all-gathered shapes, the other ranks' tensors built locally (the communication is not measured).
"""
import contextlib
import itertools
import sys
import time

import torch

import config
import losses
import vit

# the rows of part world, at world sizes 1, 2, 4, 8 (--gpu-check: 1 and 8)
WORLD = ("SimCLR", "DenseCL++* (+N=64)", "DenseCL++* scored on 16 tokens")


@contextlib.contextmanager
def simulated_world(world):
    """The objective as rank 0 of `world` ranks computes it, in one process: losses.world() returns (0, world)
    and losses.gather(x) returns x followed by world-1 copies built here (x rolled by 1, 2, ... along its
    first dimension, detached: other values, no gradient). Every gathered shape, and with it all the work of
    the objective (the global draws, NT-Xent's and the dense loss's negatives, the thresholded scoring over
    the global batch, the global BatchNorm's sums), is that of one rank at that world size; the all-gather
    and the all-reduce of its backward are not there and not measured."""
    world_fn, gather_fn = losses.world, losses.gather
    losses.world = lambda: (0, world)
    losses.gather = lambda x: torch.cat([x] + [x.detach().roll(r, 0) for r in range(1, world)])
    try:
        yield
    finally:
        losses.world, losses.gather = world_fn, gather_fn


def bench_world(cfg, device, rows, median_time, free, train_step, objective_flags, size_flags):
    """Part world: one rank's training step (batch --batch-size) at the world sizes cfg.worlds, in one process
    (simulated_world), for the objectives of WORLD; ratio: to SimCLR at the same world size, growth: to the
    objective's own step at the first world size. World 1 is the train part's row where it ran (the same
    step). median_time, free, train_step, objective_flags and size_flags are bench.py's (passed in: bench.py
    imports this file)."""
    B, S = cfg.batch_size, cfg.img_size
    T = (S // vit.CONFIGS[cfg.model]["patch_size"]) ** 2
    train = {r["objective"]: r["step_ms"] / 1e3 for r in rows if r["part"] == "train" and "step_ms" in r}
    times = {}
    for objective, world in itertools.product(WORLD, cfg.worlds):
        flags, name = objective_flags(objective, T)
        row, t0 = {"part": "world", "name": f"{name}, world {world}", "objective": objective, "world": world,
                   "global_batch": world * B, "flags": flags}, time.perf_counter()
        try:
            if world == 1 and objective in train:
                t = train[objective]
            else:
                free(device)
                with simulated_world(world):
                    _, step, _ = train_step(config.resolve_args(["--data", "unused"] + size_flags(cfg) + flags),
                                            device)
                    x = torch.randn(2 * B, 3, S, S, device=device)
                    t = median_time(lambda: step(x), device, cfg.warmup, cfg.steps)
                step = x = None
            times[objective, world] = t
            simclr, first = times.get(("SimCLR", world)), times.get((objective, cfg.worlds[0]))
            row.update(img_s=B / t, views_s=2 * B / t, step_ms=1e3 * t, ratio=t / simclr if simclr else None,
                       growth=t / first if first else None, wall_s=time.perf_counter() - t0,
                       mem_gb=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None)
        except torch.cuda.OutOfMemoryError:
            row["oom"] = True
        except Exception as e:  # one broken row must not cost the rest of a GPU check
            row["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
            print(f"error in world row {row['name']}: {row['error'][:400]}", file=sys.stderr, flush=True)
        rows.append(row)
        print(f"  [{time.perf_counter() - cfg.t_start:.0f} s] world {row['name']}: "
              f"{row.get('step_ms', float('nan')):.1f} ms", flush=True)
    free(device)
