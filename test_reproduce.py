"""reproduce.py: the --quick table end to end and continued, a run killed by SIGKILL (before and after its
first checkpoint) continued to the numbers of an uninterrupted one, folders of another command refused, stale
probe results redone, the random-init row, seeds, rows, and the plot's text."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

import reproduce
import visualize
from conftest import HERE


def test_quick_table_end_to_end_and_resumed(demo_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(demo_dir)  # the demo set of the session
    out = tmp_path / "repro"
    assert reproduce.main(["--quick", "--out-dir", str(out)]) == 0
    result = json.loads((out / "results_quick.json").read_text())
    assert [r["row"] for r in result["rows"]] == ["SimCLR gap", "DenseCL++* gap"]
    for row in result["rows"]:
        for k in ("mAP", "CF1", "OF1", "mIoU"):
            mean, std = row[k]
            assert 0 <= mean <= 100 and std == 0.0, (row["row"], k)  # one seed: no spread
        prov = row["provenance"]["0"]
        assert prov["pretrain"][0]["exit"] == 0 and prov["pretrain"][0]["commit"] and "host" in prov["ml"]
    star = result["rows"][1]
    assert star["poster"]["mAP"] == 64.1 and star["reference"] == "SimCLR gap"
    runs = result["runs"]
    assert star["paired"]["mAP"][0] == pytest.approx(runs["DenseCL++* gap"]["0"]["mAP"] -
                                                     runs["SimCLR gap"]["0"]["mAP"])
    md = (out / "results_quick.md").read_text()
    assert "| DenseCL++* gap | 1 |" in md and "`--neg guided --M 8 --beta 0.5 --N 3 --agg gap`" in md
    with Image.open(out / "results_quick.png") as img:
        assert len(np.unique(np.asarray(img.convert("RGB")).reshape(-1, 3), axis=0)) > 3
    run = out / "quick" / "denseclppstar-gap" / "seed0"
    assert {"ml.json", "seg.json", "log.txt", "pretrain", "run.json"} <= set(os.listdir(run))
    record = json.loads((run / "run.json").read_text())
    assert record["pretrain"]["cmd"][:3] == ["pretrain.py", "--preset", "demo"]
    assert record["pretrain"]["cmd"][-5:] == ["--seed", "0", "--out-dir", "<run>/pretrain", "--resume"]
    assert record["probes"]["ml"]["ckpt_sha256"] == reproduce.sha256(run / "pretrain" / "ckpt.pt")
    stamp = os.path.getmtime(run / "pretrain" / "ckpt.pt")
    os.remove(run / "seg.json")  # a missing result, and a stale one (scored another checkpoint)
    record["probes"]["ml"]["ckpt_sha256"] = "0" * 64
    (run / "run.json").write_text(json.dumps(record))
    simclr = out / "quick" / "simclr-gap" / "seed0"
    os.remove(simclr / "pretrain" / "ckpt.pt")  # a finished run kept without its checkpoint: nothing to redo
    assert reproduce.main(["--quick", "--out-dir", str(out)]) == 0
    assert not (simclr / "pretrain" / "ckpt.pt").exists() and "SimCLR gap" in (out / "results_quick.md").read_text()
    assert os.path.getmtime(run / "pretrain" / "ckpt.pt") == stamp  # finished pretraining skipped
    log = (run / "log.txt").read_text()
    assert (run / "seg.json").exists() and log.count("probe_segment.py") == 2 and \
        log.count("probe_multilabel.py") == 2
    # another command into the same folders: refused before anything runs, both commands named
    assert reproduce.main(["--quick", "--out-dir", str(out), "--extra", "--lr 5e-4"]) == 2
    assert os.path.getmtime(run / "pretrain" / "ckpt.pt") == stamp


def test_the_random_init_row_is_probed_without_pretraining(demo_dir, tmp_path, monkeypatch):
    # the main table's first row has no pretraining: its probes run on --random-init at the preset's model,
    # the run is recorded as done, and the same command again (or --report) finds it finished
    monkeypatch.chdir(demo_dir)
    out = tmp_path / "repro"
    argv = ["--table", "main", "--rows", "random init", "--probes", "ml", "--probe-flags", "--epochs 2",
            "--out-dir", str(out)]
    assert reproduce.main(argv + ["--seeds", "0"]) == 0
    run = out / "demo" / "random-init" / "seed0"
    record = json.loads((run / "run.json").read_text())
    assert record["pretrain"]["cmd"] is None and record["pretrain"]["done"] and not (run / "pretrain").exists()
    assert record["probes"]["ml"]["cmd"][:4] == ["probe_multilabel.py", "--random-init", "--model", "vit_demo"]
    made = (run / "ml.json").stat().st_mtime_ns
    assert reproduce.main(argv + ["--seeds", "0"]) == 0 and (run / "ml.json").stat().st_mtime_ns == made
    assert reproduce.main(argv + ["--report"]) == 0
    result = json.loads((out / "results_main_demo.json").read_text())
    assert [r["row"] for r in result["rows"]] == ["random init"] and 0 <= result["rows"][0]["mAP"][0] <= 100


def test_folders_of_another_command_are_refused_naming_both(demo_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(demo_dir)
    out = tmp_path / "repro"
    folder = out / "quick" / "simclr-gap" / "seed1"
    os.makedirs(folder)
    (folder / "run.json").write_text(json.dumps({"pretrain": {"cmd": ["pretrain.py", "--lam", "0"], "done": True,
                                                              "attempts": []}, "probes": {}}))
    # --quick --seeds 0 1 on the command line looks at both seeds (seed 1's folder holds another run)
    monkeypatch.setattr(sys, "argv", ["reproduce.py", "--quick", "--seeds", "0", "1", "--out-dir", str(out)])
    assert reproduce.main() == 2
    err = capsys.readouterr().err
    assert "seed1: its pretrain was\n    pretrain.py --lam 0\n  this command's is\n    pretrain.py --preset demo" \
        in err and "seed0" not in err
    os.makedirs(out / "quick" / "denseclppstar-gap" / "seed0" / "pretrain")  # made without a record
    assert reproduce.main(["--quick", "--seeds", "0", "--out-dir", str(out)]) == 2
    assert "without run.json" in capsys.readouterr().err


def quick_row(out):
    return [sys.executable, os.path.join(HERE, "reproduce.py"), "--quick", "--rows", "SimCLR gap", "--probes", "ml",
            "--threads", "1", "--extra", "--max-steps 40 --ckpt-every 20 --log-every 2", "--out-dir", str(out)]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_a_killed_table_continues_to_the_numbers_of_an_uninterrupted_one(demo_dir, tmp_path):
    """SIGKILL of the harness and its pretraining (the process group, as a lost machine) at step 4 (no
    checkpoint yet), the same command, SIGKILL again at step 22 (checkpoint of step 20), the same command: the
    pretraining starts again, then resumes at step 20, and the run ends with the weights and probe numbers of an
    uninterrupted one."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    uninterrupted = subprocess.Popen(quick_row(straight), cwd=demo_dir, env=ENV, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)  # beside the killed runs (one thread each)
    run = killed / "quick" / "simclr-gap" / "seed0"
    log = run / "pretrain" / "log.jsonl"
    for kill_after in (4, 22):
        proc = subprocess.Popen(quick_row(killed), cwd=demo_dir, env=ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        while not (log.exists() and any(line.endswith("\n") and json.loads(line)["step"] >= kill_after
                                        for line in open(log))):  # (a line being written is not read)
            assert proc.poll() is None, "the run ended before the kill"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert not (run / "ml.json").exists()
        assert (run / "pretrain" / "ckpt.pt").exists() == (kill_after > 20)
    assert subprocess.run(quick_row(killed), cwd=demo_dir, env=ENV, capture_output=True).returncode == 0
    assert "resumed at step 20" in (run / "log.txt").read_text()
    assert uninterrupted.wait(timeout=300) == 0
    a, b = (torch.load(d / "quick" / "simclr-gap" / "seed0" / "pretrain" / "ckpt.pt", weights_only=True)
            for d in (straight, killed))
    assert a["step"] == b["step"] == 40
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], rtol=1e-5, atol=1e-6), k
    ml = [json.loads((d / "quick" / "simclr-gap" / "seed0" / "ml.json").read_text()) for d in (straight, killed)]
    assert ml[0]["mAP"] == pytest.approx(ml[1]["mAP"], abs=1e-3)
    record = json.loads((run / "run.json").read_text())
    assert len(record["pretrain"]["attempts"]) == 3 and "exit" not in record["pretrain"]["attempts"][0]


