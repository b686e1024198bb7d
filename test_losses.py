"""
Every loss against a naive Python-loop implementation written from the formulas of METHOD.md (float64, values
and gradients), closed forms, argument errors and two-process (gloo) equivalence.
The naive versions replay the documented draw order of losses.dense_loss from a generator with the same seed.
"""
import importlib.util
import math
import os
import subprocess
import sys
import tempfile

import pytest
import torch
import torch.multiprocessing as mp

import losses
from conftest import free_port

@pytest.fixture(autouse=True)
def float64():
    """Every test here runs in float64 (the naive loops are the reference); restored afterwards."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)

def unit(x):
    return x / x.norm()

def naive_nt_xent(u1, u2, tau):
    views = [unit(u) for u in u1] + [unit(u) for u in u2]
    B = len(u1)
    total = 0.0
    for k in range(2 * B):
        p = (k + B) % (2 * B)
        denom = sum(torch.exp(views[k] @ views[j] / tau) for j in range(2 * B) if j != k)
        total = total - torch.log(torch.exp(views[k] @ views[p] / tau) / denom)
    return total / (2 * B)

def naive_match(f1, f2):
    B, T, _ = f1.shape
    out = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        for t in range(T):
            best, arg = -2.0, 0
            for j in range(f2.shape[1]):
                c = float(unit(f1[b, t]) @ unit(f2[b, j]))
                if c > best:
                    best, arg = c, j
            out[b, t] = arg
    return out

def naive_dense(z1, z2, f1, f2, tau, negatives, M=1, beta=None, N=0, seed=0, score_tokens=None, xv_exclude=0,
                neg_draw="shared", detach_neg=False, labels=None):
    """labels [2B, T] (-1 unknown): every negative token whose label is its anchor's leaves the sum."""
    g = torch.Generator().manual_seed(seed)
    B, T, _ = z1.shape
    z = [z1, z2]
    f = [f1, f2]
    views = [(a, i) for a in range(2) for i in range(B)]
    if negatives == "random" and neg_draw == "independent":
        r_each = torch.randint(T, (2, B, T, 2 * B), generator=g, dtype=torch.int32)
    elif negatives == "random":
        r = torch.randint(T, (2, B), generator=g)
    if negatives == "guided":
        r = torch.randint(T, (M, 2, B), generator=g)
    scored = {(a, i): range(T) for a in range(2) for i in range(B)}
    if negatives == "guided" and beta is not None and score_tokens is not None and score_tokens < T:
        skeys = torch.rand((2, B, T), generator=g)
        scored = {(a, i): sorted(range(T), key=lambda t: -float(skeys[a, i, t]))[:score_tokens]
                  for a in range(2) for i in range(B)}
    if 0 < N < T - 1 - xv_exclude:
        keys = torch.rand((2, B, T, T), generator=g)
    j = [naive_match(f1, f2), naive_match(f2, f1)]

    def qbar(q):
        return q if beta is None or q > beta else -1.0

    def key(x):  # a negative: a constant with detach_neg
        return x.detach() if detach_neg else x

    def false_neg(a, i, t, a2, i2, t2):
        return labels is not None and labels[a * B + i, t] >= 0 and labels[a * B + i, t] == labels[a2 * B + i2, t2]

    total = 0.0
    for a, i in views:
        others = [(a2, i2) for a2, i2 in views if i2 != i]
        # negs: (vector, view, image, token or None) of each other-image negative; per anchor token if drawn so
        if negatives == "densecl":
            negs = [(unit(key(z[a2][i2]).mean(0)), a2, i2, None) for a2, i2 in others]
        elif negatives == "random" and neg_draw == "independent":
            negs = None
        elif negatives == "random":
            negs = [(unit(key(z[a2][i2, r[a2, i2]])), a2, i2, int(r[a2, i2])) for a2, i2 in others]
        elif negatives == "all":
            negs = [(unit(key(z[a2][i2, t2])), a2, i2, t2) for a2, i2 in others for t2 in range(T)]
        else:
            best, best_m = None, 0
            for m in range(M):
                s = sum(float(qbar(float((unit(z[a][i, t]) @ unit(z[a2][i2, r[m, a2, i2]])).detach())))
                        for t in scored[a, i] for a2, i2 in others) / (len(scored[a, i]) * len(others))
                if best is None or s > best:
                    best, best_m = s, m
            negs = [(unit(key(z[a2][i2, r[best_m, a2, i2]])), a2, i2, int(r[best_m, a2, i2])) for a2, i2 in others]
        for t in range(T):
            anchor = unit(z[a][i, t])
            jt = int(j[a][i, t])
            pos = anchor @ unit(z[1 - a][i, jt])
            negs_t = negs if negs is not None else [
                (unit(key(z[a2][i2, int(r_each[a, i, t, a2 * B + i2])])), a2, i2, int(r_each[a, i, t, a2 * B + i2]))
                for a2, i2 in others]
            terms = [torch.exp(pos / tau)] + [torch.exp(anchor @ n / tau) for n, a2, i2, t2 in negs_t
                                              if t2 is None or not false_neg(a, i, t, a2, i2, t2)]
            sims = {k: float(unit(f[a][i, t]) @ unit(f[1 - a][i, k])) for k in range(T) if k != jt}
            excluded = {jt} | set(sorted(sims, key=lambda k: -sims[k])[:xv_exclude])
            if N == T - 1 - xv_exclude:
                xv = [k for k in range(T) if k not in excluded]
            elif N > 0:
                xv = sorted((k for k in range(T) if k not in excluded),
                            key=lambda k: -float(keys[a, i, t, k]))[:N]
            else:
                xv = []
            terms += [torch.exp(anchor @ unit(key(z[1 - a][i, k])) / tau) for k in xv
                      if not false_neg(a, i, t, 1 - a, i, k)]
            total = total - torch.log(terms[0] / sum(terms))
    return total / (2 * B * T)

