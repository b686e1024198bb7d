"""bench.py runs end to end on a tiny config and writes every row (no timing assertions: timings belong in
bench.py)."""
import json
import math

import bench


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
    assert {r["name"] for r in pipeline} == {f"{a}, {b}" for a in ("ours", "ours, loader only", "torchvision")
                                             for b in ("1 process", "1 workers")}
    assert all(math.isfinite(r["img_s"]) and r["img_s"] > 0 for r in pipeline)
    e2e = [r for r in rows if r["part"] == "e2e"]
    assert len(e2e) == 2 * len(bench.E2E) and all(r["steps_s"] > 0 for r in e2e)


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
    assert len([r for r in rows if r["part"] == "e2e"]) == 2 * len(bench.GPU_E2E)
    run = next(r for r in rows if r["part"] == "run")
    assert run["returncode"] == 0 and run["img_s"] > 0 and run["log_line"].startswith("step 3/3"), run
    prof = [r for r in rows if r["part"] == "prof"]
    assert len(prof) == 2 and all(r["kernels"] and r["kernels"][0]["ms_per_step"] > 0 for r in prof)
    assert not [r for r in rows if r["part"] == "data"]
