"""Tests of pretrainer.py: every objective trains, the objective is the weighted sum of its separately
computed terms, the montage branch, and the forward (views + draws -> loss) traces as one graph for
torch.compile."""
import pytest
import torch

import config
import losses
import methods
import pretrain
import pretrainer
from conftest import GUIDED, TINY, tiny_trainer

CONFIGS = {
    "simclr": ["--lam", "0"],
    "densecl": ["--neg", "densecl", "--N", "0"],
    "random": ["--neg", "random", "--N", "0"],
    "guided_beta": ["--neg", "guided", "--M", "4", "--beta", "0.5", "--N", "0"],
    "guided_beta_N": ["--neg", "guided", "--M", "4", "--beta", "0.5", "--N", "3"],
    "recon_conv": GUIDED + ["--gamma", "0.5", "--decoder", "conv"],
    "recon_transformer": GUIDED + ["--gamma", "0.5", "--decoder", "transformer", "--norm-pix"],
    "cls_head_pairing": ["--agg", "cls", "--pair", "head", "--neg", "all", "--N", "3", "--xv-exclude", "2"],
    "independent_detached": ["--neg", "random", "--neg-draw", "independent", "--detach-neg", "--N", "2"],
}

@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_each_objective_trains(name):
    args = config.resolve_args(TINY + CONFIGS[name] + ["--data", "unused"])
    model, before, opt, x = tiny_trainer(args)
    for step in range(3):
        _, _, draws = model.draws(x, pretrain.step_generator(0, step, torch.device("cpu")))
        loss, terms = model.objective(model.outputs(x), x, draws)
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

def test_objective_is_the_weighted_sum_of_its_terms():
    """L = (1-lam)*global + lam*dense + gamma*recon + mu*montage, each term computed here on its own from the
    model's outputs, with weights other than 0 and 1 and a different temperature for every term."""
    args = config.resolve_args(TINY + GUIDED + ["--data", "unused", "--lam", "0.3", "--gamma",
                                                "0.7", "--mu", "0.6",
                                         "--montage", "--montage-r", "2", "4", "--tau-g", "0.1",
                                                "--tau-d", "0.3",
                                         "--tau-m", "0.45", "--neg", "guided", "--beta", "0.2",
                                                "--recon", "l1"])
    model, _, _, x = tiny_trainer(args)
    canvases, labels, draws = model.draws(x, pretrain.step_generator(0, 0, torch.device("cpu")))
    out = model.outputs(x, canvases)
    loss, terms = model.objective(out, x, draws, labels)
    u, z, f, x_hat, cells = out
    B = x.shape[0] // 2
    glob = losses.nt_xent(u[:B], u[B:], 0.1)
    dense = losses.dense_loss(z[:B], z[B:], f[:B], f[B:], tau=0.3, negatives="guided", M=4, beta=0.2, N=3,
                              draws=draws)
    recon = (x_hat - x).abs().mean()
    montage = 0
    for w, c, lab in zip((2 / 3, 1 / 3), cells, labels):  # 1/2, 1/4 normalised to sum 1
        lab, h = lab.reshape(-1), c.shape[0] // 2
        montage = montage + w * (methods.montage_loss(c[:h], u[B:], lab[:h], 0.45) +
                                 methods.montage_loss(c[h:], u[:B], lab[h:], 0.45)) / 2
    for name, want in (("global", glob), ("dense", dense), ("recon", recon), ("montage", montage)):
        assert torch.allclose(terms[name], want, atol=1e-6), name
    assert torch.allclose(loss, 0.7 * glob + 0.3 * dense + 0.7 * recon + 0.6 * montage, atol=1e-6)


def test_montage_objective_trains():
    args = config.resolve_args(TINY + ["--montage", "--montage-r", "2", "4",
                                       "--montage-block-attn", "--lam", "0",
                                         "--data", "unused"])
    model, before, opt, x = tiny_trainer(args)
    for step in range(2):
        gen = pretrain.step_generator(0, step, torch.device("cpu"))
        canvases, labels, draws = model.draws(x, gen)
        assert [c.shape[0] for c in canvases] == [2 * 2, 2 * 1]
        assert [lab.shape for lab in labels] == [(4, 4), (2, 16)]
        loss, terms = model.objective(model.outputs(x, canvases), x, draws, labels)
        assert torch.isfinite(loss) and terms["montage"] > 0
        assert torch.allclose(loss, terms["global"] + terms["montage"])  # lam = 0, mu = 1
        opt.zero_grad()
        loss.backward()
        opt.step()
    changed = {".".join(k.split(".")[:2]) for k, v in model.state_dict().items()
               if not torch.equal(v, before[k])}
    assert {"montage_heads.0", "montage_heads.1"} <= changed
    with pytest.raises(ValueError, match="--montage-r"):
        pretrainer.Pretrainer(
            config.resolve_args(TINY + GUIDED + ["--montage", "--montage-r", "3", "--data", "unused"]))


