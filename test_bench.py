"""bench.py runs end to end on a tiny config and writes every row (no timing assertions: timings belong in
bench.py)."""
import json
import math

import pytest

import bench
import bench_world


def test_bench_quick_writes_every_row(tmp_path):
    out = tmp_path / "b.json"
    assert bench.main(["--quick", "--out", str(out), "--model", "vit_test", "--img-size", "32",
                       "--batch-size", "8",
                       "--steps", "1", "--warmup", "1", "--n-jpegs", "8", "--workers", "1", "--threads", "1",
                       "--jpeg-dir", str(tmp_path / "jpegs")]) == 0
    rows = json.loads(out.read_text())["rows"]
    train = {r["objective"]: r for r in rows if r["part"] == "train"}
    assert set(train) == set(bench.OBJECTIVES) | {"ccrop"}  # + the amortised ContrastiveCrop pass
    for r in train.values():
        assert not r.get("oom") and math.isfinite(r["img_s"]) and r["img_s"] > 0, r
        assert r.get("views_s", 2 * r["img_s"]) == 2 * r["img_s"]
    assert train["SimCLR"]["ratio"] == 1.0 and train["ccrop"]["ratio"] > 1.0
    pipeline = [r for r in rows if r["part"] == "data"]
    assert {r["name"] for r in pipeline} == {f"{a}, {b}" for a in ("ours", "ours, loader only", "torchvision",
                                                                    "ours, loader of --decode gpu")
                                             for b in ("1 process", "1 workers")}
    assert all(math.isfinite(r["img_s"]) and r["img_s"] > 0 for r in pipeline)
    e2e = [r for r in rows if r["part"] == "e2e"]
    assert len(e2e) == 2 * len(bench.E2E) and all(r["steps_s"] > 0 for r in e2e)  # no GPU decode on a CPU
    check_world(rows, (1, 2, 4, 8))


def check_world(rows, worlds):
    """The world rows: every objective of bench_world.WORLD at every world size, world 1 as the train row, SimCLR
    the reference of each world size."""
    world = {(r["objective"], r["world"]): r for r in rows if r["part"] == "world"}
    train = {r["objective"]: r for r in rows if r["part"] == "train"}
    assert set(world) == {(o, w) for o in bench_world.WORLD for w in worlds}
    for (objective, w), r in world.items():
        assert "error" not in r and r["step_ms"] > 0 and r["global_batch"] == 8 * w, r
        assert r["ratio"] == r["step_ms"] / world["SimCLR", w]["step_ms"]
    for o in bench_world.WORLD:
        assert world[o, 1]["step_ms"] == train[o]["step_ms"] and world[o, 1]["growth"] == 1.0


def test_gpu_check_runs_every_part_at_a_tiny_size(tmp_path):
    """The prepared GPU check end to end on the CPU (nothing in it is first tried on the GPU): its train rows,
    e2e rows, the pretrain.py run in its own process and the profiles, JSON written."""
    out = tmp_path / "g.json"
    assert bench.main(["--gpu-check", "--quick", "--out", str(out), "--model", "vit_test", "--img-size", "32",
                       "--batch-size", "8", "--n-jpegs", "16", "--workers", "1", "--threads", "1",
                       "--run-steps", "3", "--jpeg-dir", str(tmp_path / "jpegs")]) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert {"date", "torch", "cpu_count"} <= set(result["environment"])
    assert [r["objective"] for r in rows if r["part"] == "train"] == list(bench.GPU_CHECK)
    assert all(r["img_s"] > 0 and "error" not in r for r in rows if r["part"] == "train")
    e2e = [r["name"] for r in rows if r["part"] == "e2e"]
    assert len(e2e) == 3 * len(bench.GPU_E2E) and sum(n.endswith("GPU decode") for n in e2e) == 2
    check_world(rows, (1, 8))
    decode = [r for r in rows if r["part"] == "decode"]
    # the CPU decodes as the workers do: the same views where they decode at full size
    assert len(decode) == 1 and decode[0]["n_full"] > 0 and decode[0]["full_max_diff"] == 0, decode
    assert decode[0]["img_s"] > 0 and "hazard_corrupted" not in decode[0]
    run = next(r for r in rows if r["part"] == "run")
    assert run["returncode"] == 0 and run["img_s"] > 0 and run["log_line"].startswith("step 3/3"), run
    prof = [r for r in rows if r["part"] == "prof"]
    assert len(prof) == 2 and all(r["kernels"] and r["kernels"][0]["ms_per_step"] > 0 for r in prof)
    assert not [r for r in rows if r["part"] == "data"]
    detect = [r for r in rows if r["part"] == "detect"]
    assert len(detect) == 1 and detect[0]["img_s"] > 0 and "error" not in detect[0], detect


def test_detect_row_converts_its_speed_to_gpu_hours(tmp_path):
    """Part detect alone at the --quick size (seconds on a CPU), through bench.main and its JSON: one row, its
    ms, iterations/s and images/s one measurement at 2 images an iteration (16 over 8 GPUs), and each
    protocol's GPU-hours on one GPU = its iterations x 16 images / images/s."""
    out = tmp_path / "d.json"
    assert bench.main(["--quick", "--out", str(out), "--model", "vit_test", "--threads", "1",
                       "--skip", "kernel,train,world,vit,data,e2e,run,decode,prof"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["part"] for r in rows] == ["detect"] and "error" not in rows[0], rows
    r = rows[0]
    assert r["batch"] == 2 and r["step_ms"] > 0
    assert r["steps_s"] == pytest.approx(1e3 / r["step_ms"]) and r["img_s"] == pytest.approx(2 * r["steps_s"])
    for protocol, iters in (("coco", 90000), ("voc", 24000)):
        assert r[f"{protocol}_gpu_h"] == pytest.approx(iters * 16 / r["img_s"] / 3600), r


def test_simulated_world_gathers_local_copies():
    """bench_world.simulated_world(W): losses.world() is (0, W), a gather returns x then W-1 rolled copies without
    gradient, the step's draws are global (Bg = W*B), NT-Xent is rank 0's over the gathered batch (written out
    here); leaving the context restores one process."""
    import torch
    import torch.nn.functional as F

    import losses
    g = torch.Generator().manual_seed(0)
    u1, u2 = (torch.randn(3, 5, generator=g, requires_grad=True) for _ in range(2))
    with bench_world.simulated_world(4):
        assert losses.world() == (0, 4)
        y = losses.gather_images(torch.stack([u1, u2]))
        assert y.shape == (2, 12, 5)
        assert torch.equal(y, torch.cat([torch.stack([u1, u2]).roll(r, 1) for r in range(4)], 1))
        y.sum().backward()
        assert torch.equal(u1.grad, torch.ones(3, 5))  # the copies carry no gradient
        draws = losses.dense_draws(g, B=3, T=5, negatives="guided", M=2, beta=0.5, score_tokens=2)
        assert draws["sets"].shape == (2, 24) and draws["score_keys"].shape == (2, 12, 5)
        loss = losses.nt_xent(u1, u2, 0.2)
    u = F.normalize(torch.stack([u1, u2]), dim=-1)  # [2, B, D]
    everyone = torch.cat([u.roll(r, 1) for r in range(4)], 1).reshape(24, 5)
    logits = u.reshape(6, 5) @ everyone.T / 0.2
    rows = torch.arange(6)
    logits[rows, (rows // 3) * 12 + rows % 3] = float("-inf")  # self
    assert torch.allclose(loss, F.cross_entropy(logits, (1 - rows // 3) * 12 + rows % 3))
    assert losses.world() == (0, 1) and losses.gather(u1) is u1
