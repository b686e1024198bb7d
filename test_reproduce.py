"""reproduce.py --quick end to end (two rows, one seed, the test ViT): results.md / .json / .png written,
every run in its own folder, a second call skips what is done and redoes only what is missing."""
import json
import os

import numpy as np
import pytest
from PIL import Image

import reproduce


def test_quick_table_end_to_end_and_resumed(demo_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(demo_dir)  # the demo set of the session
    out = tmp_path / "repro"
    assert reproduce.main(["--quick", "--out-dir", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    assert [r["row"] for r in result["rows"]] == ["SimCLR gap", "DenseCL++* gap"]
    for row in result["rows"]:
        for k in ("mAP", "CF1", "OF1", "mIoU"):
            mean, std = row[k]
            assert 0 <= mean <= 100 and std == 0.0, (row["row"], k)  # one seed: no spread
    assert result["rows"][1]["poster"]["mAP"] == 64.1
    md = (out / "results.md").read_text()
    assert "| DenseCL++* gap |" in md and "`--neg guided --M 8 --beta 0.5 --N 3 --agg gap`" in md
    with Image.open(out / "results.png") as img:
        assert img.width == 900 and len(np.unique(np.asarray(img.convert("RGB")).reshape(-1, 3), axis=0)) > 3
    run = out / "denseclppstar-gap" / "seed0"
    assert {"ml.json", "seg.json", "log.txt", "pretrain"} <= set(os.listdir(run))
    stamp = os.path.getmtime(run / "pretrain" / "ckpt.pt")
    os.remove(run / "seg.json")
    assert reproduce.main(["--quick", "--out-dir", str(out)]) == 0
    assert os.path.getmtime(run / "pretrain" / "ckpt.pt") == stamp  # finished pretraining skipped
    assert (run / "seg.json").exists() and (run / "log.txt").read_text().count("probe_segment.py") == 2


def test_an_interrupted_pretraining_is_resumed(demo_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(demo_dir)
    out = tmp_path / "repro"
    row = reproduce.rows_of("main", quick=True)[0]
    args = reproduce.get_args_parser().parse_args(["--quick", "--out-dir", str(out)])
    args.nproc_per_node = 1
    folder = out / reproduce.slug(row[0]) / "seed0"
    os.makedirs(folder)
    cmd = reproduce.pretrain_cmd(args, row[1], 0, str(folder / "pretrain"))
    i = cmd.index("--max-steps")
    assert reproduce.run(cmd[:i + 1] + ["4"] + cmd[i + 2:], str(folder / "log.txt")) == 0  # stopped at step 4
    result = reproduce.run_row(args, row[0], row[1], 0)
    assert "error" not in result, result
    assert "resumed at step 4" in (folder / "log.txt").read_text()


@pytest.mark.parametrize("table,n", [("main", 10), ("agg-pair", 5), ("lambda", 10),
                                     ("negatives", 36), ("recon", 8)])
def test_tables_have_their_rows(table, n):
    rows = reproduce.rows_of(table)
    assert len(rows) == n and len({reproduce.slug(name) for name, _ in rows}) == n


def test_cross_view_negatives_keep_the_posters_share_of_tokens(capsys):
    # 64/196 of the tokens
    assert reproduce.cross_view(64, 196) == "64" and reproduce.cross_view(64, 64) == "21"
    assert reproduce.cross_view(64, 16) == "5" and reproduce.cross_view(0, 64) == "0"
    assert reproduce.cross_view(196, 64) == "63"  # never all of the partner's tokens (the match is excluded)
    star = dict(zip(*[iter(dict(reproduce.rows_of("main", tokens=64))["DenseCL++* gap"])] * 2))
    assert star["--N"] == "21" and star["--M"] == "256" and star["--beta"] == "0.5"
    Ns = {dict(zip(*[iter(f)] * 2))["--N"] for _, f in reproduce.rows_of("negatives", tokens=64)}
    assert Ns == {"0", "5", "10", "21"}
    assert reproduce.main(["--rows", "SimCLR gap", "no such row"]) == 2
    assert "--rows ['no such row']" in capsys.readouterr().err