def inputs(B, T, Dz, Df, seed):
    g = torch.Generator().manual_seed(seed)
    t = [torch.randn(B, T, Dz, generator=g, requires_grad=True) for _ in range(2)]
    f = [torch.randn(B, T, Df, generator=g) for _ in range(2)]
    return t[0], t[1], f[0], f[1]

def grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)

@pytest.mark.parametrize("B,D,tau", [(2, 3, 0.5), (5, 8, 0.2), (7, 16, 0.1)])
def test_nt_xent_matches_naive(B, D, tau):
    g = torch.Generator().manual_seed(B)
    u1 = torch.randn(B, D, generator=g, requires_grad=True)
    u2 = torch.randn(B, D, generator=g, requires_grad=True)
    fast, slow = losses.nt_xent(u1, u2, tau), naive_nt_xent(u1, u2, tau)
    assert torch.allclose(fast, slow, atol=1e-12)
    for a, b in zip(grads(fast, (u1, u2)), grads(slow, (u1, u2))):
        assert torch.allclose(a, b, atol=1e-10)

@pytest.mark.parametrize("B", [2, 4, 9])
def test_nt_xent_collinear_closed_form(B):
    u = torch.randn(1, 6).repeat(2 * B, 1) * torch.rand(2 * B, 1)  # all collinear, various norms
    assert math.isclose(losses.nt_xent(u[:B], u[B:], 0.3).item(), math.log(2 * B - 1), rel_tol=1e-12)

def test_match_matches_naive():
    f1, f2 = torch.randn(3, 7, 5), torch.randn(3, 6, 5)
    assert torch.equal(losses.match(f1, f2), naive_match(f1, f2))
    assert torch.equal(losses.match(f1, f1), torch.arange(7).expand(3, 7))  # a view matches itself

CASES = [  # negatives, M, beta, N, B, T (, score_tokens, xv_exclude)
    ("densecl", 1, None, 0, 3, 4),
    ("densecl", 1, None, 2, 2, 5),
    ("random", 1, None, 0, 3, 4),
    ("random", 1, None, 3, 4, 6),
    ("random", 1, None, 5, 2, 6),  # N = T-1: every other partner token
    ("guided", 4, None, 0, 3, 5),
    ("guided", 6, 0.2, 0, 3, 4),
    ("guided", 5, 0.9, 2, 2, 5),  # high threshold: most sets tie, the first one must win in both
    ("guided", 3, -0.3, 1, 3, 3),
    ("guided", 6, 0.1, 0, 3, 6, 2),  # thresholded score on 2 of the 6 anchor tokens
    ("guided", 4, 0.3, 2, 2, 5, 3),
    # M < T: the thresholded score over the M*2B set members instead of all tokens
    ("guided", 2, 0.1, 0, 3, 6),
    ("guided", 3, 0.6, 1, 2, 7),
    ("all", 1, None, 0, 3, 4),
    ("all", 1, None, 2, 2, 4),
    # cross-view negatives without the 2 nearest tokens after the match
    ("random", 1, None, 2, 3, 6, None, 2),
    ("guided", 3, 0.2, 3, 2, 6, None, 2),  # N = T-1-xv_exclude: every remaining partner token
    ("densecl", 1, None, 1, 2, 5, None, 1),
]