STEP_CONFIGS = {
    "SimCLR": ["--lam", "0"],
    "DenseCL++*": GUIDED + ["--beta", "0.5"],
    "scored tokens": GUIDED + ["--beta", "0.5", "--score-tokens", "4", "--lam-warmup", "2"],
    "all + recon": ["--neg", "all", "--N", "3", "--gamma", "0.3", "--decoder", "transformer"],
    "montage": ["--neg", "random", "--N", "0", "--montage", "--montage-r", "2", "4", "--montage-block-attn"],
    "independent + oracle": ["--neg", "random", "--neg-draw", "independent", "--detach-neg", "--oracle-negatives",
                             "--N", "3"],
}

@pytest.mark.parametrize("name", sorted(STEP_CONFIGS))
def test_step_compiles_as_one_graph(name):
    """The forward and the objective trace without a graph break (every draw is made before them, in
    model.draws), so fullgraph=True compiles them as one graph (under the bf16 autocast of a CUDA run)."""
    args = config.resolve_args(TINY + ["--data", "unused"] + STEP_CONFIGS[name])
    model, _, _, x = tiny_trainer(args)
    canvases, labels, draws = model.draws(x, pretrain.step_generator(0, 0, torch.device("cpu")))
    tokens = torch.randint(-1, 3, (x.shape[0], 16)) if args.oracle_negatives else None
    torch._dynamo.reset()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        explained = torch._dynamo.explain(model)(x, canvases, labels, draws, torch.full((), args.lam), tokens)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


def test_global_batch_norm_equals_batch_norm_of_the_whole_batch(monkeypatch):
    """Two ranks whose halves are equal make one batch of both halves: the output, running mean and running
    (unbiased) variance must equal nn.BatchNorm1d's on that batch."""
    torch.manual_seed(0)
    x = torch.randn(6, 5) * 3 + 1
    ref, ours = torch.nn.BatchNorm1d(5, momentum=0.3), pretrainer.GlobalBatchNorm1d(5, momentum=0.3)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 2), ref.bias.uniform_(-1, 1)
    ours.load_state_dict(ref.state_dict())
    monkeypatch.setattr(losses, "world", lambda: (0, 2))
    monkeypatch.setattr(losses, "gather", lambda t: torch.cat([t, t]))  # the other rank holds the same half
    out = ours(x)
    expected = ref(torch.cat([x, x]))[:6]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)


def test_dense_loss_options_reach_the_loss(tmp_path):
    """--neg-draw, --detach-neg and --oracle-negatives reach losses.dense_loss (the objective's dense term is
    the loss called with them), are refused where they do nothing, and a demo-layout run with the oracle
    trains (its token labels from the class masks)."""
    import demo
    args = config.resolve_args(TINY + ["--data", "unused", "--neg", "random", "--neg-draw", "independent",
                                       "--detach-neg", "--oracle-negatives", "--N", "2"])
    assert "neg_draw=independent detach_neg=True oracle_negatives=True" in config.objective_summary(args)
    model, _, _, x = tiny_trainer(args)
    _, _, draws = model.draws(x, pretrain.step_generator(0, 0, torch.device("cpu")))
    tokens = torch.randint(-1, 3, (12, 16), generator=torch.Generator().manual_seed(0))
    (u, z, f, _, _), B = model.outputs(x), 6
    total, terms = model.objective((u, z, f, None, None), x, draws, token_labels=tokens)
    want = losses.dense_loss(z[:B], z[B:], f[:B], f[B:], tau=0.2, negatives="random", N=2, draws=draws,
                             neg_draw="independent", detach_neg=True, token_labels=tokens)
    torch.testing.assert_close(terms["dense"], want.detach())
    # detached negatives: the same gradient (z reaches the loss through lam * dense alone)
    torch.testing.assert_close(torch.autograd.grad(total, z, retain_graph=True)[0],
                               0.5 * torch.autograd.grad(want, z, retain_graph=True)[0])
    assert draws["sets"].shape == (2, B, 16, 2 * B)  # a draw per anchor token
    without = losses.dense_loss(z[:B], z[B:], f[:B], f[B:], tau=0.2, negatives="random", N=2, draws=draws,
                                neg_draw="independent", detach_neg=True)
    assert without > want  # the oracle removed negatives
    with pytest.raises(ValueError, match="token_labels"):
        model.objective((u, z, f, None, None), x, draws)
    for flags, named in ((["--neg-draw", "independent"], "--neg-draw"), (["--neg", "densecl", "--oracle-negatives"],
                         "--oracle-negatives"), (["--lam", "0", "--detach-neg"], "--detach-neg")):
        with pytest.raises(ValueError, match=f"^{named} "):
            config.resolve_args(TINY + ["--data", "unused"] + flags)
    root = demo.make_demo(str(tmp_path / "demo"), n_train=8, n_val=1)
    code = pretrain.main(TINY + GUIDED + ["--data", f"{root}/images/train", "--batch-size", "4", "--max-steps", "2",
                                          "--oracle-negatives", "--out-dir", str(tmp_path / "run")])
    assert code == 0
