"""
The contrastive objectives, as pure functions (tensors in, tensor out; no global config):

    nt_xent      SimCLR NT-Xent over 2B global embeddings                      METHOD.md 5.1
    match        dense correspondence: argmax cosine token of the other view   METHOD.md 3
    dense_loss   dense InfoNCE with every negative formulation                 METHOD.md 4
    recon_loss   auxiliary pixel reconstruction                                METHOD.md 7

(MCL's montage loss is in methods.py, with its canvases.)

Views are laid out as [view 1 of images 0..B-1, view 2 of images 0..B-1]. Under torch.distributed the
negatives come from every rank through a differentiable all-gather; global image g = rank * B + i, so the
global layout is that of one process holding the concatenated batch. Each rank returns the mean over its own
anchors: the mean over ranks is the single-process loss, and DDP's gradient averaging then gives exactly the
single-process gradients (the gather's backward sums every rank's gradient into the features it came from).
"""
import importlib.util

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

try:  # the fused thresholded set score on CUDA, a Triton kernel (triton ships with torch's CUDA builds); without
    import fused_score  # it, two torch ops. losses.fused_score = None turns it off (bench.py's unfused row does)
except ImportError:  # no triton, or fused_score.py not copied along
    fused_score = None

NEGATIVES = ("densecl", "random", "guided", "all")
NEG_DRAWS = ("shared", "independent")  # 'random': one draw per view for all anchors, or one per anchor token


