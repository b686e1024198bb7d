"""
Stopping and resuming pretrain.py without losing a step: SIGKILL and --resume, SIGTERM/SIGUSR1 (pre-emption),
torchrun restarting a killed worker on two nodes, the flags a checkpoint brings back, checkpoints refused (NaN,
a pickle that runs code, another architecture), a non-finite loss that keeps the last good checkpoint, and the
epoch snapshots. Each resumed run must end with the weights of the uninterrupted one.
"""
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch

import config
import pretrain
import rundir
import vit
from conftest import (GUIDED, HERE, TINY, error_of, free_port, losses_by_step, make_images, run_pretrain,
                      small_run, weights)

OBJ = ["--neg", "guided", "--beta", "0.5", "--N", "3", "--gamma", "0.1", "--decoder", "transformer"]


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


def test_configure_reports_what_the_preset_and_the_checkpoint_changed(tmp_path, capsys):
    images, out = small_run(tmp_path, extra=["--lam", "0.3", "--tau-d", "0.1"])
    argv = TINY + GUIDED + ["--data", images, "--batch-size", "4", "--max-steps", "3", "--out-dir", str(out),
                            "--resume", "--tau-d", "0.25"]
    args, ckpt, changed = config.configure(argv)
    assert ("checkpoint", "lam", 0.5, 0.3) in changed and args.lam == 0.3 and ckpt["step"] == 2
    assert args.tau_d == 0.25 and not [c for c in changed if c[1] == "tau_d"]  # the command line wins
    assert pretrain.main(argv) == 0
    assert "checkpoint: --lam 0.3 (command-line default 0.5)" in capsys.readouterr().out


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
