"""
pretrain.py end to end on a tiny ViT: configuration (presets, checkpoint flags, refused flags), the schedule,
full runs in 1 process and under torchrun with 2, compiled == eager, kill and resume, bad images, bad
checkpoints, an unwritable or full disk, non-finite losses.
"""
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import config
import pretrain
import pretrainer
import rundir
import vit
from conftest import (GUIDED, HERE, TINY, error_of, free_port, inductor_works_on_cpu, labelled_images,
                      losses_by_step, make_images, run_pretrain, small_run, tiny_trainer, weights)

OBJ = ["--neg", "guided", "--beta", "0.5", "--N", "3", "--gamma", "0.1", "--decoder", "transformer"]

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

def test_sigkill_and_resume_continue_exactly(tmp_path):
    images = make_images(tmp_path / "imgs", n=20)
    common = TINY + ["--M", "4"] + OBJ + [
        "--data", images, "--batch-size", "4", "--max-steps", "12", "--ckpt-every", "3"
    ]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    r = run_pretrain(common + ["--out-dir", str(straight)])
    assert r.returncode == 0, r.stderr
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "pretrain.py")] + common
                            + ["--out-dir", str(broken)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=HERE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    # kill in the middle of epoch 2 (5 steps an epoch), after the checkpoint of step 6
    for line in proc.stdout:
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

class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_resume_refuses_bad_checkpoints(tmp_path, capsys):
    images, out = small_run(tmp_path)
    good = torch.load(out / "ckpt.pt", weights_only=True)
    resume = TINY + GUIDED + [
        "--data", images, "--batch-size", "4", "--max-steps", "4", "--out-dir",
        str(out), "--resume"
    ]
    capsys.readouterr()

    nan = {**good, "model": {k: v.clone() for k, v in good["model"].items()}}
    nan["model"]["blocks.0.attn.qkv.weight"][0, 0] = float("nan")
    torch.save(nan, out / "ckpt.pt")
    before = (out / "ckpt.pt").read_bytes()
    assert "non-finite" in error_of(pretrain.main, resume, capsys)
    assert (out / "ckpt.pt").read_bytes() == before

    with open(out / "ckpt.pt", "wb") as fh:
        pickle.dump({"model": Evil(tmp_path / "pwned")}, fh, protocol=2)
    assert "not a readable checkpoint" in error_of(pretrain.main, resume, capsys)
    assert not (tmp_path / "pwned").exists()

    torch.save(good, out / "ckpt.pt")
    # another architecture
    err = error_of(pretrain.main, resume[:-1] + ["--resume", "--model", "vit_demo", "--img-size", "32"], capsys)
    assert "does not fit this model" in err and "blocks.2" in err

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

def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, capsys):
    images, out = small_run(tmp_path)
    before = (out / "ckpt.pt").read_bytes()
    capsys.readouterr()
    assert pretrain.main(TINY + GUIDED + ["--data", images, "--batch-size", "4", "--max-steps", "30",
                                          "--out-dir", str(out), "--resume", "--lr", "1e30",
                                          "--ckpt-every", "1000"]) == 3
    err = capsys.readouterr().err
    assert "non-finite loss" in err and "left as it was" in err
    assert (out / "ckpt.pt").read_bytes() == before
    ckpt = rundir.load_checkpoint(str(out / "ckpt.pt"))  # still a good one
    assert ckpt["step"] == 2


# ------------------------------------------------------------------------------------------------------------
# draws, configuration overrides, pre-emption, restarts, the online probe, clipping and snapshots

def test_step_draws_are_a_function_of_seed_and_step():
    args = config.resolve_args(TINY + GUIDED + ["--data", "unused", "--beta", "0.5"])
    model, _, _, x = tiny_trainer(args)

    def draws(seed, step):
        return model.draws(x, pretrain.step_generator(seed, step, torch.device("cpu")))[2]["sets"]
    assert torch.equal(draws(0, 3), draws(0, 3))
    assert not torch.equal(draws(0, 3), draws(0, 4)) and not torch.equal(draws(0, 3), draws(1, 3))


def test_configure_reports_what_the_preset_and_the_checkpoint_changed(tmp_path, capsys):
    images, out = small_run(tmp_path, extra=["--lam", "0.3", "--tau-d", "0.1"])
    argv = TINY + GUIDED + ["--data", images, "--batch-size", "4", "--max-steps", "3", "--out-dir", str(out),
                            "--resume", "--tau-d", "0.25"]
    args, ckpt, changed = config.configure(argv)
    assert ("checkpoint", "lam", 0.5, 0.3) in changed and args.lam == 0.3 and ckpt["step"] == 2
    assert args.tau_d == 0.25 and not [c for c in changed if c[1] == "tau_d"]  # the command line wins
    assert pretrain.main(argv) == 0
    assert "checkpoint: --lam 0.3 (command-line default 0.5)" in capsys.readouterr().out


