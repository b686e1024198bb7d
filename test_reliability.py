"""
Reliability (issue 7): kill and resume, a crash while writing a checkpoint, 1 process == 2 processes, bad images,
bad files given to --resume and to the probes, never clobbering a run, non-finite losses. Tiny model, few steps.
"""
import io
import json
import os
import pickle
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import pretrain
import probe_multilabel
from test_pretrain import HERE, TINY, make_images, run_pretrain

OBJ = ["--neg", "guided", "--beta", "0.5", "--N", "3", "--gamma", "0.1", "--decoder", "transformer"]


def losses_by_step(out_dir):
    """The logged loss of every step; for a step logged twice (before a kill and after the resume) the last one."""
    return {rec["step"]: rec["loss"] for rec in map(json.loads, open(os.path.join(out_dir, "log.jsonl")))}


def weights(out_dir):
    ckpt = torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)
    return {**ckpt["model"], **ckpt["heads"]}, ckpt


# 1. kill -9 at an arbitrary step, then --resume: every later step and the final weights equal the uninterrupted run
def test_sigkill_and_resume_continue_exactly(tmp_path):
    images = make_images(tmp_path / "imgs", n=20)
    common = TINY + OBJ + ["--data", images, "--batch-size", "4", "--max-steps", "12", "--ckpt-every", "3"]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    r = run_pretrain(common + ["--out-dir", str(straight)])
    assert r.returncode == 0, r.stderr
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "pretrain.py")] + common + ["--out-dir", str(broken)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=HERE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in proc.stdout:  # kill in the middle of epoch 2 (5 steps an epoch), after the checkpoint of step 6
        if line.startswith("step 7/"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert torch.load(broken / "ckpt.pt", weights_only=True)["step"] == 6
    r = run_pretrain(common + ["--out-dir", str(broken), "--resume"])
    assert r.returncode == 0, r.stderr
    assert "resumed at step 6" in r.stdout
    a, b = losses_by_step(straight), losses_by_step(broken)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-6, abs=1e-7), step
    wa, ca = weights(straight)
    wb, cb = weights(broken)
    assert ca["step"] == cb["step"] == 12 and ca["epoch"] == cb["epoch"]
    for k in wa:
        assert torch.allclose(wa[k].float(), wb[k].float(), rtol=1e-5, atol=1e-6), k
    for sa, sb in zip(ca["optimizer"]["state"].values(), cb["optimizer"]["state"].values()):
        assert torch.allclose(sa["exp_avg_sq"], sb["exp_avg_sq"], rtol=1e-5, atol=1e-12)


# 2. a crash while writing a checkpoint leaves the previous one loadable; the half-written file is never read
def test_crash_during_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    pretrain.save_checkpoint(path, {"step": 1, "w": torch.ones(3)})

    def dying_save(obj, fh):
        fh.write(b"PK\x03\x04 half a checkpoint")  # what a kill or a full disk leaves behind
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError):
        pretrain.save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # the temp file is gone, nothing half-written stands in its place
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["step"] == 1 and torch.equal(ckpt["w"], torch.ones(3))


def test_killed_writer_leaves_only_a_temp_file(tmp_path):
    """A process killed inside torch.save leaves ckpt.pt.tmp; --resume reads ckpt.pt, never the temp file."""
    images = make_images(tmp_path / "imgs")
    out = tmp_path / "run"
    assert run_pretrain(TINY + ["--data", images, "--batch-size", "4", "--max-steps", "2", "--out-dir",
                                str(out)]).returncode == 0
    with open(out / "ckpt.pt.tmp", "wb") as fh:
        fh.write(b"garbage from a killed writer")
    r = run_pretrain(TINY + ["--data", images, "--batch-size", "4", "--max-steps", "3", "--out-dir", str(out),
                             "--resume"])
    assert r.returncode == 0 and "resumed at step 2" in r.stdout, r.stderr
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 3