@pytest.mark.parametrize("table,n", [("main", 11), ("agg-pair", 5), ("lambda", 10),
                                     ("negatives", 36), ("recon", 7), ("controls", 19)])
def test_tables_have_their_rows_and_references(table, n):
    rows = reproduce.rows_of(table)
    names = [name for name, _, _ in rows]
    assert len(rows) == n and len({reproduce.slug(name) for name in names}) == n
    assert all(ref is None or ref in names for _, _, ref in rows)
    flags = {name: f for name, f, _ in rows}
    for name, f, ref in rows:  # no flag given twice; a controlled row differs from its method's row in one flag
        options = [a for a in f or [] if a.startswith("--")]
        assert len(options) == len(set(options)), name
        if table == "controls" and ref is not None and name.split()[0] == ref.split()[0]:
            assert 1 <= len(set(f) - set(flags[ref])) <= 2 and len(set(flags[ref]) - set(f)) <= 1, name


def test_cross_view_negatives_keep_the_posters_share_of_tokens(capsys):
    star = dict(zip(*[iter(dict((r[0], r[1]) for r in reproduce.rows_of("main", tokens=64))["DenseCL++* gap"])] * 2))
    assert star["--N"] == "21" and star["--M"] == "256" and star["--beta"] == "0.5"
    Ns = {dict(zip(*[iter(f)] * 2))["--N"] for _, f, _ in reproduce.rows_of("negatives", tokens=64)}
    assert Ns == {"0", "5", "10", "21"}
    assert reproduce.main(["--rows", "SimCLR gap", "no such row"]) == 2
    assert "--rows ['no such row']" in capsys.readouterr().err


