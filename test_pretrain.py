"""
pretrain.py end to end on a tiny ViT: the schedule, full runs in 1 process and under torchrun with 2, compiled ==
eager, the step's draws, bad images, an unwritable or full disk, the online probe, gradient clipping.
(Stopping, resuming and restarting: test_resume.py; the oracle end to end: test_oracle.py.)
"""
import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import config
import pretrain
import pretrainer
import rundir
import vit
from conftest import (GUIDED, TINY, inductor_works_on_cpu, labelled_images, losses_by_step, make_images,
                      run_pretrain, tiny_trainer, weights)


def test_lr_schedule_and_weight_decay_groups():
    assert pretrain.lr_at(0, 1.0, 10, 100) == pytest.approx(0.1)
    assert pretrain.lr_at(9, 1.0, 10, 100) == pytest.approx(1.0)
    assert pretrain.lr_at(55, 1.0, 10, 100) == pytest.approx(0.5)  # half-way through the cosine
    assert pretrain.lr_at(100, 1.0, 10, 100) == pytest.approx(0.0, abs=1e-12)
    model = pretrainer.Pretrainer(config.resolve_args(TINY + GUIDED + ["--data", "unused"]))
    decay, no_decay = pretrain.param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    assert {"backbone.cls_token", "backbone.pos_embed", "backbone.norm.weight",
            "backbone.blocks.0.attn.qkv.bias"} <= nd
    assert all(p.ndim == 2 or p.ndim == 4 for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))

def test_lam_warmup_logs_the_weight_in_force(tmp_path):
    """--lam-warmup 2: steps 1-2 train the global loss alone (lam 0), steps 3-4 with lam; each logged loss is
    the weighted sum of its logged terms with the weight of its step."""
    images = make_images(tmp_path / "imgs")
    out = tmp_path / "run"
    r = run_pretrain(TINY + GUIDED + ["--data", images, "--batch-size", "8", "--max-steps", "4",
                                      "--out-dir", str(out),
                             "--lam", "0.4", "--lam-warmup", "2"])
    assert r.returncode == 0, r.stdout + r.stderr
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [rec["lam"] for rec in log] == [0.0, 0.0, 0.4, 0.4]
    for rec in log:
        assert rec["loss"] == pytest.approx((1 - rec["lam"]) * rec["global"]
                                            + rec["lam"] * rec["dense"], abs=2e-6)