# 3. torchrun with 2 processes (gloo) == 1 process with the same global batch and draws
def test_two_processes_equal_one_process(tmp_path):
    images = make_images(tmp_path / "imgs", n=24)
    # N = T-1 (all partner tokens): the per-rank cross-view draw is the one draw that differs by design (losses.py)
    common = TINY + ["--data", images, "--max-steps", "5", "--neg", "guided", "--beta", "0.5", "--N", "15"]
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = run_pretrain(common + ["--batch-size", "8", "--out-dir", str(one)])
    r2 = run_pretrain(common + ["--batch-size", "4", "--out-dir", str(two)], nproc=2)
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr + r2.stderr
    a, b = losses_by_step(one), losses_by_step(two)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-5), step
    wa, _ = weights(one)
    wb, _ = weights(two)
    for k in wa:
        assert torch.allclose(wa[k].float(), wb[k].float(), rtol=1e-4, atol=1e-5), k


# 4. a folder of broken and unusual images trains to the end; the unreadable ones are skipped, counted and named
def bad_folder(folder):
    make_images(folder, n=12)
    buf = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(buf, "JPEG")
    (folder / "truncated.jpg").write_bytes(buf.getvalue()[:300])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("this is not an image")
    Image.new("RGB", (1, 1), (255, 0, 0)).save(folder / "one_pixel.png")
    Image.new("CMYK", (50, 40), (10, 200, 30, 0)).save(folder / "cmyk.jpg")
    Image.fromarray(np.arange(48 * 48, dtype=np.uint16).reshape(48, 48) * 20).save(folder / "sixteen_bit.png")
    Image.new("RGBA", (40, 40), (0, 0, 255, 100)).save(folder / "rgba.png")
    pal = Image.new("P", (40, 40), 3)
    pal.putpalette([i % 256 for i in range(768)])
    pal.info["transparency"] = 3
    pal.save(folder / "palette_transparent.png", transparency=3)
    Image.new("1", (15000, 15000)).save(folder / "bomb.png")  # 225 Mpx > 2x PIL's decompression-bomb limit
    return {"truncated.jpg", "empty.jpg", "notes.jpg", "bomb.png"}


def test_bad_images_are_skipped_counted_and_named(tmp_path):
    unreadable = bad_folder(tmp_path / "imgs")
    out = tmp_path / "run"
    r = run_pretrain(TINY + ["--data", str(tmp_path / "imgs"), "--batch-size", "4", "--max-steps", "10",
                             "--out-dir", str(out)])
    assert r.returncode == 0, r.stdout + r.stderr
    named = {line.rsplit("/", 1)[-1] for line in r.stdout.splitlines() if "skipped unreadable file" in line}
    assert named == unreadable
    last = [json.loads(line) for line in open(out / "log.jsonl")][-1]
    assert last["step"] == 10 and last["skipped"] == len(unreadable)
    assert f"skipped {len(unreadable)} unreadable files" in r.stdout
    assert set(os.path.basename(p) for p in torch.load(out / "ckpt.pt", weights_only=True)["skipped"]) == unreadable


# 5. bad files given to --resume and to the probes: a message, a non-zero exit, nothing executed or overwritten
class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def small_run(tmp_path, name="run", extra=()):
    images = make_images(tmp_path / "imgs")
    out = tmp_path / name
    r = run_pretrain(TINY + ["--data", images, "--batch-size", "4", "--max-steps", "2", "--out-dir", str(out)]
                     + list(extra))
    assert r.returncode == 0, r.stderr
    return images, out