def test_oracle_stuff_goes_to_the_oracle_rows_only():
    args = reproduce.get_args_parser().parse_args(["--table", "controls", "--oracle-stuff", "stuff.json"])
    args.recipe, args.nproc_per_node = "coco", 1
    rows = [(name, flags) for name, flags, _ in reproduce.rows_of("controls", tokens=196)]
    for name, flags in rows:
        argv = reproduce.pretrain_cmd(args, flags, 0, "out")[1]
        stuff = [argv[k + 1] for k, a in enumerate(argv) if a == "--oracle-stuff"]
        assert stuff == (["stuff.json"] if "--oracle-negatives" in flags else []), name
    assert sum("--oracle-negatives" in f for _, f in rows) == 3


def test_plot_text_keeps_its_spaces():
    """PIL's own font draws a space 2-3 px wide ("SimCLRcls" in the old plots); text() a third of the font
    size, with the bitmap font (no FreeType) too."""
    fonts = [visualize.font()] + ([ImageFont.load_default_imagefont()]
                                  if hasattr(ImageFont, "load_default_imagefont") else [])

    def ink_width(s, fnt, ours):
        img = Image.new("L", (300, 30), 0)
        draw = ImageDraw.Draw(img)
        visualize.text(draw, (5, 5), s, fnt, fill=255) if ours else draw.text((5, 5), s, fill=255, font=fnt)
        cols = np.nonzero(np.asarray(img).max(0))[0]
        return cols[-1] - cols[0]
    for fnt in fonts:
        joined = ink_width("SimCLRcls", fnt, False)
        assert ink_width("SimCLRcls", fnt, True) == joined
        assert ink_width("SimCLR cls", fnt, True) - joined >= 4
