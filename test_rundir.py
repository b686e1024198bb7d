"""Tests of rundir.py: atomic checkpoints (a crash or a kill while writing never replaces the last good
one)."""
import os

import pytest
import torch

import rundir
from conftest import GUIDED, TINY, make_images, run_pretrain

def test_crash_during_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    rundir.save_checkpoint(path, {"step": 1, "w": torch.ones(3)})

    def dying_save(obj, fh):
        fh.write(b"PK\x03\x04 half a checkpoint")  # what a kill or a full disk leaves behind
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError):
        rundir.save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
    # the temp file is gone, nothing half-written stands in its place
    assert os.listdir(tmp_path) == ["ckpt.pt"]
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["step"] == 1 and torch.equal(ckpt["w"], torch.ones(3))

def test_killed_writer_leaves_only_a_temp_file(tmp_path):
    """A process killed inside torch.save leaves ckpt.pt.tmp; --resume reads ckpt.pt, never the temp file."""
    images = make_images(tmp_path / "imgs")
    out = tmp_path / "run"
    assert run_pretrain(TINY + GUIDED + ["--data", images, "--batch-size", "4", "--max-steps",
                                         "2", "--out-dir",
                                str(out)]).returncode == 0
    with open(out / "ckpt.pt.tmp", "wb") as fh:
        fh.write(b"garbage from a killed writer")
    r = run_pretrain(TINY + GUIDED + ["--data", images, "--batch-size", "4", "--max-steps", "3",
                                      "--out-dir", str(out),
                             "--resume"])
    assert r.returncode == 0 and "resumed at step 2" in r.stdout, r.stderr
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 3