def test_resume_refuses_bad_checkpoints(tmp_path):
    images, out = small_run(tmp_path)
    good = torch.load(out / "ckpt.pt", weights_only=True)
    resume = TINY + ["--data", images, "--batch-size", "4", "--max-steps", "4", "--out-dir", str(out), "--resume"]

    nan = {**good, "model": {k: v.clone() for k, v in good["model"].items()}}
    nan["model"]["blocks.0.attn.qkv.weight"][0, 0] = float("nan")
    torch.save(nan, out / "ckpt.pt")
    before = (out / "ckpt.pt").read_bytes()
    r = run_pretrain(resume)
    assert r.returncode == 2 and "non-finite" in r.stderr and "Traceback" not in r.stderr
    assert (out / "ckpt.pt").read_bytes() == before

    with open(out / "ckpt.pt", "wb") as fh:
        pickle.dump({"model": Evil(tmp_path / "pwned")}, fh)
    r = run_pretrain(resume)
    assert r.returncode == 2 and "not a readable checkpoint" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "pwned").exists()

    torch.save(good, out / "ckpt.pt")
    r = run_pretrain(resume[:-1] + ["--resume", "--model", "vit_demo", "--img-size", "32"])  # another architecture
    assert r.returncode == 2 and "does not fit this model" in r.stderr and "blocks.2" in r.stderr
    assert "Traceback" not in r.stderr


def test_probes_refuse_bad_inputs(tmp_path, capsys):
    _, out = small_run(tmp_path)
    good = torch.load(out / "ckpt.pt", weights_only=True)
    good["model"]["norm.weight"][0] = float("inf")
    torch.save(good, tmp_path / "inf.pt")
    assert probe_multilabel.main([str(tmp_path / "inf.pt")]) == 2
    assert "non-finite" in capsys.readouterr().err
    coco = {"annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 4, 4], "area": 16,
                             "iscrowd": 0, "segmentation": [[0, 0, 4, 0, 4, 4]]}],
            "categories": [{"id": 1, "name": "thing"}]}  # a COCO file without its "images" list
    (tmp_path / "no_images.json").write_text(json.dumps(coco))
    args = [str(out / "ckpt.pt"), "--train-json", str(tmp_path / "no_images.json"), "--train-images", str(tmp_path),
            "--val-json", str(tmp_path / "no_images.json"), "--val-images", str(tmp_path), "--out",
            str(tmp_path / "res.json")]
    assert probe_multilabel.main(args) == 2
    err = capsys.readouterr().err
    assert "images" in err and "Traceback" not in err
    assert not (tmp_path / "res.json").exists()


# 6. an existing run is never clobbered; an unwritable or full out-dir is reported before training
def test_out_dir_unwritable_or_full(tmp_path, monkeypatch, capsys):
    images = make_images(tmp_path / "imgs")
    (tmp_path / "a_file").write_text("x")
    base = TINY + ["--data", images, "--batch-size", "4", "--max-steps", "2"]
    assert pretrain.main(base + ["--out-dir", str(tmp_path / "a_file" / "run")]) == 2
    assert "not writable" in capsys.readouterr().err
    monkeypatch.setattr(pretrain.shutil, "disk_usage", lambda p: type("U", (), {"free": 1 << 20})())
    assert pretrain.main(base + ["--out-dir", str(tmp_path / "full")]) == 2
    err = capsys.readouterr().err
    assert "MiB free" in err
    assert not os.path.exists(tmp_path / "full" / "ckpt.pt") and not os.path.exists(tmp_path / "full" / "log.jsonl")


# 7. a non-finite loss stops the run and leaves the last good checkpoint as it was
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    images, out = small_run(tmp_path)
    before = (out / "ckpt.pt").read_bytes()
    r = run_pretrain(TINY + ["--data", images, "--batch-size", "4", "--max-steps", "30", "--out-dir", str(out),
                             "--resume", "--lr", "1e30", "--ckpt-every", "1000"])
    assert r.returncode == 3, r.stdout + r.stderr
    assert "non-finite loss" in r.stderr and "left as it was" in r.stderr
    assert (out / "ckpt.pt").read_bytes() == before
    ckpt = pretrain.load_checkpoint(str(out / "ckpt.pt"))  # still a good one
    assert ckpt["step"] == 2