def test_sigterm_stops_with_a_checkpoint_and_resume_equals_uninterrupted(tmp_path):
    """SIGTERM (and SIGUSR1) finish the step, write ckpt.pt and exit 75; --resume then ends exactly where the
    uninterrupted run ends."""
    images = make_images(tmp_path / "imgs", n=20)
    common = TINY + GUIDED + ["--data", images, "--batch-size", "4", "--max-steps", "12",
                              "--ckpt-every", "100"]
    assert run_pretrain(common + ["--out-dir", str(tmp_path / "straight")]).returncode == 0
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        out = tmp_path / f"stopped_{sig.name}"
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "pretrain.py")] + common
                                + ["--out-dir", str(out)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=HERE,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        for line in proc.stdout:
            if line.startswith("step 5/"):
                proc.send_signal(sig)
                break
        rest = proc.stdout.read()
        assert proc.wait(timeout=120) == pretrain.EXIT_STOPPED, rest
        assert "stopped by a signal" in rest
        stopped_at = torch.load(out / "ckpt.pt", weights_only=True)["step"]
        assert 5 <= stopped_at < 12
        r = run_pretrain(common + ["--out-dir", str(out), "--resume"])
        assert r.returncode == 0 and f"resumed at step {stopped_at}" in r.stdout, r.stderr
        (wa, _), (wb, _) = weights(tmp_path / "straight"), weights(out)
        for k in wa:
            assert torch.allclose(wa[k].float(), wb[k].float(), rtol=1e-5, atol=1e-6), k


def test_torchrun_restarts_a_killed_worker_from_the_checkpoint(tmp_path):
    """torchrun with --resume on two nodes as users meet them (two agents on this machine, --nnodes 2
    --rdzv-backend c10d, one worker each), a worker killed (SIGKILL) at step 7 on either node: the group
    restarts from the checkpoint of step 5 and ends with the weights of an uninterrupted run. The agent of the
    killed worker counts a restart and the other restarts on the membership change without counting one, so
    their TORCHELASTIC_RESTART_COUNT differ (keying the group's store by it hung in 3 of 5 tries). One node
    runs the same code (pretrain.fresh_group_store), as does the SIGTERM run below."""
    images = make_images(tmp_path / "imgs", n=24)
    common = [os.path.join(HERE, "pretrain.py")] + TINY + [
        "--M", "4", "--N", "15", "--data", images, "--batch-size", "4", "--max-steps", "10", "--ckpt-every", "5",
        "--resume"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def torchrun(out, restarts, nodes=(["--standalone", "--nproc_per_node", "2"],), tag=""):
        return [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--max-restarts", str(restarts)]
                                 + node + common + ["--out-dir", str(out)], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, cwd=HERE,
                                 env={**env, "TEST_RUN_TAG": tag}) for node in nodes]

    def kill_at_step_7(procs, out, rank):
        log = out / "log.jsonl"  # rank 0 logs every step (whichever agent runs it)
        while not (log.exists() and any(line.endswith("\n") and json.loads(line)["step"] >= 7 for line in open(log))):
            assert all(p.poll() is None for p in procs), "a run ended before step 7"
            time.sleep(0.05)
        os.kill(worker_pid(str(out), rank=rank), signal.SIGKILL)
        outs = [p.communicate(timeout=300)[0] for p in procs]
        return [p.returncode for p in procs], "\n".join(outs)

    straight, = torchrun(tmp_path / "straight", 0)
    assert straight.wait(timeout=300) == 0, straight.stdout.read()
    port = free_port()
    two_nodes = [["--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                  f"127.0.0.1:{port}", "--rdzv-id", f"test{port}"]] * 2
    for name, rank in [("kill_rank1", 1), ("kill_rank0", 0)]:
        out = tmp_path / name
        nodes = [node[:-1] + [f"{name}{port}"] for node in two_nodes]  # a new rendezvous id per run
        procs = torchrun(out, 1, nodes, tag=str(out))
        codes, log = kill_at_step_7(procs, out, rank)
        assert codes == [0] * len(procs), (name, log)
        assert "resumed at step 5" in log, (name, log)
        (wa, ca), (wb, cb) = weights(tmp_path / "straight"), weights(out)
        assert ca["step"] == cb["step"] == 10
        for k in wa:
            assert torch.allclose(wa[k].float(), wb[k].float(), rtol=1e-5, atol=1e-6), (name, k)
    # SIGTERM to torchrun (what a SLURM script passes on): its agent signals the workers, which stop together
    # at their next log step (--log-every 1 here) with a checkpoint; --resume then ends where the straight run
    # ends
    out = tmp_path / "terminated"
    proc, = torchrun(out, 1)
    for line in proc.stdout:
        if line.startswith("step 3/"):
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.stdout.read()
    proc.wait(timeout=300)
    assert "stopped by a signal" in rest, rest
    assert 3 <= torch.load(out / "ckpt.pt", weights_only=True)["step"] < 10
    resumed, = torchrun(out, 0)
    assert resumed.wait(timeout=300) == 0, resumed.stdout.read()
    (wa, _), (wb, _) = weights(tmp_path / "straight"), weights(out)
    assert all(torch.allclose(wa[k].float(), wb[k].float(), rtol=1e-5, atol=1e-6) for k in wa)


def worker_pid(tag, rank):
    """The pid of the first attempt's pretrain.py worker of `rank` among the processes started with
    TEST_RUN_TAG."""
    for entry in os.listdir("/proc"):
        try:
            env = open(f"/proc/{entry}/environ", "rb").read().split(b"\0")
        except (OSError, ValueError):
            continue
        if f"TEST_RUN_TAG={tag}".encode() in env and f"RANK={rank}".encode() in env and \
                b"TORCHELASTIC_RESTART_COUNT=0" in env:
            return int(entry)
    raise AssertionError(f"no worker of rank {rank} found")


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


def test_keep_every_keeps_snapshots_the_probes_read(tmp_path):
    images = make_images(tmp_path / "imgs", n=8)
    out = tmp_path / "run"
    r = run_pretrain(TINY + GUIDED + ["--data", images, "--batch-size", "4", "--epochs", "4", "--keep-every",
                                      "2", "--out-dir", str(out)])
    assert r.returncode == 0, r.stderr
    assert sorted(f for f in os.listdir(out) if f.startswith("ckpt_epoch")) == ["ckpt_epoch0002.pt",
                                                                                 "ckpt_epoch0004.pt"]
    last, _ = vit.load_backbone(str(out / "ckpt_epoch0004.pt"))
    final = torch.load(out / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(last.state_dict()[k], final[k]) for k in final)
    assert torch.load(out / "ckpt_epoch0002.pt", weights_only=True)["epoch"] == 2


def test_oracle_and_its_shuffled_control_end_to_end(tmp_path, capsys):
    """--oracle-negatives on a demo-layout set reaches the loss from pretrain.py (the first step's loss differs
    from the same run without it), and --oracle-shuffle, its control, gives a third first-step loss. The same
    images given as their COCO json: the same plain run, and the oracle reads the json's annotations."""
    import demo
    root = demo.make_demo(str(tmp_path / "demo"), n_train=8, n_val=1)
    first, folder, json_path = {}, f"{root}/images/train", f"{root}/annotations/instances_train.json"
    for name, images, flags in (("plain", folder, []), ("oracle", folder, ["--oracle-negatives"]),
                                ("shuffled", folder, ["--oracle-negatives", "--oracle-shuffle"]),
                                ("coco plain", json_path, []), ("coco oracle", json_path, ["--oracle-negatives"])):
        out = tmp_path / name
        assert pretrain.main(TINY + ["--data", images, "--batch-size", "4", "--max-steps", "1",
                                     "--neg", "random", "--N", "0", "--out-dir", str(out)] + flags) == 0
        first[name] = losses_by_step(out)[1]
    assert "oracle_negatives=True oracle_shuffle=True" in capsys.readouterr().out
    assert len({first["plain"], first["oracle"], first["shuffled"]}) == 3, first
    assert first["coco plain"] == first["plain"] and first["coco oracle"] != first["plain"], first
    base = TINY + ["--batch-size", "4", "--max-steps", "1", "--neg", "random", "--N", "0"]
    stuff = ["--oracle-stuff", json_path]  # (the flag's checks; its classes: test_oracle.py)
    assert "--oracle-negatives" in error_of(pretrain.main, base + ["--data", json_path, "--out-dir",
                                                                   str(tmp_path / "e1")] + stuff, capsys)
    assert "not to a folder" in error_of(pretrain.main, base + ["--data", folder, "--out-dir", str(tmp_path / "e2"),
                                                                "--oracle-negatives"] + stuff, capsys)
