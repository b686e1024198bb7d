"""
pretrain.py on a tiny ViT: every loss configuration takes optimizer steps without NaN and changes the weights; the
learning-rate schedule and weight-decay groups; a full run (1 process and torchrun with 2) writes a checkpoint the
probes accept.
"""
import importlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

import losses
import pretrain
import vit

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ["--model", "vit_test", "--img-size", "32", "--head-hidden", "32", "--head-out", "16", "--M", "4", "--N", "3",
        "--workers", "0", "--log-every", "1", "--lr", "1e-3", "--warmup", "0"]

CONFIGS = {
    "simclr": ["--lam", "0"],
    "densecl": ["--neg", "densecl", "--N", "0"],
    "random": ["--neg", "random", "--N", "0"],
    "guided_beta": ["--neg", "guided", "--beta", "0.5", "--N", "0"],
    "guided_beta_N": ["--neg", "guided", "--beta", "0.5", "--N", "3"],
    "recon_conv": ["--gamma", "0.5", "--decoder", "conv"],
    "recon_transformer": ["--gamma", "0.5", "--decoder", "transformer"],
    "cls_head_pairing": ["--agg", "cls", "--pair", "head", "--neg", "all"],
}


def make_images(folder, n=16, size=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        arr = (torch.rand(size, size + 4 * (i % 3), 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(os.path.join(folder, f"img{i:03d}.png" if i % 2 else f"img{i:03d}.jpg"))
    return str(folder)


def tiny_trainer(args):
    """A Pretrainer seeded with 0, a copy of its initial state, an AdamW and a batch of 2 x 6 random 32 px views."""
    torch.manual_seed(0)
    model = pretrain.Pretrainer(args)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    return model, before, torch.optim.AdamW(pretrain.param_groups(model, 0.05), lr=1e-3), torch.randn(12, 3, 32, 32)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_each_objective_trains(name):
    args = pretrain.resolve_args(TINY + CONFIGS[name] + ["--data", "unused"])
    model, before, opt, x = tiny_trainer(args)
    for step in range(3):
        _, _, draws = pretrain.step_draws(args, x, pretrain.step_generator(0, step, torch.device("cpu")))
        loss, terms = pretrain.objective(model(x), x, args, draws)
        assert torch.isfinite(loss) and all(torch.isfinite(v) for v in terms.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert ("dense" in terms) == (args.lam > 0) and ("recon" in terms) == (args.gamma > 0)
    after = model.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any(k.startswith("backbone.blocks.0.attn.qkv") for k in changed)
    assert any(k.startswith("global_head") for k in changed)
    if args.lam > 0:
        assert any(k.startswith("dense_head") for k in changed)
    if args.gamma > 0:
        assert any(k.startswith("decoder") for k in changed)


def test_lr_schedule_and_weight_decay_groups():
    assert pretrain.lr_at(0, 1.0, 10, 100) == pytest.approx(0.1)
    assert pretrain.lr_at(9, 1.0, 10, 100) == pytest.approx(1.0)
    assert pretrain.lr_at(55, 1.0, 10, 100) == pytest.approx(0.5)  # half-way through the cosine
    assert pretrain.lr_at(100, 1.0, 10, 100) == pytest.approx(0.0, abs=1e-12)
    model = pretrain.Pretrainer(pretrain.resolve_args(TINY + ["--data", "unused"]))
    decay, no_decay = pretrain.param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    assert {"backbone.cls_token", "backbone.pos_embed", "backbone.norm.weight", "backbone.blocks.0.attn.qkv.bias"} <= nd
    assert all(p.ndim == 2 or p.ndim == 4 for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def run_pretrain(argv, nproc=1, timeout=300):
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
           if nproc > 1 else [sys.executable]) + [os.path.join(HERE, "pretrain.py")] + argv
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=HERE, env=env)


@pytest.mark.parametrize("nproc", [1, 2])
def test_end_to_end_run_writes_a_usable_checkpoint(tmp_path, nproc):
    images = make_images(tmp_path / "imgs")
    out = tmp_path / "run"
    r = run_pretrain(TINY + ["--data", images, "--batch-size", str(8 // nproc), "--max-steps", "4",
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
    r = run_pretrain(TINY + ["--data", images, "--max-steps", "2", "--out-dir", str(out)])
    assert r.returncode == 2 and "--resume" in r.stderr
    assert os.path.getmtime(out / "ckpt.pt") == mtime


def inductor_works_on_cpu():
    """Whether this machine can build inductor's CPU kernels at all (a C++ compiler and Python headers)."""
    if shutil.which("g++") is None:
        return False
    try:
        return torch.equal(torch.compile(lambda x: x * 2 + 1)(torch.ones(3)), torch.full((3,), 3.0))
    except Exception:  # the environment, not our code: reported as a skip
        return False


def test_compiled_run_equals_eager(tmp_path):
    """--compile on (the CUDA default) through inductor's CPU backend: model and photometric ops compiled, the same
    losses and weights as the eager run up to float reassociation."""
    if not inductor_works_on_cpu():
        pytest.skip("torch.compile cannot build CPU kernels here (needs g++ and the Python headers)")
    images = make_images(tmp_path / "imgs")
    runs = {}
    for mode in ("off", "on"):
        out = tmp_path / mode
        r = run_pretrain(TINY + ["--data", images, "--batch-size", "8", "--max-steps", "3", "--out-dir", str(out),
                                 "--compile", mode, "--neg", "guided", "--beta", "0.5"])
        assert r.returncode == 0, r.stdout + r.stderr
        runs[mode] = ([json.loads(line)["loss"] for line in open(out / "log.jsonl")],
                      torch.load(out / "ckpt.pt", weights_only=True)["model"])
    (eager, w_eager), (compiled, w_compiled) = runs["off"], runs["on"]
    assert compiled == pytest.approx(eager, rel=1e-4)
    for k in w_eager:
        assert torch.allclose(w_compiled[k], w_eager[k], atol=1e-4), k


# ----------------------------------------------------------------------------------------------------------------------
# the objective's weights, the flags, the compiled step

def test_objective_is_the_weighted_sum_of_its_terms():
    """L = (1-lam)*global + lam*dense + gamma*recon + mu*montage, each term computed here on its own from the model's
    outputs, with weights other than 0 and 1 and a different temperature for every term."""
    args = pretrain.resolve_args(TINY + ["--data", "unused", "--lam", "0.3", "--gamma", "0.7", "--mu", "0.6",
                                         "--montage", "--montage-r", "2", "4", "--tau-g", "0.1", "--tau-d", "0.3",
                                         "--tau-m", "0.45", "--neg", "guided", "--beta", "0.2", "--recon", "l1"])
    model, _, _, x = tiny_trainer(args)
    canvases, labels, draws = pretrain.step_draws(args, x, pretrain.step_generator(0, 0, torch.device("cpu")))
    out = model(x, canvases)
    loss, terms = pretrain.objective(out, x, args, draws, labels)
    u, z, f, x_hat, cells = out
    B = x.shape[0] // 2
    glob = losses.nt_xent(u[:B], u[B:], 0.1)
    dense = losses.dense_loss(z[:B], z[B:], f[:B], f[B:], tau=0.3, negatives="guided", M=4, beta=0.2, N=3,
                              draws=draws)
    recon = (x_hat - x).abs().mean()
    montage = 0
    for w, c, lab in zip((2 / 3, 1 / 3), cells, labels):  # 1/2, 1/4 normalised to sum 1
        lab, h = lab.reshape(-1), c.shape[0] // 2
        montage = montage + w * (losses.montage_loss(c[:h], u[B:], lab[:h], 0.45) +
                                 losses.montage_loss(c[h:], u[:B], lab[h:], 0.45)) / 2
    for name, want in (("global", glob), ("dense", dense), ("recon", recon), ("montage", montage)):
        assert torch.allclose(terms[name], want, atol=1e-6), name
    assert torch.allclose(loss, 0.7 * glob + 0.3 * dense + 0.7 * recon + 0.6 * montage, atol=1e-6)


@pytest.mark.parametrize("module,argv", [("pretrain", ["--batch", "32"]), ("pretrain", ["--lam-w", "3"]),
                                         ("bench", ["--batch", "4"]), ("probe_multilabel", ["--ep", "2"]),
                                         ("probe_segment", ["--ep", "2"])])
def test_abbreviated_flags_are_refused(module, argv, capsys):
    """argparse would take --batch for --batch-size, unseen by explicit_flags, and the demo preset would replace it."""
    parser = importlib.import_module(module).parser
    with pytest.raises(SystemExit) as e:
        parser.parse_args(argv)
    assert e.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


@pytest.mark.parametrize("flags,named", [
    (["--neg", "random", "--beta", "0.3"], "--beta"), (["--neg", "densecl", "--M", "8"], "--M"),
    (["--neg", "all", "--score-tokens", "4"], "--score-tokens"), (["--lam", "0", "--N", "3"], "--N"),
    (["--beta", "-2", "--score-tokens", "4"], "--score-tokens"), (["--N", "0", "--xv-exclude", "2"], "--xv-exclude"),
    (["--norm-pix"], "--norm-pix"), (["--montage-r", "2"], "--montage-r"), (["--ccrop-k", "0.2"], "--ccrop-k")])
def test_flags_that_do_nothing_are_errors(tmp_path, flags, named, capsys):
    images = make_images(tmp_path / "imgs", n=8)
    base = [a for i, a in enumerate(TINY) if a not in ("--M", "--N") and TINY[i - 1] not in ("--M", "--N")]
    code = pretrain.main(base + ["--data", images, "--max-steps", "1", "--out-dir", str(tmp_path / "o")] + flags)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: {named} ") and "Traceback" not in err, err
    assert not os.path.exists(tmp_path / "o" / "ckpt.pt")


def test_lam_warmup_logs_the_weight_in_force(tmp_path):
    """--lam-warmup 2: steps 1-2 train the global loss alone (lam 0), steps 3-4 with lam; each logged loss is the
    weighted sum of its logged terms with the weight of its step."""
    images = make_images(tmp_path / "imgs")
    out = tmp_path / "run"
    r = run_pretrain(TINY + ["--data", images, "--batch-size", "8", "--max-steps", "4", "--out-dir", str(out),
                             "--lam", "0.4", "--lam-warmup", "2"])
    assert r.returncode == 0, r.stdout + r.stderr
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [rec["lam"] for rec in log] == [0.0, 0.0, 0.4, 0.4]
    for rec in log:
        assert rec["loss"] == pytest.approx((1 - rec["lam"]) * rec["global"] + rec["lam"] * rec["dense"], abs=2e-6)


STEP_CONFIGS = {"SimCLR": ["--lam", "0"], "DenseCL++*": ["--neg", "guided", "--beta", "0.5"],
                "scored tokens": ["--neg", "guided", "--beta", "0.5", "--score-tokens", "4"],
                "all + recon": ["--neg", "all", "--gamma", "0.3", "--decoder", "transformer"],
                "montage": ["--neg", "random", "--montage", "--montage-r", "2", "4", "--montage-block-attn"]}


@pytest.mark.parametrize("name", sorted(STEP_CONFIGS))
def test_step_compiles_as_one_graph(name):
    """The forward and the objective trace without a graph break (every draw is made before them), so fullgraph=True
    compiles them as one graph."""
    args = pretrain.resolve_args(TINY + ["--data", "unused"] + STEP_CONFIGS[name])
    model, _, _, x = tiny_trainer(args)
    canvases, labels, draws = pretrain.step_draws(args, x, pretrain.step_generator(0, 0, torch.device("cpu")))
    torch._dynamo.reset()
    region = pretrain.make_loss_fn(model, args, torch.bfloat16, use_compile=False)
    explained = torch._dynamo.explain(region)(x, canvases, labels, draws, torch.full((), args.lam))
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


def test_compiled_step_equals_eager():
    """pretrain.compiled_parts with fullgraph=True through inductor's CPU backend: the losses and weights of three
    steps equal the eager ones up to float reassociation (plain SGD: AdamW would turn the sign of a gradient of ~0
    that differs in the last bits into a step of lr)."""
    if not inductor_works_on_cpu():
        pytest.skip("torch.compile cannot build CPU kernels here (needs g++ and the Python headers)")
    args = pretrain.resolve_args(TINY + ["--data", "unused", "--neg", "guided", "--beta", "0.5", "--score-tokens", "4",
                                         "--lam-warmup", "1"])
    runs = []
    for use_compile in (False, True):
        torch._dynamo.reset()
        model, _, _, x = tiny_trainer(args)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loss_fn, _ = pretrain.compiled_parts(model, args, None, use_compile)
        runs.append(([pretrain.train_step(loss_fn, opt, x, args, s)[0].item() for s in range(3)], model.state_dict()))
    (eager, w_eager), (compiled, w_compiled) = runs
    assert compiled == pytest.approx(eager, rel=1e-4)
    for k in w_eager:
        assert torch.allclose(w_compiled[k], w_eager[k], atol=1e-4), k