def world():
    """(rank, world size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _Gather(torch.autograd.Function):
    """all_gather along dim 0 whose backward all-reduces (sums) the gradient and keeps this rank's slice."""

    @staticmethod
    def forward(ctx, x):
        rank, size = world()
        ctx.rank, ctx.n = rank, x.shape[0]
        out = torch.empty((size * x.shape[0],) + x.shape[1:], dtype=x.dtype, device=x.device)
        # all_gather_single from torch 2.14 on (all_gather_into_tensor, its old name, warns at every call)
        (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(out, x.contiguous())
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather(x):
    """Differentiable concatenation of x [n, ...] from every rank -> [world * n, ...] (identity in
    one process)."""
    return _Gather.apply(x) if world()[1] > 1 else x


def gather_images(x, dim=1):
    """Gather along the image dimension `dim`: [.., B, ..] per rank -> [.., world * B, ..] in global
    image order."""
    return gather(x.movedim(dim, 0)).movedim(0, dim) if world()[1] > 1 else x


def _acc(dtype):
    return torch.promote_types(dtype, torch.float32)  # float32 for bf16/fp16 inputs, float64 stays float64


def nt_xent(u1, u2, tau):
    """SimCLR NT-Xent (METHOD.md 5.1). u1, u2: unnormalised projections [B, D] of the two views of B images.
    With u = norm(.), for the 2B anchors k and positive p(k) (the other view of the same image):
        l_k = -log exp(u_k.u_p(k)/tau) / sum_{j != k} exp(u_k.u_j/tau),     L = mean_k l_k
    The sum runs over the 2·B_global - 1 other views of the globally gathered batch (the positive included).
    Returns the mean over this rank's 2B anchors (see the module docstring for DDP)."""
    if u1.ndim != 2 or u1.shape != u2.shape:
        raise ValueError(f"nt_xent: u1 and u2 must both be [B, D]; got {tuple(u1.shape)} and "
                         f"{tuple(u2.shape)}")
    rank, _ = world()
    B = u1.shape[0]
    u = F.normalize(torch.stack([u1, u2]).to(_acc(u1.dtype)), dim=-1)  # [2, B, D]
    everyone = gather_images(u)  # [2, Bg, D]
    Bg = everyone.shape[1]
    if Bg < 2:
        raise ValueError("nt_xent: needs at least 2 images in the (global) batch to have negatives")
    with torch.autocast(u.device.type, enabled=False):  # a [2B, 2Bg] table: float32 costs nothing here
        logits = (u.reshape(2 * B, -1) @ everyone.reshape(2 * Bg, -1).T) / tau  # [2B, 2Bg]
    a = torch.arange(2, device=u.device).repeat_interleave(B)
    img = rank * B + torch.arange(B, device=u.device).repeat(2)  # global image index of each anchor
    self_col, pos_col = a * Bg + img, (1 - a) * Bg + img
    cols = torch.arange(2 * Bg, device=u.device)
    # no host->device copy: no sync
    logits = logits.masked_fill(cols[None, :] == self_col[:, None], float("-inf"))
    return F.cross_entropy(logits, pos_col)


@torch.no_grad()
def match(f1, f2):
    """Dense correspondence (METHOD.md 3): for each token t of view 1, j*(t) = argmax_j cos(f1_t, f2_j):
    [B, T] (int64).
    The cosine table is computed in float32 (float64 stays float64) with autocast off: in bf16 (steps of
    ~0.004 near 1) many anchors tie and argmax would break the ties towards the lowest token index. It is [B,
    T, T], tiny next to the backbone."""
    if f1.ndim != 3 or f1.shape[0] != f2.shape[0] or f1.shape[2] != f2.shape[2]:
        raise ValueError(
            f"match: f1, f2 must be [B, T, K] with equal B and K; got {tuple(f1.shape)}, {tuple(f2.shape)}")
    acc = _acc(f1.dtype)
    with torch.autocast(f1.device.type, enabled=False):
        a, b = F.normalize(f1.to(acc), dim=-1), F.normalize(f2.to(acc), dim=-1)
        return torch.bmm(a, b.transpose(1, 2)).argmax(-1)


@torch.no_grad()
def near_tokens(f1, f2, j, k):
    """The k tokens of view 2 most similar to each token t of view 1 by cos(f1_t, f2_j), not counting its
    match j[t] (METHOD.md 4.6, xv_exclude): [B, T, k] (int64), most similar first. Same float32 table as
    match."""
    acc = _acc(f1.dtype)
    with torch.autocast(f1.device.type, enabled=False):
        cos = torch.bmm(F.normalize(f1.to(acc), dim=-1), F.normalize(f2.to(acc), dim=-1).transpose(1, 2))
        return cos.scatter(-1, j[..., None], float("-inf")).topk(k, dim=-1).indices


def _check_dense(z1, z2, f1, f2, negatives, M, beta, N, generator, score_tokens, draws, xv_exclude, neg_draw,
                 token_labels):
    if z1.ndim != 3 or z1.shape != z2.shape:
        raise ValueError(f"dense_loss: z1 and z2 must both be [B, T, Dz]; got {tuple(z1.shape)} and "
                         f"{tuple(z2.shape)}")
    if f1.ndim != 3 or f1.shape != f2.shape or f1.shape[:2] != z1.shape[:2]:
        raise ValueError(f"dense_loss: f1 and f2 must both be [B, T, Df] with the B, T of z "
                         f"({tuple(z1.shape[:2])}); got {tuple(f1.shape)} and {tuple(f2.shape)}")
    if negatives not in NEGATIVES:
        raise ValueError(f"dense_loss: negatives={negatives!r}; expected one of {NEGATIVES}")
    if not isinstance(M, int) or M < 1:
        raise ValueError(f"dense_loss: M={M!r}; expected an integer >= 1 (the number of candidate sets)")
    if beta is not None and not (-1.0 <= beta <= 1.0):
        raise ValueError(f"dense_loss: beta={beta!r}; expected a cosine threshold in [-1, 1] or None")
    if beta is not None and negatives != "guided":
        raise ValueError(f"dense_loss: beta={beta} thresholds the guided set score; it needs "
                         f"negatives='guided', not {negatives!r}")
    T = z1.shape[1]
    if score_tokens is not None and (not isinstance(score_tokens, int) or score_tokens < 1):
        raise ValueError(f"dense_loss: score_tokens={score_tokens!r}; expected None or an integer >= 1")
    if not isinstance(xv_exclude, int) or xv_exclude < 0 or (xv_exclude and not N):
        raise ValueError(f"dense_loss: xv_exclude={xv_exclude!r}; expected an integer >= 0, and > 0 "
                         f"only with N > 0")
    if not isinstance(N, int) or not 0 <= N < T - xv_exclude:
        raise ValueError(f"dense_loss: N={N!r}; expected an integer in [0, T-1-xv_exclude] = [0, "
                         f"{T - 1 - xv_exclude}] (cross-view negatives)")
    if neg_draw not in NEG_DRAWS or (neg_draw == "independent" and negatives != "random"):
        raise ValueError(f"dense_loss: neg_draw={neg_draw!r}; expected one of {NEG_DRAWS}, 'independent' only "
                         f"with negatives='random'")
    if token_labels is not None:
        if negatives == "densecl":
            raise ValueError("dense_loss: token_labels (oracle false negatives) needs token negatives; "
                             "negatives='densecl' has pooled image vectors, no token label")
        if tuple(token_labels.shape) != (2 * z1.shape[0], T) or token_labels.is_floating_point():
            raise ValueError(f"dense_loss: token_labels must be an integer [2B, T] = [{2 * z1.shape[0]}, {T}] "
                             f"tensor (-1 = unknown); got {token_labels.dtype} {tuple(token_labels.shape)}")
    if generator is None and draws is None and (negatives in ("random", "guided")
                                                or 0 < N < T - 1 - xv_exclude):
        raise ValueError(f"dense_loss: negatives={negatives!r}, N={N} samples indices; pass "
                         f"generator=torch.Generator (or the draws of dense_draws)")


def dense_draws(generator, *, B, T, negatives, M=1, beta=None, N=0, score_tokens=None,
                xv_exclude=0, neg_draw="shared", device=None):
    """Every random draw of one dense_loss call, made up front (so the loss itself has no generator and
    compiles as one graph), in this fixed order from `generator` (on its own device), returned on `device`
    (default: its own):
        'sets'       'random': token indices (2, Bg); with neg_draw 'independent' one index per anchor token
                     of this rank and other view (2, B, T, 2*Bg), int32; 'guided': M candidate sets (M,
                     2*Bg), set m takes token sets[m, u] of view u (drawn as (M, 2, Bg))
        'score_keys' guided with beta and score_tokens < T: uniform keys (2, Bg, T); the score_tokens largest
                     of each view's keys pick the tokens its set score averages over
        'xv_keys'    0 < N < T-1-xv_exclude: uniform keys (2, B, T, T) for this rank's anchors; the N largest
                     keys off the excluded tokens pick the cross-view negatives
    B is this rank's batch, Bg = B * world size: every draw but 'xv_keys' and the independent 'sets' is
    global, identical on every rank."""
    gdev = generator.device if generator is not None else None
    Bg, dev, draws = B * world()[1], device if device is not None else gdev, {}
    if negatives == "random" and neg_draw == "independent":
        draws["sets"] = torch.randint(T, (2, B, T, 2 * Bg), generator=generator, device=gdev,
                                      dtype=torch.int32).to(dev)
    elif negatives == "random":
        draws["sets"] = torch.randint(T, (2, Bg), generator=generator, device=gdev).to(dev)
    elif negatives == "guided":
        sets = torch.randint(T, (M, 2, Bg), generator=generator, device=gdev)
        draws["sets"] = sets.reshape(M, 2 * Bg).to(dev)
        if beta is not None and score_tokens is not None and score_tokens < T:
            draws["score_keys"] = torch.rand((2, Bg, T), generator=generator, device=gdev).to(dev)
    if 0 < N < T - 1 - xv_exclude:
        draws["xv_keys"] = torch.rand((2, B, T, T), generator=generator, device=gdev).to(dev)
    return draws


def _threshold_sum(z, keys, beta, fused):
    """sum_t qbar(z[a, t] . keys[w]) for z [A, T, D] and keys [K, D] -> float32 [A, K], qbar(q) = q if q >
    beta else -1 (METHOD.md 4.5). fused: fused_score.py's Triton kernel, products in float32 from the inputs'
    dtype; else the [A, T, K] product in the inputs' dtype, summed in float32 (bf16 sums would reorder the
    sets)."""
    if fused and fused_score is None:
        missing = ("triton is not installed (it ships with torch's CUDA builds)" if importlib.util.find_spec(
            "triton") is None else "fused_score.py, which holds it, cannot be imported (or was turned off)")
        raise RuntimeError(f"losses: fused=True runs a Triton kernel, and {missing}; pass fused=False or None")
    if fused:
        return fused_score.threshold_sum(z, keys, float(beta))
    q = z @ keys.T
    return q.masked_fill_(q <= beta, -1.0).sum(1, dtype=_acc(q.dtype))


def _guided_choice(z, z_all, r, own, beta, chunk=None, fused=None):
    """Guided set selection (METHOD.md 4.4-4.5), no gradient. z [2, B, T, D] normalised anchors, z_all [2Bg,
    T', D] every normalised token of every view of the global batch, r [M, 2Bg] the candidate sets (set m
    takes token r[m, u] of view u: n_u^m = z_all[u, r[m, u]]), own [2, B, 2] the global columns of each anchor
    view's own image.
    Returns m* [2, B].
      beta None: s(v, m) = zbar_v . (sum_u n_u^m - own-image members) / (2Bg-2)      (exact, by linearity)
      beta:      s(v, m) = mean_t mean_{u not in img(v)} qbar(z_t^v . n_u^m),  qbar(q) = q if q > beta else -1
    Ties go to the smallest m. The thresholded score needs sum_t qbar(z_t^v . w) for every candidate token w:
    with M >= T' it is cheaper to compute it once for all 2Bg*T' tokens and pick the sets' members from that
    table than for the M*2Bg set members (fewer columns in the product). fused (None: bf16/fp16 on CUDA with
    triton and fused_score.py) computes that table by a kernel that never writes the [2B*T, columns] product
    out, else by one product per chunk; c = chunk anchor views at a time (default: by memory). z may hold a
    subset of each view's tokens (score_tokens)."""
    M, n_cols = r.shape
    _, B, T, D = z.shape
    cols = torch.arange(n_cols, device=z.device)
    own_m = own[:, :, None, :].expand(2, B, M, 2)
    # float32 even under bf16 autocast: cheap (O(M*2Bg*D)), and bf16 rounding reorders the sets
    if beta is None:
        acc = _acc(z.dtype)
        with torch.autocast(z.device.type, enabled=False):
            zbar, cand = z.to(acc).mean(2), z_all[cols, r].to(acc)  # [2, B, D], [M, 2Bg, D]
            s_all = torch.einsum("abd,md->abm", zbar, cand.sum(1))
            members = cand[torch.arange(M, device=cand.device)[None, None, :, None], own_m]  # [2, B, M, 2, D]
            s_own = torch.einsum("abd,abmkd->abm", zbar, members)
            return (s_all - s_own).argmax(-1)
    if fused is None:
        fused = (fused_score is not None and z.is_cuda
                 and z.dtype in (torch.bfloat16, torch.float16))
    per_token = M >= z_all.shape[1]
    keys = z_all.reshape(-1, D) if per_token else z_all[cols, r].reshape(M * n_cols, D)
    flat, own = z.reshape(2 * B, T, D), own.reshape(2 * B, 2)
    # 2^28 elements a chunk: of the [c, T, columns] product, or fused, of the [c, columns] and [c, M, 2Bg]
    # tables
    c = chunk or max(1, (1 << 28) // (max(keys.shape[0], M * n_cols) if fused else T * keys.shape[0]))
    scores = []
    for s in range(0, 2 * B, c):
        summed = _threshold_sum(flat[s:s + c], keys, beta, fused)  # [c, columns]
        if per_token:
            per_col = summed.view(-1, n_cols, z_all.shape[1])[:, cols, r]
        else:
            per_col = summed.view(-1, M, n_cols)
        per_col = per_col.scatter(-1, own[s:s + c][:, None, :].expand(-1, M, 2), 0.0)  # [c, M, 2Bg]
        scores.append(per_col.sum(-1))  # own-image columns zeroed, not subtracted: exact ties stay exact
    return torch.cat(scores).view(2, B, M).argmax(-1)


def _same_label(anchor, negative):
    """The oracle's false negatives (METHOD.md 4.8): True where a negative's token label equals its anchor
    token's (broadcast), never for an unknown anchor label (-1)."""
    return (anchor == negative) & (anchor >= 0)


def _checkpointed(fn, *args):
    """fn(*args), recomputed in backward (activation checkpointing) when gradients are on."""
    return checkpoint(fn, *args, use_reentrant=False) if torch.is_grad_enabled() else fn(*args)


def _lse_all(z, z_all, own_img, tau, acc, chunk=None, labels=None, labels_all=None):
    """logsumexp over every token of every other-image view (the poster's exact sum over j-, m), chunked over
    anchor views (chunk views at a time, default: 2^24 logits a chunk); each chunk is recomputed in backward
    (activation checkpointing), so memory stays O(chunk). labels [2, B, T], labels_all [2, Bg, T]: the
    oracle's token labels (tokens of the anchor's label left out)."""
    _, B, T, D = z.shape
    Bg = z_all.shape[1]
    flat, cols = z.reshape(2 * B, T, D), z_all.reshape(2 * Bg * T, D)
    c = chunk or max(1, (1 << 24) // (T * 2 * Bg * T))

    def chunk(zc, mask, lab):
        logits = (zc @ cols.T).to(acc).view(zc.shape[0], T, 2, Bg, T) / tau
        mask = mask[:, None, :, :, None]
        if lab is not None:
            mask = mask | _same_label(lab[:, :, None, None, None], labels_all[None, None])
        return logits.masked_fill(mask, float("-inf")).flatten(2).logsumexp(-1)

    own = torch.zeros(2 * B, 2, Bg, dtype=torch.bool, device=z.device)
    own[torch.arange(2 * B, device=z.device), :, own_img.reshape(-1)] = True
    lab = labels.reshape(2 * B, T) if labels is not None else None
    out = [_checkpointed(chunk, flat[s:s + c], own[s:s + c], lab[s:s + c] if lab is not None else None)
           for s in range(0, 2 * B, c)]
    return torch.cat(out).view(2, B, T)


def _lse_independent(z, z_all, r, own, tau, acc, chunk=None, labels=None, labels_all=None):
    """logsumexp over NegImg of 'random' with a draw per anchor token (METHOD.md 4.3): anchor token t of view
    v meets token r[v, t, u] of every other-image view u. z [2, B, T, D], z_all [2Bg, T, D], r [2, B, T,
    2Bg], own [2, B, 2] the columns of each view's own image (left out); labels [2, B, T] and labels_all
    [2Bg, T]: the oracle's token labels. The [c, T, 2Bg, D] gathered negatives exist one chunk of c anchor
    views at a time (default: 2^24 elements on a GPU, 2^22 on a CPU, where they then stay in its cache),
    recomputed in backward. (Gather, multiply, sum: 1.5 s forward and backward at B 64, T 64, D 128 on a busy
    2-core CPU, against 3 s through bmm and 2.5 s through the [c*T, 2Bg*T] product table; shared: 0.12 s)."""
    _, B, T, D = z.shape
    n_cols = z_all.shape[0]
    flat, r, cols = z.reshape(2 * B, T, D), r.reshape(2 * B, T, n_cols), torch.arange(n_cols, device=z.device)
    own = torch.zeros(2 * B, n_cols, dtype=torch.bool, device=z.device).scatter_(1, own.reshape(2 * B, 2), True)
    lab = labels.reshape(2 * B, T) if labels is not None else None
    c = chunk or max(1, (1 << (24 if z.is_cuda else 22)) // (T * n_cols * D))

    def chunk(zc, rc, mask, lab):
        rows = (rc + cols * T).flatten()  # rows of the [2Bg*T, D] table (index_select: the fast CPU gather)
        negs = z_all.reshape(n_cols * T, D).index_select(0, rows).view(-1, n_cols, D)
        logits = (negs * zc.reshape(-1, 1, D)).sum(-1).view(rc.shape).to(acc) / tau  # [c, T, 2Bg]
        mask = mask[:, None, :]
        if lab is not None:
            mask = mask | _same_label(lab[..., None], labels_all.flatten()[rows].view(rc.shape))
        return logits.masked_fill(mask, float("-inf")).logsumexp(-1)

    out = [_checkpointed(chunk, flat[s:s + c], r[s:s + c], own[s:s + c], lab[s:s + c] if lab is not None else None)
           for s in range(0, 2 * B, c)]
    return torch.cat(out).view(2, B, T)


def dense_loss(z1, z2, f1, f2, *, tau, negatives, M=1, beta=None, N=0, generator=None, score_tokens=None,
               xv_exclude=0, draws=None, chunk=None, neg_draw="shared", detach_neg=False, token_labels=None):
    """Dense InfoNCE of METHOD.md 4.1, averaged over all 2B·T anchor tokens of both directions. z1, z2:
    unnormalised dense projections [B, T, Dz] (L2-normalised here); f1, f2: pairing features [B, T, Df].
    For anchor token t of view v (image i, partner view v', matched token j*(t) = match(f_v, f_v')[t]):
        p_t = z^v_t . z^v'_j*(t)
        l_{v,t} = -log e^{p_t/tau} / (e^{p_t/tau} + sum_{n in NegImg(v)} e^{z^v_t.n/tau}
                                                   + sum_{k in NegXV(v,t)} e^{z^v_t.z^v'_k/tau})
    NegImg(v), over the views u of the other images of the (gathered) batch (2Bg-2 of them):
        'densecl': norm(mean_t' Z^u_t')                  the pooled dense vector of each view   (4.2)
        'random' : z^u_{r_u},  r ~ U{0..T-1}^{2Bg}, shared by all anchors                       (4.3)
                   neg_draw='independent': z^u_{r_{v,t,u}}, a draw per anchor token and view u  (4.3)
        'guided' : z^u_{r^m*(v)_u}, M index vectors r^m, m*(v) the highest-scoring set (see
                   _guided_choice; beta thresholds inside the score)                           (4.4-4.5)
        'all'    : every token of every such view                                               (4.7, exact)
    NegXV(v, t): N tokens of the partner view drawn uniformly without replacement from {0..T-1} minus {j*(t)}
    minus the xv_exclude tokens most similar to t after j*(t) by the pairing feature (near_tokens; fewer false
    negatives), per anchor token; N = T-1-xv_exclude takes all of them deterministically (4.6). Gradients flow
    through anchors, positives and negatives; the matching and the set selection are not differentiated.
    detach_neg: every negative (NegImg and NegXV) is a constant, as a momentum encoder's keys; the anchor's
    side of each negative logit and the positive keep their gradient (4.1).
    token_labels [2B, T] int (this rank's views in z's order, -1 = unknown), an oracle DIAGNOSTIC (4.8):
    every negative token whose label equals its anchor token's (known) label leaves the sum. Not with
    'densecl' (its negatives are image means). Guided sets are still chosen without the labels.
    score_tokens=S (guided with beta only): the thresholded set score averages over S anchor tokens per view
    drawn uniformly without replacement instead of all T: T/S times less scoring work, the loss itself still
    uses every token. None or S >= T scores exactly.
    Randomness: the draws of dense_draws(generator, ...) (see there for their order), or `draws`, the output
    of that call made earlier (pretrain.py draws before its compiled region). Under DDP the cross-view keys
    and the independent draws are per rank (one process with the whole batch draws other ones); every other
    draw matches the single-process run exactly.
    chunk: anchor views per chunk of the 'all' negatives and of the thresholded set score (None: by memory
    budget; the result does not depend on it)."""
    _check_dense(z1, z2, f1, f2, negatives, M, beta, N, generator, score_tokens, draws, xv_exclude, neg_draw,
                 token_labels)
    rank, _ = world()
    B, T, Dz = z1.shape
    if draws is None:
        draws = dense_draws(generator, B=B, T=T, negatives=negatives, M=M, beta=beta, N=N,
                            score_tokens=score_tokens, xv_exclude=xv_exclude, neg_draw=neg_draw,
                            device=z1.device)
    acc = _acc(z1.dtype)
    z = F.normalize(torch.stack([z1, z2]).to(acc), dim=-1).to(z1.dtype)  # [2, B, T, Dz]
    j = torch.stack([match(f1, f2), match(f2, f1)])  # [2, B, T] index into the partner view
    zp = z.flip(0)  # partner view of each view
    keys = z.detach() if detach_neg else z  # the negatives are drawn from these
    if N > 0:
        xv = torch.einsum("abtd,absd->abts", z, keys.flip(0))  # [2, B, T, T]
    if N > 0 and not detach_neg:
        pos = xv.gather(-1, j[..., None]).squeeze(-1)
    else:
        pos = (z * zp.gather(2, j[..., None].expand(-1, -1, -1, Dz))).sum(-1)
    pos = pos.to(acc) / tau
    Bg = B * world()[1]
    if Bg < 2:
        raise ValueError("dense_loss: needs at least 2 images in the (global) batch to have "
                         "other-image negatives")
    dev = z.device
    img = rank * B + torch.arange(B, device=dev)
    own = torch.stack([img, Bg + img], -1)[None].expand(2, B, 2)  # global columns of each view's own image
    cols = torch.arange(2 * Bg, device=dev)
    labels = token_labels.view(2, B, T) if token_labels is not None else None
    labels_all = gather_images(labels).reshape(2 * Bg, T) if labels is not None else None

    if negatives == "all":
        lse_img = _lse_all(z, gather_images(keys), img[None].expand(2, B), tau, acc, chunk, labels,
                           labels_all.view(2, Bg, T) if labels is not None else None)
    elif negatives == "random" and neg_draw == "independent":
        lse_img = _lse_independent(z, gather_images(keys).reshape(2 * Bg, T, Dz), draws["sets"], own, tau, acc,
                                   chunk, labels, labels_all)
    else:
        neg_labels = None  # [2, B, 2Bg] the token label of each view's negative from view u
        if negatives == "densecl":
            pooled = F.normalize(torch.stack([z1, z2]).to(acc).mean(2), dim=-1).to(z.dtype)  # [2, B, Dz]
            negs = gather_images(pooled.detach() if detach_neg else pooled).reshape(2 * Bg, Dz)
            logits = torch.einsum("abtd,ud->abtu", z, negs)
        elif negatives == "random":
            r = draws["sets"][:, rank * B:(rank + 1) * B]
            picked = keys.gather(2, r[:, :, None, None].expand(-1, -1, 1, Dz)).squeeze(2)  # [2, B, Dz]
            negs = gather_images(picked).reshape(2 * Bg, Dz)
            logits = torch.einsum("abtd,ud->abtu", z, negs)
            if labels is not None:
                neg_labels = labels_all[cols, draws["sets"].reshape(-1)][None, None]
        else:  # guided
            r = draws["sets"]  # [M, 2Bg]: set m takes token r[m, u] of view u
            z_all = gather_images(keys).reshape(2 * Bg, T, Dz)  # every token of the global batch
            zs = z.detach()
            if beta is not None and score_tokens is not None and score_tokens < T:
                score_keys = draws["score_keys"][:, rank * B:(rank + 1) * B]
                zs = zs.gather(2, score_keys.topk(score_tokens, -1).indices[..., None].expand(-1, -1, -1, Dz))
            with torch.no_grad():
                best = _guided_choice(zs, z_all.detach(), r, own, beta, chunk)  # [2, B]
            # the chosen set of each view [2, B, 2Bg, Dz]
            negs = z_all[cols, r[best]]
            logits = torch.einsum("abtd,abud->abtu", z, negs)
            if labels is not None:
                neg_labels = labels_all[cols, r[best]]
        logits = logits.to(acc) / tau
        mask = torch.zeros(2, B, 2 * Bg, dtype=torch.bool, device=dev)
        mask = mask.scatter_(-1, own, True)[:, :, None, :]
        if neg_labels is not None:
            mask = mask | _same_label(labels[..., None], neg_labels[:, :, None, :])
        lse_img = logits.masked_fill(mask, float("-inf")).logsumexp(-1)  # [2, B, T]

    terms = [pos, lse_img]
    if N > 0:
        xv = xv.to(acc) / tau
        excluded = j[..., None]  # [2, B, T, 1 + xv_exclude]: the positive, then its nearest neighbours
        if xv_exclude:
            near = torch.stack([near_tokens(f1, f2, j[0], xv_exclude), near_tokens(f2, f1, j[1], xv_exclude)])
            excluded = torch.cat([excluded, near], -1)
        partner = labels.flip(0)[:, :, None, :].expand(-1, -1, T, -1) if labels is not None else None
        if N == T - 1 - xv_exclude:
            xv = xv.scatter(-1, excluded, float("-inf"))
        else:
            picked = draws["xv_keys"].scatter(-1, excluded, -1.0).topk(N, dim=-1).indices  # never excluded
            xv = xv.gather(-1, picked)
            partner = partner.gather(-1, picked) if labels is not None else None
        if labels is not None:
            xv = xv.masked_fill(_same_label(labels[..., None], partner), float("-inf"))
        terms.append(xv.logsumexp(-1))
    return (torch.stack(terms).logsumexp(0) - pos).mean()


def recon_loss(x, x_hat, kind="l2", norm_pix=None):
    """Auxiliary reconstruction (METHOD.md 7): mean over all elements of (x_hat - x)^2 ('l2') or |x_hat - x|
    ('l1'). x is the augmented, normalised view fed to the network [N, C, H, W]; x_hat the decoder output of
    the same shape.
    norm_pix=p (MAE's target): the target is normalised per p x p patch, over its p*p*C values,
        x_patch <- (x_patch - mean) / sqrt(var + 1e-6)      (var: the biased variance, as MAE)
    and compared with x_hat in the same pixel layout."""
    if x.shape != x_hat.shape:
        raise ValueError(f"recon_loss: x {tuple(x.shape)} and x_hat {tuple(x_hat.shape)} must "
                         f"have the same shape")
    if norm_pix:
        N, C, H, W = x.shape
        p = norm_pix
        if H % p or W % p:
            raise ValueError(f"recon_loss: norm_pix={p} must divide the {H}x{W} view")
        patches = x.reshape(N, C, H // p, p, W // p, p)
        mean = patches.mean((1, 3, 5), keepdim=True)
        var = patches.var((1, 3, 5), keepdim=True, unbiased=False)
        x = ((patches - mean) / (var + 1e-6).sqrt()).reshape(N, C, H, W)
    if kind == "l2":
        return F.mse_loss(x_hat, x)
    if kind == "l1":
        return F.l1_loss(x_hat, x)
    raise ValueError(f"recon_loss: kind={kind!r}; expected 'l2' or 'l1'")