@pytest.mark.parametrize("case", CASES)
def test_dense_loss_matches_naive(case):
    negatives, M, beta, N, B, T = case[:6]
    S = case[6] if len(case) > 6 else None
    K = case[7] if len(case) > 7 else 0
    z1, z2, f1, f2 = inputs(B, T, 4, 3, seed=B * 100 + T)
    fast = losses.dense_loss(z1, z2, f1, f2, tau=0.2, negatives=negatives, M=M, beta=beta, N=N,
                             generator=torch.Generator().manual_seed(7), score_tokens=S, xv_exclude=K)
    slow = naive_dense(z1, z2, f1, f2, 0.2, negatives, M, beta, N, seed=7, score_tokens=S, xv_exclude=K)
    assert torch.allclose(fast, slow, atol=1e-12), (fast.item(), slow.item())
    for a, b in zip(grads(fast, (z1, z2)), grads(slow, (z1, z2))):
        assert torch.allclose(a, b, atol=1e-10)

def labels_of(B, T, seed, classes=3):
    """Token labels [2B, T] in {-1 (unknown), 0..classes-1}: many negatives share their anchor's label."""
    return torch.randint(-1, classes, (2 * B, T), generator=torch.Generator().manual_seed(seed))

ORACLE, DETACH, INDEPENDENT = {"labels": 3}, dict(detach_neg=True), dict(neg_draw="independent")
OPTION_CASES = [  # negatives, M, beta, N, B, T, options ("labels": random token labels of that many classes)
    ("random", 1, None, 0, 3, 4, INDEPENDENT),
    ("random", 1, None, 2, 4, 5, INDEPENDENT),
    ("random", 1, None, 4, 2, 5, INDEPENDENT),  # N = T-1
    ("densecl", 1, None, 2, 3, 4, DETACH),
    ("random", 1, None, 3, 3, 5, DETACH),
    ("random", 1, None, 2, 3, 5, {**DETACH, **INDEPENDENT}),
    ("guided", 4, 0.2, 2, 3, 5, DETACH),
    ("all", 1, None, 3, 2, 4, DETACH),  # N = T-1
    ("random", 1, None, 2, 3, 5, ORACLE),
    ("random", 1, None, 0, 4, 4, {"labels": 2, **INDEPENDENT}),  # 2 classes: rows with every negative removed
    ("guided", 5, 0.1, 3, 3, 5, ORACLE),
    ("guided", 3, None, 4, 2, 5, ORACLE),  # N = T-1
    ("all", 1, None, 2, 3, 4, {"labels": 3, **DETACH}),
]

@pytest.mark.parametrize("case", OPTION_CASES)
def test_dense_loss_options_match_naive(case):
    """Independent draws per anchor token, detached negatives and the oracle's token labels against the
    naive loop with the same draws: values and gradients (detached negatives change the gradients only)."""
    negatives, M, beta, N, B, T, options = case
    options = dict(options)
    labels = labels_of(B, T, seed=B + T, classes=options.pop("labels")) if "labels" in options else None
    z1, z2, f1, f2 = inputs(B, T, 4, 3, seed=B * 10 + T)
    kw = dict(tau=0.2, negatives=negatives, M=M, beta=beta, N=N, **options)
    fast = losses.dense_loss(z1, z2, f1, f2, generator=torch.Generator().manual_seed(3), token_labels=labels, **kw)
    slow = naive_dense(z1, z2, f1, f2, 0.2, negatives, M, beta, N, seed=3, labels=labels, **options)
    assert torch.allclose(fast, slow, atol=1e-12), (fast.item(), slow.item())
    g_fast, g_slow = grads(fast, (z1, z2)), grads(slow, (z1, z2))
    for a, b in zip(g_fast, g_slow):
        assert torch.isfinite(a).all() and torch.allclose(a, b, atol=1e-10)
    if options.get("neg_draw") == "independent":  # one anchor view a chunk: the same loss
        one = losses.dense_loss(z1, z2, f1, f2, generator=torch.Generator().manual_seed(3), token_labels=labels,
                                chunk=1, **kw)
        assert torch.allclose(one, fast, atol=1e-13)
        for a, b in zip(grads(one, (z1, z2)), g_fast):
            assert torch.allclose(a, b, atol=1e-12)
    if options.get("detach_neg"):
        attached = losses.dense_loss(z1, z2, f1, f2, generator=torch.Generator().manual_seed(3),
                                     token_labels=labels, **{**kw, "detach_neg": False})
        assert torch.allclose(attached, fast, atol=1e-13)
        assert not torch.allclose(grads(attached, (z1, z2))[0], g_fast[0], atol=1e-6)
    if labels is not None:  # all labels unknown: nothing removed
        plain = losses.dense_loss(z1, z2, f1, f2, generator=torch.Generator().manual_seed(3), **kw)
        unknown = losses.dense_loss(z1, z2, f1, f2, generator=torch.Generator().manual_seed(3),
                                    token_labels=torch.full_like(labels, -1), **kw)
        assert torch.equal(plain, unknown) and plain > fast