@pytest.mark.parametrize("nproc", [1, 2])
def test_end_to_end_run_writes_a_usable_checkpoint(tmp_path, nproc):
    images = make_images(tmp_path / "imgs")
    out = tmp_path / "run"
    r = run_pretrain(TINY + GUIDED + ["--data", images, "--batch-size", str(8 // nproc), "--max-steps", "4",
                             "--out-dir", str(out), "--ckpt-every", "2"], nproc=nproc)
    assert r.returncode == 0, r.stdout + r.stderr
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [rec["step"] for rec in log] == [1, 2, 3, 4]
    assert all(rec["loss"] > 0 for rec in log)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 4 and isinstance(ckpt["epoch"], int)
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    model, args = vit.load_backbone(str(out / "ckpt.pt"))
    assert args["model"] == "vit_test" and model.config["embed_dim"] == 32
    # a second run into the same folder without --resume is refused and leaves the checkpoint alone
    mtime = os.path.getmtime(out / "ckpt.pt")
    r = run_pretrain(TINY + GUIDED + ["--data", images, "--max-steps", "2", "--out-dir", str(out)])
    assert r.returncode == 2 and "--resume" in r.stderr
    assert os.path.getmtime(out / "ckpt.pt") == mtime

def test_compiled_run_equals_eager(tmp_path):
    """--compile on (the CUDA default) through inductor's CPU backend: model and photometric ops compiled, the
    same losses and weights as the eager run up to float reassociation."""
    if not inductor_works_on_cpu():
        pytest.skip("torch.compile cannot build CPU kernels here (needs g++ and the Python headers)")
    images = make_images(tmp_path / "imgs")
    runs = {}
    for mode in ("off", "on"):
        out = tmp_path / mode
        r = run_pretrain(TINY + GUIDED + [
            "--data", images, "--batch-size", "8", "--max-steps", "3", "--out-dir",
            str(out), "--compile", mode, "--neg", "guided", "--beta", "0.5"
        ])
        assert r.returncode == 0, r.stdout + r.stderr
        runs[mode] = ([json.loads(line)["loss"] for line in open(out / "log.jsonl")],
                      torch.load(out / "ckpt.pt", weights_only=True)["model"])
    (eager, w_eager), (compiled, w_compiled) = runs["off"], runs["on"]
    assert compiled == pytest.approx(eager, rel=1e-4)
    for k in w_eager:
        assert torch.allclose(w_compiled[k], w_eager[k], atol=1e-4), k

def test_compiled_step_equals_eager():
    """pretrain.compiled_parts with fullgraph=True through inductor's CPU backend: the losses and weights of
    three steps equal the eager ones up to float reassociation (plain SGD: AdamW would turn the sign of a
    gradient of ~0 that differs in the last bits into a step of lr)."""
    if not inductor_works_on_cpu():
        pytest.skip("torch.compile cannot build CPU kernels here (needs g++ and the Python headers)")
    args = config.resolve_args(
        TINY + GUIDED +
        ["--data", "unused", "--neg", "guided", "--beta", "0.5", "--score-tokens", "4", "--lam-warmup", "1"])
    runs = []
    for use_compile in (False, True):
        torch._dynamo.reset()
        model, _, _, x = tiny_trainer(args)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        fwd, _ = pretrain.compiled_parts(model, use_compile)
        losses = [pretrain.train_step(model, fwd, opt, x, args, s, None)[0].item() for s in range(3)]
        runs.append((losses, model.state_dict()))
    (eager, w_eager), (compiled, w_compiled) = runs
    assert compiled == pytest.approx(eager, rel=1e-4)
    for k in w_eager:
        assert torch.allclose(w_compiled[k], w_eager[k], atol=1e-4), k

def test_two_processes_equal_one_process(tmp_path):
    images = make_images(tmp_path / "imgs", n=24)
    # N = T-1 (all partner tokens): the per-rank cross-view draw is the one draw that differs by design
    # (losses.py)
    common = TINY + ["--data", images, "--max-steps", "5", "--neg", "guided", "--M", "4", "--beta",
                     "0.5", "--N", "15"]
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
    r = run_pretrain(TINY + GUIDED + ["--data", str(tmp_path / "imgs"), "--batch-size", "4",
                                      "--max-steps", "10",
                             "--out-dir", str(out)])
    assert r.returncode == 0, r.stdout + r.stderr
    named = {line.rsplit("/", 1)[-1] for line in r.stdout.splitlines() if "skipped unreadable file" in line}
    assert named == unreadable
    last = [json.loads(line) for line in open(out / "log.jsonl")][-1]
    assert last["step"] == 10 and last["skipped"] == len(unreadable)
    assert f"skipped {len(unreadable)} unreadable files" in r.stdout
    skipped = torch.load(out / "ckpt.pt", weights_only=True)["skipped"]
    assert set(os.path.basename(p) for p in skipped) == unreadable

def test_out_dir_unwritable_or_full(tmp_path, monkeypatch, capsys):
    images = make_images(tmp_path / "imgs")
    (tmp_path / "a_file").write_text("x")
    base = TINY + GUIDED + ["--data", images, "--batch-size", "4", "--max-steps", "2"]
    assert pretrain.main(base + ["--out-dir", str(tmp_path / "a_file" / "run")]) == 2
    assert "not writable" in capsys.readouterr().err
    monkeypatch.setattr(rundir.shutil, "disk_usage", lambda p: type("U", (), {"free": 1 << 20})())
    assert pretrain.main(base + ["--out-dir", str(tmp_path / "full")]) == 2
    err = capsys.readouterr().err
    assert "MiB free" in err
    assert not os.path.exists(tmp_path / "full" / "ckpt.pt")
    assert not os.path.exists(tmp_path / "full" / "log.jsonl")

def test_step_draws_are_a_function_of_seed_and_step():
    args = config.resolve_args(TINY + GUIDED + ["--data", "unused", "--beta", "0.5"])
    model, _, _, x = tiny_trainer(args)

    def draws(seed, step):
        return model.draws(x, pretrain.step_generator(seed, step, torch.device("cpu")))[2]["sets"]
    assert torch.equal(draws(0, 3), draws(0, 3))
    assert not torch.equal(draws(0, 3), draws(0, 4)) and not torch.equal(draws(0, 3), draws(1, 3))


def test_online_probe_logs_its_map_and_leaves_the_training_alone(tmp_path):
    """--probe-every 1 on a labelled COCO file: probe_mAP records in log.jsonl at every epoch end, and the
    weights are exactly those of the same run without it."""
    data_json = labelled_images(tmp_path / "coco")
    common = TINY + GUIDED + ["--data", data_json, "--batch-size", "8", "--max-steps", "4"]
    for name, extra in (("plain", []), ("probed", ["--probe-every", "1", "--probe-images", "12"])):
        r = run_pretrain(common + ["--out-dir", str(tmp_path / name)] + extra)
        assert r.returncode == 0, r.stdout + r.stderr
    probes = [rec for rec in map(json.loads, open(tmp_path / "probed" / "log.jsonl")) if "probe_mAP" in rec]
    assert [(p["step"], p["epoch"], p["n_train"], p["n_heldout"])
            for p in probes] == [(2, 1, 6, 6), (4, 2, 6, 6)]
    assert all(0 <= p["probe_mAP"] <= 100 for p in probes)
    (wa, ca), (wb, cb) = weights(tmp_path / "plain"), weights(tmp_path / "probed")
    assert all(torch.equal(wa[k], wb[k]) for k in wa) and torch.equal(ca["rng"]["torch"], cb["rng"]["torch"])
    r = run_pretrain(TINY + GUIDED + ["--data", str(tmp_path / "coco" / "train"), "--probe-every", "1",
                                      "--batch-size", "8", "--out-dir", str(tmp_path / "nolabels")])
    assert r.returncode == 2 and "--probe-every needs labels" in r.stderr


def test_clip_grad_clips_and_reports_the_norm_before_clipping():
    args = config.resolve_args(TINY + GUIDED + ["--data", "unused", "--clip-grad", "0.05"])
    model, _, opt, x = tiny_trainer(args)
    loss, terms = pretrain.train_step(model, model, opt, x, args, 0, None)
    after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()
                                                  if p.grad is not None]))
    model2, _, _, _ = tiny_trainer(args)
    loss2 = model2(x, *model2.draws(x, pretrain.step_generator(0, 0, x.device)), torch.full((), args.lam))[0]
    loss2.backward()
    before = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model2.parameters()
                                                   if p.grad is not None]))
    assert terms["grad_norm"] == pytest.approx(before.item(), rel=1e-5) and before > 0.05
    assert after.item() == pytest.approx(0.05, rel=1e-4)
