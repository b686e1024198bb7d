"""bench.py runs end to end on a tiny config and writes every row (no timing assertions: timings belong in bench.py)."""
import json
import math

import bench


def test_bench_quick_writes_every_row(tmp_path):
    out = tmp_path / "b.json"
    assert bench.main(["--quick", "--out", str(out), "--model", "vit_test", "--img-size", "32", "--batch-size", "8",
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
