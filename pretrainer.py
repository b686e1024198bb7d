"""
The pretraining model (METHOD.md 2-8): the backbone with the global projection head (BatchNorm over the global
batch), the token-wise dense head, the reconstruction decoders and the MCL montage projectors, and the
objective they feed. pretrain.py runs it; every head is discarded after pretraining (the checkpoint's 'model'
is the backbone alone).
"""
import math

import torch
import torch.nn as nn

import losses
import methods
import vit


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d with the statistics of the global batch across ranks, so N processes train exactly as one
    process with the whole batch (nn.SyncBatchNorm does this on CUDA only). mean = S1/n, var = S2/n - mean^2
    from the summed S1 = sum x, S2 = sum x^2 of every rank (a differentiable gather: gradients reach every
    rank's inputs)."""

    def forward(self, x):
        if not self.training or losses.world()[1] == 1:
            return super().forward(x)
        xf = x.float()
        C, n = xf.shape[1], xf.shape[0] * losses.world()[1]
        sums = losses.gather(torch.cat([xf.sum(0), (xf * xf).sum(0)])[None]).sum(0)
        mean = sums[:C] / n
        var = sums[C:] / n - mean * mean
        with torch.no_grad():
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(m * mean)
            self.running_var.mul_(1 - m).add_(m * var * n / (n - 1))
            self.num_batches_tracked += 1
        return ((xf - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias).to(x.dtype)


def mlp(d_in, hidden, d_out, bn):
    """Linear -> (BN) -> ReLU -> Linear. Global head: with BN (SimCLR); dense head: token-wise, no BN
    (DenseCL)."""
    return nn.Sequential(nn.Linear(d_in, hidden, bias=not bn),  # a bias before BN is cancelled by it
                         GlobalBatchNorm1d(hidden) if bn else nn.Identity(),
                         nn.ReLU(inplace=True), nn.Linear(hidden, d_out))


class ConvDecoder(nn.Module):
    """Token map [N, D, g, g] -> log2(patch) x [ConvTranspose2d(2, stride 2) + BN + ReLU] (256, 128, 64, 32
    channels) -> Conv1x1 -> 3 channels at the input resolution. Its BatchNorms use per-rank statistics."""

    def __init__(self, dim, patch):
        super().__init__()
        n_up = int(math.log2(patch))
        if 2 ** n_up != patch:
            raise ValueError(f"--decoder conv needs a power-of-two patch size, got {patch}")
        chans = [dim] + [max(32, 256 >> i) for i in range(n_up)]
        layers = []
        for a, b in zip(chans[:-1], chans[1:]):
            layers += [nn.ConvTranspose2d(a, b, 2, stride=2), nn.BatchNorm2d(b), nn.ReLU(inplace=True)]
        self.net = nn.Sequential(*layers, nn.Conv2d(chans[-1], 3, 1))

    def forward(self, tokens, gh, gw):
        return self.net(tokens.transpose(1, 2).reshape(tokens.shape[0], -1, gh, gw))


class TransformerDecoder(nn.Module):
    """MAE-lite: Linear(D, 256) + its own pos-embed + 2 ViT blocks (width 256, 8 heads) + LN +
    Linear(256, p*p*3)."""

    def __init__(self, dim, patch, n_tokens, width=256):
        super().__init__()
        self.patch = patch
        self.embed = nn.Linear(dim, width)
        self.pos = nn.Parameter(torch.randn(1, n_tokens, width) * 0.02)
        self.blocks = nn.ModuleList([vit.Block(width, 8) for _ in range(2)])
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.out = nn.Linear(width, patch * patch * 3)

    def forward(self, tokens, gh, gw):
        x = self.embed(tokens) + self.pos
        for blk in self.blocks:
            x = blk(x)
        p, n = self.patch, tokens.shape[0]
        x = self.out(self.norm(x)).view(n, gh, gw, p, p, 3)  # unpatchify to [N, 3, gh*p, gw*p]
        return x.permute(0, 5, 1, 3, 2, 4).reshape(n, 3, gh * p, gw * p)


class Pretrainer(nn.Module):
    """The backbone with every head of the objective (global, dense, decoder, montage projectors) and the
    objective itself, so that one forward (the region pretrain.py compiles) maps the views and the step's
    draws to the loss:
        L = (1-lam)*global + lam*dense + gamma*recon + mu*montage                              (METHOD.md 2)
    Built from pretrain.py's parsed flags (args), translated there: beta None = no thresholding, score_tokens
    None = exact scoring, M = 1 unless guided."""

    def __init__(self, args):
        super().__init__()
        self.backbone = vit.create_vit(args.model, img_size=args.img_size)
        D = self.backbone.embed_dim
        self.global_head = mlp(D, args.head_hidden, args.head_out, bn=True)
        # no dense head for SimCLR (lam 0): no wasted FLOPs, and DDP needs every parameter used
        self.dense_head = mlp(D, args.head_hidden, args.head_out, bn=False) if args.lam > 0 else None
        self.agg, self.pair = args.agg, args.pair
        self.decoder = None
        if args.gamma > 0:
            p, grid = self.backbone.patch_size, self.backbone.grid
            self.decoder = (ConvDecoder(D, p) if args.decoder == "conv"
                            else TransformerDecoder(D, p, grid * grid))
        self.montage_r = list(args.montage_r) if args.montage else []
        # the level-r canvas is an r x r grid of cells of (grid/r)^2 tokens
        for i, r in enumerate(self.montage_r):
            # ValueError naming --montage-r unless r divides
            mask = methods.block_attn_mask(self.backbone.grid, r)
            self.register_buffer(f"block_mask{i}", mask, persistent=False)  # built once, moves with the model
        self.montage_heads = nn.ModuleList([mlp(D, args.head_hidden, args.head_out, bn=True)
                                            for _ in self.montage_r])
        self.block_attn = args.montage_block_attn
        # the objective's constants
        self.lam, self.gamma, self.mu = args.lam, args.gamma, args.mu
        self.tau_g, self.tau_d, self.tau_m = args.tau_g, args.tau_d, args.tau_m
        self.dense = dict(negatives=args.neg, M=args.M, beta=args.beta, N=args.N,
                          score_tokens=args.score_tokens, xv_exclude=args.xv_exclude, neg_draw=args.neg_draw)
        self.detach_neg, self.oracle = args.detach_neg, args.oracle_negatives
        self.recon, self.norm_pix = args.recon, self.backbone.patch_size if args.norm_pix else None
        self.terms = (["global"] + ["dense"] * (self.dense_head is not None)
                      + ["recon"] * (self.decoder is not None) + ["montage"] * bool(self.montage_r))

    def draws(self, x, generator):
        """Every random draw of one step, made before the forward (which then holds no generator and compiles
        as one graph), in this order from `generator`: the montages (methods.build_montages), then the dense
        loss's draws (losses.dense_draws). Returns (canvases, cell_labels, draws), each None where unused."""
        canvases, cell_labels = None, None
        if self.montage_r:
            canvases, cell_labels = methods.build_montages(x, self.montage_r, generator)
        draws = None
        if self.dense_head is not None:
            draws = losses.dense_draws(generator, B=x.shape[0] // 2, T=self.backbone.grid ** 2,
                                       device=x.device, **self.dense)
        return canvases, cell_labels, draws

    def outputs(self, x, canvases=None):
        """x: [2B, 3, S, S], view 1 of every image then view 2. Returns the global projections u [2B, Dout],
        the dense projections z [2B, T, Dout], the pairing features f [2B, T, K], the reconstruction (or None)
        and, given the montage canvases of each level (methods.build_montages), the cell projections of each
        level [2n*r*r, Dout] (METHOD.md 8: mean of the cell's final-LN tokens -> the level's projector), else
        None."""
        tokens = self.backbone.forward_features(x)
        patches = tokens[:, 1:]
        u = self.global_head(vit.global_feature(tokens, self.agg))
        z = self.dense_head(patches) if self.dense_head is not None else None
        f = patches if self.pair == "backbone" or z is None else z
        grid = self.backbone.grid
        x_hat = self.decoder(patches, grid, grid) if self.decoder is not None else None
        cells = None
        if canvases is not None:
            cells = []
            for i, (r, c, head) in enumerate(zip(self.montage_r, canvases, self.montage_heads)):
                mask = getattr(self, f"block_mask{i}") if self.block_attn else None
                tokens = self.backbone.forward_features(c, attn_mask=mask)[:, 1:]
                cells.append(head(methods.cell_means(tokens, grid, r)))
        return u, z, f.detach(), x_hat, cells

    def objective(self, out, x, draws=None, cell_labels=None, lam=None, token_labels=None):
        """L = (1-lam)*global + lam*dense + gamma*recon + mu*montage (METHOD.md 2) on the outputs `out` of the
        views x, with the step's draws; lam: the dense weight in force (a tensor, so --lam-warmup needs no
        recompilation; default --lam); token_labels [2B, T]: the class of every token (--oracle-negatives,
        methods.token_labels). Returns (L, its terms detached)."""
        if self.oracle and self.dense_head is not None and token_labels is None:
            raise ValueError("--oracle-negatives: the objective needs token_labels (methods.OracleLabels)")
        u, z, f, x_hat, cells = out
        B = u.shape[0] // 2
        lam = self.lam if lam is None else lam
        terms = {"global": losses.nt_xent(u[:B], u[B:], self.tau_g)}
        if self.dense_head is not None:
            terms["dense"] = losses.dense_loss(z[:B], z[B:], f[:B], f[B:], tau=self.tau_d, draws=draws,
                                               detach_neg=self.detach_neg,
                                               token_labels=token_labels if self.oracle else None, **self.dense)
        if self.decoder is not None:
            terms["recon"] = losses.recon_loss(x.float(), x_hat.float(), self.recon, self.norm_pix)
        if self.montage_r:
            terms["montage"] = methods.mcl_loss(cells, u, cell_labels, self.tau_m)
        weight = {"global": 1 - lam, "dense": lam, "recon": self.gamma, "montage": self.mu}
        return sum(weight[k] * v for k, v in terms.items()), {k: v.detach() for k, v in terms.items()}

    def forward(self, x, canvases=None, cell_labels=None, draws=None, lam=None, token_labels=None):
        """The loss of the views x and the step's draws (and the oracle's token labels), and its terms stacked
        in the order of self.terms. (Returned one by one next to a loss that is 1.0 x a term, the compiled
        loss came back without grad_fn: torch 2.14.)"""
        loss, terms = self.objective(self.outputs(x, canvases), x, draws, cell_labels, lam, token_labels)
        return loss, torch.stack([terms[k] for k in self.terms])