def test_independent_draws_shape():
    """A draw per anchor token of this rank and per view of the global batch (int32 to halve the memory)."""
    d = losses.dense_draws(torch.Generator().manual_seed(0), B=3, T=5, negatives="random", neg_draw="independent")
    assert d["sets"].shape == (2, 3, 5, 6) and d["sets"].dtype == torch.int32
    assert d["sets"].min() >= 0 and d["sets"].max() < 5

def test_score_tokens_all_equals_exact():
    z1, z2, f1, f2 = inputs(3, 5, 4, 4, seed=4)
    kw = dict(tau=0.2, negatives="guided", M=5, beta=0.2, N=0)
    a = losses.dense_loss(z1, z2, f1, f2, generator=torch.Generator().manual_seed(1), score_tokens=5, **kw)
    b = losses.dense_loss(z1, z2, f1, f2, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(a, b)

def test_guided_m1_equals_random():
    z1, z2, f1, f2 = inputs(4, 6, 5, 5, seed=1)
    a = losses.dense_loss(z1, z2, f1, f2, tau=0.2, negatives="guided", M=1, N=2,
                          generator=torch.Generator().manual_seed(3))
    b = losses.dense_loss(z1, z2, f1, f2, tau=0.2, negatives="random", N=2,
                          generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)

def test_all_equals_random_with_single_token_views():
    z1, z2, f1, f2 = inputs(5, 1, 4, 4, seed=2)
    a = losses.dense_loss(z1, z2, f1, f2, tau=0.2, negatives="all")
    b = losses.dense_loss(z1, z2, f1, f2, tau=0.2, negatives="random",
                          generator=torch.Generator().manual_seed(0))
    assert torch.allclose(a, b, atol=1e-14)

def test_guided_picks_the_hardest_set():
    """Anchors: tokens e0, e0, e1 in every view. Candidate sets (set m takes token m of every other view): m=0
    points along the anchors' mean direction (2, 1), m=1 along (1, 1), m=2 is orthogonal to all anchors.
    Unthresholded, set 0 has the highest mean cosine (0.745 against 0.707) and wins; with beta = 0.5 its
    cosine 0.447 with the e1 anchor counts as -1 and set 1, above the threshold for every anchor, wins. The
    orthogonal set never does."""
    B, D = 3, 4
    e = torch.eye(D)
    anchors = torch.stack([e[0], e[0], e[1]]).expand(2, B, 3, D)  # [2, B, T=3, D]
    members = torch.stack([unit(2 * e[0] + e[1]), unit(e[0] + e[1]), e[2]])  # token m of every view
    z_all = members.expand(2 * B, 3, D)
    sets = torch.arange(3)[:, None].expand(3, 2 * B)  # [M=3, 2B]
    img = torch.arange(B)
    own = torch.stack([img, B + img], -1)[None].expand(2, B, 2)
    for beta, winner in ((None, 0), (0.5, 1)):
        for chunk in (None, 1):
            best = losses._guided_choice(anchors, z_all, sets, own, beta, chunk)
            assert torch.equal(best, torch.full((2, B), winner)), (beta, chunk)

@pytest.mark.parametrize("kwargs,word", [
    (dict(negatives="nope"), "negatives"),
    (dict(negatives="guided", M=0), "M"),
    (dict(negatives="guided", M=2, beta=1.5), "beta"),
    (dict(negatives="random", beta=0.5), "beta"),
    (dict(negatives="densecl", N=4), "N"),
    (dict(negatives="random", generator=None), "generator"),
    (dict(negatives="random", N=2, xv_exclude=2), "N"),  # N > T-1-xv_exclude
    (dict(negatives="random", N=0, xv_exclude=1), "xv_exclude"),
    (dict(negatives="guided", neg_draw="independent"), "neg_draw"),
    (dict(negatives="random", neg_draw="own"), "neg_draw"),
    (dict(negatives="densecl", token_labels=torch.zeros(4, 4, dtype=torch.long)), "token_labels"),
    (dict(negatives="random", token_labels=torch.zeros(2, 4, dtype=torch.long)), "token_labels"),
    (dict(negatives="random", token_labels=torch.zeros(4, 4)), "token_labels"),
])
def test_dense_loss_bad_arguments(kwargs, word):
    z1, z2, f1, f2 = inputs(2, 4, 3, 3, seed=0)
    kw = dict(tau=0.2, generator=torch.Generator())
    kw.update(kwargs)
    with pytest.raises(ValueError, match=word):
        losses.dense_loss(z1, z2, f1, f2, **kw)

def test_dense_loss_bad_shapes():
    z1, z2, f1, f2 = inputs(2, 4, 3, 3, seed=0)
    with pytest.raises(ValueError, match="z1 and z2"):
        losses.dense_loss(z1, z2[:, :3], f1, f2, tau=0.2, negatives="densecl")
    with pytest.raises(ValueError, match="f1 and f2"):
        losses.dense_loss(z1, z2, f1[:, :3], f2[:, :3], tau=0.2, negatives="densecl")
    with pytest.raises(ValueError, match="u1 and u2"):
        losses.nt_xent(torch.randn(3, 4), torch.randn(2, 4), 0.2)

def test_recon_loss():
    x, y = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    assert torch.allclose(losses.recon_loss(x, y), ((x - y) ** 2).sum() / x.numel())
    assert torch.allclose(losses.recon_loss(x, y, "l1"), (x - y).abs().sum() / x.numel())
    with pytest.raises(ValueError, match="kind"):
        losses.recon_loss(x, y, "l3")
    with pytest.raises(ValueError, match="same shape"):
        losses.recon_loss(x, y[:1])

def test_recon_loss_norm_pix():
    """MAE's per-patch target normalisation against a loop over the 4x4 patches."""
    x, y = torch.randn(2, 3, 8, 8) * 3 + 1, torch.randn(2, 3, 8, 8)
    target = x.clone()
    for n in range(2):
        for i in range(0, 8, 4):
            for j in range(0, 8, 4):
                patch = x[n, :, i:i + 4, j:j + 4]
                target[n, :, i:i + 4, j:j
                       + 4] = (patch - patch.mean()) / (patch.var(unbiased=False) + 1e-6).sqrt()
    assert torch.allclose(losses.recon_loss(x, y, norm_pix=4), ((target - y) ** 2).mean(), atol=1e-12)
    assert torch.allclose(losses.recon_loss(x, y, "l1", norm_pix=4), (target - y).abs().mean(), atol=1e-12)
    with pytest.raises(ValueError, match="norm_pix"):
        losses.recon_loss(x, y, norm_pix=3)

def test_match_is_exact_under_bf16_autocast():
    """Near-tied features (a shared base plus noise of 0.1): the cosines differ by ~1e-3, below bf16's step
    near 1 (~0.004), so a bf16 table ties most anchors; match must still return the float64 argmax."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 1, 64, generator=g)
    f1 = (base + 0.1 * torch.randn(4, 49, 64, generator=g)).float()
    f2 = (base + 0.1 * torch.randn(4, 49, 64, generator=g)).float()
    want = naive_match(f1.double(), f2.double())
    assert torch.equal(losses.match(f1, f2), want)  # float32 resolves these cosines
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(losses.match(f1, f2), want)
        ties = torch.bmm(torch.nn.functional.normalize(f1, dim=-1),
                         torch.nn.functional.normalize(f2, dim=-1).mT)
    # what bf16 would do
    assert ties.dtype == torch.bfloat16 and (ties.argmax(-1) != want).float().mean() > 0.2

def test_guided_choice_is_exact_under_bf16_autocast():
    """The unthresholded set score runs in float32 under a bf16 autocast: with near-tied sets (members a
    shared base plus noise of 1e-2) the choice equals the float64 one."""
    g = torch.Generator().manual_seed(1)
    B, T, D, M = 4, 6, 32, 64
    base = torch.randn(D, generator=g)
    z = torch.nn.functional.normalize(base + 1e-2 * torch.randn(2, B, T, D, generator=g), dim=-1)
    sets = torch.randint(T, (M, 2 * B), generator=g)
    img = torch.arange(B)
    own = torch.stack([img, B + img], -1)[None].expand(2, B, 2)
    want = losses._guided_choice(z, z.reshape(2 * B, T, D), sets, own, None)  # float64
    zf = z.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(losses._guided_choice(zf, zf.reshape(2 * B, T, D), sets, own, None), want)

@pytest.mark.parametrize("negatives,M,beta,N", [("all", 1, None, 2), ("guided", 9, 0.2, 0),
                                                ("guided", 3, 0.1, 1)])
def test_chunks_equal_one_pass(negatives, M, beta, N):
    """The chunked paths ('all' logsumexp and the thresholded set score; both layouts, M >= T and M < T) with
    one anchor view a chunk give the values and gradients of the unchunked computation."""
    z1, z2, f1, f2 = inputs(3, 5, 4, 4, seed=9)
    out = []
    for chunk in (None, 1, 2):
        loss = losses.dense_loss(z1, z2, f1, f2, tau=0.2, negatives=negatives, M=M, beta=beta, N=N,
                                 generator=torch.Generator().manual_seed(2), chunk=chunk)
        out.append((loss, grads(loss, (z1, z2))))
    for loss, (g1, g2) in out[1:]:
        assert torch.allclose(loss, out[0][0], atol=1e-13)
        assert torch.allclose(g1, out[0][1][0], atol=1e-12) and torch.allclose(g2, out[0][1][1], atol=1e-12)

def test_dense_draws_replay_the_generator():
    """dense_draws made ahead (pretrain.py's compiled step) give the loss of the generator passed in
    directly."""
    z1, z2, f1, f2 = inputs(3, 6, 4, 4, seed=3)
    kw = dict(negatives="guided", M=5, beta=0.3, N=2, score_tokens=3)
    draws = losses.dense_draws(torch.Generator().manual_seed(4), B=3, T=6, **kw)
    assert set(draws) == {"sets", "score_keys", "xv_keys"}
    a = losses.dense_loss(z1, z2, f1, f2, tau=0.2, draws=draws, **kw)
    b = losses.dense_loss(z1, z2, f1, f2, tau=0.2, generator=torch.Generator().manual_seed(4), **kw)
    assert torch.equal(a, b)

DIST_CASES = [("densecl", 1, None, 0), ("random", 1, None, 0), ("guided", 4, 0.3, 0), ("guided", 8, 0.3, 0),
              ("all", 1, None, 4)]  # guided: M < T and M >= T (the two scoring layouts); N = T-1: no draw
# with the oracle's labels (gathered from every rank) and detached negatives (no gradient across ranks)
DIST_CASES += [(neg, M, beta, N, True) for neg, M, beta, N in DIST_CASES[1:]]

def _worker(rank, world_size, port, u1, u2, zs, out_dir):
    torch.set_default_dtype(torch.float64)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world_size)
    B = u1.shape[0] // world_size
    sl = slice(rank * B, (rank + 1) * B)
    a, b = u1[sl].clone().requires_grad_(), u2[sl].clone().requires_grad_()
    loss = losses.nt_xent(a, b, 0.2)
    loss.backward()
    result = {"nt_xent": (loss.detach(), a.grad, b.grad)}
    z1, z2, f1, f2 = zs
    labels = labels_of(u1.shape[0], z1.shape[1], seed=1).view(2, -1, z1.shape[1])[:, sl].reshape(-1, z1.shape[1])
    for negatives, M, beta, N, *oracle in DIST_CASES:
        c, d = z1[sl].clone().requires_grad_(), z2[sl].clone().requires_grad_()
        loss = losses.dense_loss(c, d, f1[sl], f2[sl], tau=0.2, negatives=negatives, M=M, beta=beta, N=N,
                                 generator=torch.Generator().manual_seed(5), detach_neg=bool(oracle),
                                 token_labels=labels if oracle else None)
        loss.backward()
        result[f"{negatives} M={M} {oracle}"] = (loss.detach(), c.grad, d.grad)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()

def test_two_processes_equal_one():
    B, T = 6, 5
    g = torch.Generator().manual_seed(0)
    u1, u2 = torch.randn(B, 8, generator=g), torch.randn(B, 8, generator=g)
    zs = tuple(torch.randn(B, T, 4, generator=g) for _ in range(4))
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(2, free_port(), u1, u2, zs, d), nprocs=2, join=True)
        ranks = [torch.load(os.path.join(d, f"rank{r}.pt"), weights_only=True) for r in range(2)]
    # one process: the rank losses average to the full loss; each rank's input gradient is world_size times
    # the single-process gradient of its rows (DDP then averages parameter gradients over the ranks)
    a, b = u1.clone().requires_grad_(), u2.clone().requires_grad_()
    full = losses.nt_xent(a, b, 0.2)
    full.backward()
    assert torch.allclose((ranks[0]["nt_xent"][0] + ranks[1]["nt_xent"][0]) / 2, full, atol=1e-12)
    for r in range(2):
        sl = slice(r * B // 2, (r + 1) * B // 2)
        assert torch.allclose(ranks[r]["nt_xent"][1], 2 * a.grad[sl], atol=1e-12)
        assert torch.allclose(ranks[r]["nt_xent"][2], 2 * b.grad[sl], atol=1e-12)
    z1, z2, f1, f2 = zs
    for negatives, M, beta, N, *oracle in DIST_CASES:
        c, e = z1.clone().requires_grad_(), z2.clone().requires_grad_()
        full = losses.dense_loss(c, e, f1, f2, tau=0.2, negatives=negatives, M=M, beta=beta, N=N,
                                 generator=torch.Generator().manual_seed(5), detach_neg=bool(oracle),
                                 token_labels=labels_of(B, T, seed=1) if oracle else None)
        full.backward()
        key = f"{negatives} M={M} {oracle}"
        assert torch.allclose((ranks[0][key][0] + ranks[1][key][0]) / 2, full, atol=1e-12), key
        for r in range(2):
            sl = slice(r * B // 2, (r + 1) * B // 2)
            assert torch.allclose(ranks[r][key][1], 2 * c.grad[sl], atol=1e-12), key
            assert torch.allclose(ranks[r][key][2], 2 * e.grad[sl], atol=1e-12), key


def test_fused_without_triton_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(losses, "fused_score", None)
    monkeypatch.setattr(losses.importlib.util, "find_spec", lambda name: None)  # as if triton were absent
    z = torch.nn.functional.normalize(torch.randn(2, 3, 4, 8), dim=-1)
    with pytest.raises(RuntimeError, match="triton is not installed"):
        losses._threshold_sum(z[0], z[1].reshape(-1, 8), 0.5, True)
    own = torch.tensor([[[0, 3], [1, 4], [2, 5]]] * 2)
    with pytest.raises(RuntimeError, match="fused=True"):
        losses._guided_choice(z, z.reshape(6, 4, 8), torch.zeros(2, 6, dtype=torch.long), own, 0.5, fused=True)


# a guided thresholded loss (the fused score's caller) on CPU, evaluated here and in the subprocess below
TINY_GUIDED = ("losses.dense_loss(*torch.randn(4, 2, 9, 8, dtype=torch.float64, generator=torch.Generator()"
               ".manual_seed(0)), tau=0.2, negatives='guided', M=4, beta=0.3, N=2, "
               "generator=torch.Generator().manual_seed(1))")
NO_KERNEL_CHECK = f"""
import sys
sys.modules["fused_score"] = None  # as if losses.py were copied without fused_score.py
import torch, losses
torch.set_default_dtype(torch.float64)  # as every test here (its draws too)
print(repr({TINY_GUIDED}.item()))
try:
    losses._threshold_sum(torch.ones(1, 2, 4), torch.ones(3, 4), 0.5, True)
except RuntimeError as e:
    print(e)
"""


def test_losses_without_fused_score_py():
    """losses.py where fused_score.py cannot be imported (blocked, in a subprocess): the same loss to the bit
    as here (the torch ops), and fused=True names what is missing."""
    out = subprocess.run([sys.executable, "-c", NO_KERNEL_CHECK], capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    assert out.returncode == 0, out.stderr[-3000:]
    value, error = out.stdout.splitlines()
    assert float(value) == eval(TINY_GUIDED).item()
    missing = "triton is not installed" if importlib.util.find_spec("triton") is None \
        else "fused_score.py, which holds it, cannot"
    assert error.startswith("losses: fused=True") and missing in error, error
