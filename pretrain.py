"""
Pretrain a ViT with SimCLR, DenseCL or DenseCL++ (SPEC 1.2-1.9):  L = (1-lam)*global + lam*dense + gamma*recon.

    python pretrain.py                                        # the built-in demo: tiny ViT, demo set, a few CPU minutes
    torchrun --nproc_per_node=8 pretrain.py --data /coco/annotations/instances_train2017.json --lam 0.5 --M 256
    python pretrain.py --lam 0                                # plain SimCLR;   --neg densecl: the DenseCL baseline

One process per GPU under torchrun (NCCL on CUDA, gloo on CPU) or a plain single process. Multi-node through torchrun's
own rendezvous (see the README). Every random draw is a function of (--seed, epoch, image index) or (--seed, step), so a
resumed run continues exactly and 1 process equals N processes with the same global batch.
"""
import argparse
import json
import math
import os
import shutil
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import data
import losses
import methods
import vit

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
g = parser.add_argument_group("data")
g.add_argument("--data", default=None, help="image folder (recursive) or COCO instances .json; default: the demo set, "
               "which also switches every flag you do not give to the small demo preset")
g.add_argument("--image-root", default=None, help="images folder for a COCO .json (default: guessed from the json path)")
g.add_argument("--img-size", type=int, default=224, help="crop size of each view")
g.add_argument("--workers", type=int, default=None, help="data-loader worker processes per GPU (decode + crop); "
               "default: the CPU cores divided by the processes on this node")
g = parser.add_argument_group("model")
g.add_argument("--model", default="vit_small", choices=sorted(vit.CONFIGS), help="backbone config (vit.py)")
g.add_argument("--head-hidden", type=int, default=2048, help="hidden width of the projection heads")
g.add_argument("--head-out", type=int, default=128, help="output width of the projection heads")
g.add_argument("--agg", choices=["cls", "gap"], default="gap", help="global feature: CLS token or mean of patch tokens")
g.add_argument("--pair", choices=["backbone", "head"], default="backbone", help="features of the dense matching (1.4)")
g.add_argument("--decoder", choices=["conv", "transformer"], default="conv", help="reconstruction decoder (1.7)")
g = parser.add_argument_group("objective")
g.add_argument("--lam", type=float, default=0.5, help="weight of the dense loss (0 = SimCLR)")
g.add_argument("--lam-warmup", type=int, default=0, help="steps with dense weight 0 (global loss only) before lam "
               "applies (DenseCL's warm-up; SPEC 1.8)")
g.add_argument("--neg", choices=list(losses.NEGATIVES), default="guided", help="dense negatives (SPEC 1.6)")
g.add_argument("--M", type=int, default=256, help="candidate sets of guided sampling")
g.add_argument("--beta", type=float, default=0.5, help="threshold inside the guided set score; < -1 turns it off")
g.add_argument("--N", type=int, default=64, help="cross-view negatives per anchor token (0 = none)")
g.add_argument("--xv-exclude", type=int, default=0, help="also keep out of the cross-view negatives the K partner "
               "tokens most similar to the anchor after its match, by the pairing feature (fewer false negatives)")
g.add_argument("--score-tokens", type=int, default=0, help="score the thresholded guided sets on this many random "
               "anchor tokens per view instead of all (0 = all, exact; the loss always uses every token)")
g.add_argument("--gamma", type=float, default=0.0, help="weight of the auxiliary reconstruction loss")
g.add_argument("--recon", choices=["l2", "l1"], default="l2", help="reconstruction loss")
g.add_argument("--norm-pix", action="store_true", help="reconstruction target normalised per patch (mean/variance, "
               "as MAE)")
g.add_argument("--tau-g", type=float, default=0.2, help="temperature of the global NT-Xent")
g.add_argument("--tau-d", type=float, default=0.2, help="temperature of the dense loss")
g = parser.add_argument_group("ContrastiveCrop (SPEC 4)")
g.add_argument("--crop", choices=["rrc", "ccrop"], default="rrc", help="crop of both views: RandomResizedCrop, or "
               "ContrastiveCrop (boxes from the model's heat maps, centre-suppressed sampling)")
g.add_argument("--ccrop-alpha", type=float, default=0.6, help="Beta(alpha, alpha) of the crop centre in the box "
               "(< 1 pushes centres to the box edges, 1 = uniform)")
g.add_argument("--ccrop-k", type=float, default=0.1, help="threshold on the min-max normalised heat map")
g.add_argument("--ccrop-warmup", type=int, default=20, help="epochs of plain RRC before the first localisation")
g.add_argument("--ccrop-every", type=int, default=20, help="epochs between localisation passes over the train set")
g.add_argument("--ccrop-heat", choices=list(methods.HEATS), default="cls_attn", help="heat map: last-block CLS "
               "attention, norm of the last block's tokens before the final LN, or channel sum of the final tokens")
g = parser.add_argument_group("MCL montage (SPEC 5)")
g.add_argument("--montage", action="store_true", help="add the multi-level montage loss: cells of r x r montages of "
               "re-cropped views vs the global embedding of their source image's other view")
g.add_argument("--montage-r", type=int, nargs="+", default=[2, 7], help="montage levels: cells per side, each must "
               "divide the token grid (img-size / patch); weights 1/2, 1/4, ... normalised to sum 1")
g.add_argument("--montage-block-attn", action="store_true", help="on the canvases, patch tokens attend only to "
               "their own cell (CLS attends everywhere)")
g.add_argument("--mu", type=float, default=1.0, help="weight of the montage loss")
g.add_argument("--tau-m", type=float, default=0.2, help="temperature of the montage loss")
g = parser.add_argument_group("optimisation")
g.add_argument("--batch-size", type=int, default=256, help="images per GPU (each gives two views)")
g.add_argument("--epochs", type=int, default=300)
g.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0 = run --epochs)")
g.add_argument("--lr", type=float, default=1.5e-4, help="peak AdamW learning rate per 256 images (scaled linearly)")
g.add_argument("--wd", type=float, default=0.1, help="weight decay (not on norms, biases, CLS token, pos-embed)")
g.add_argument("--warmup", type=float, default=40, help="linear warm-up epochs, then cosine decay to 0")
g.add_argument("--seed", type=int, default=0)
g = parser.add_argument_group("run")
g.add_argument("--out-dir", default="out", help="checkpoint and log folder; an existing run is resumed or refused")
g.add_argument("--resume", action="store_true", help="continue from <out-dir>/ckpt.pt (start fresh if there is none)")
g.add_argument("--ckpt-every", type=int, default=1000, help="steps between checkpoints (and one at the end)")
g.add_argument("--log-every", type=int, default=20, help="steps between log lines")
g.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")
g.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto", help="autocast dtype (auto: bf16 on CUDA)")
g.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="torch.compile (auto: on on CUDA)")

# The demo preset: what `python pretrain.py` without --data runs. Flags given on the command line still win.
DEMO = dict(model="vit_demo", img_size=64, batch_size=64, epochs=50, lr=1e-3, warmup=5, wd=0.05, head_hidden=512,
            M=16, N=8, workers=2, ckpt_every=100, log_every=10, ccrop_warmup=10, ccrop_every=10, montage_r=[2, 4])
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "B200": 2250.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}


def explicit_flags(argv):
    """The dests of the flags that appear on the command line (so presets and checkpoints do not override them)."""
    given = set()
    for a in parser._actions:
        if any(s == arg or arg.startswith(s + "=") for s in a.option_strings for arg in argv):
            given.add(a.dest)
    return given


# Flags that only act in some configurations: given explicitly where they do nothing, they are an error
NEEDS = [(("neg", "M", "beta", "N", "score_tokens", "xv_exclude", "tau_d", "pair", "lam_warmup"),
          lambda a: a.lam > 0, "a dense loss (--lam > 0)"),
         (("M", "beta", "score_tokens"), lambda a: a.neg == "guided", "--neg guided"),
         (("score_tokens",), lambda a: a.beta >= -1, "the thresholded set score (--beta >= -1)"),
         (("xv_exclude",), lambda a: a.N > 0, "cross-view negatives (--N > 0)"),
         (("decoder", "recon", "norm_pix"), lambda a: a.gamma > 0, "the reconstruction loss (--gamma > 0)"),
         (("montage_r", "montage_block_attn", "mu", "tau_m"), lambda a: a.montage, "--montage"),
         (("ccrop_alpha", "ccrop_k", "ccrop_warmup", "ccrop_every", "ccrop_heat"), lambda a: a.crop == "ccrop",
          "--crop ccrop")]


def check_flag_use(args):
    """Refuse a flag given on the command line that the configuration does not use (it would be dropped silently)."""
    for dests, used, what in NEEDS:
        for d in dests:
            if d in args.explicit and not used(args):
                raise ValueError(f"--{d.replace('_', '-')} {getattr(args, d)} has no effect without {what}: drop it or "
                                 f"change the configuration")


def peak_flops(device):
    """Dense bf16 peak of the GPU (for MFU), or None where unknown."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v * 1e12 for k, v in PEAK_TFLOPS.items() if k in name), None)


# ----------------------------------------------------------------------------------------------------------------------
# heads and decoders (SPEC 1.2, 1.7)

class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d with the statistics of the global batch across ranks, so N processes train exactly as one process
    with the whole batch (nn.SyncBatchNorm does this on CUDA only). mean = S1/n, var = S2/n - mean^2 from the summed
    S1 = sum x, S2 = sum x^2 of every rank (a differentiable gather: gradients reach every rank's inputs)."""

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
    """Linear -> (BN) -> ReLU -> Linear. Global head: with BN (SimCLR); dense head: token-wise, no BN (DenseCL)."""
    return nn.Sequential(nn.Linear(d_in, hidden, bias=not bn),  # a bias before BN is cancelled by it
                         GlobalBatchNorm1d(hidden) if bn else nn.Identity(),
                         nn.ReLU(inplace=True), nn.Linear(hidden, d_out))


class ConvDecoder(nn.Module):
    """Token map [N, D, g, g] -> log2(patch) x [ConvTranspose2d(2, stride 2) + BN + ReLU] (256, 128, 64, 32 channels)
    -> Conv1x1 -> 3 channels at the input resolution. Its BatchNorms use per-rank statistics."""

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
    """MAE-lite: Linear(D, 256) + its own pos-embed + 2 ViT blocks (width 256, 8 heads) + LN + Linear(256, p*p*3)."""

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
            x = blk(x)[0]
        p, n = self.patch, tokens.shape[0]
        x = self.out(self.norm(x)).view(n, gh, gw, p, p, 3)  # unpatchify to [N, 3, gh*p, gw*p]
        return x.permute(0, 5, 1, 3, 2, 4).reshape(n, 3, gh * p, gw * p)


class Pretrainer(nn.Module):
    """Backbone + global head + dense head (+ reconstruction decoder) (+ one montage projector per level)."""

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
            self.decoder = (ConvDecoder(D, p) if args.decoder == "conv" else TransformerDecoder(D, p, grid * grid))
        self.montage_r = list(args.montage_r) if args.montage else []
        for i, r in enumerate(self.montage_r):  # the level-r canvas is an r x r grid of cells of (grid/r)^2 tokens
            mask = methods.block_attn_mask(self.backbone.grid, r)  # ValueError naming --montage-r unless r divides
            self.register_buffer(f"block_mask{i}", mask, persistent=False)  # built once, moves with the model
        self.montage_heads = nn.ModuleList([mlp(D, args.head_hidden, args.head_out, bn=True) for _ in self.montage_r])
        self.block_attn = args.montage_block_attn

    def forward(self, x, canvases=None):
        """x: [2B, 3, S, S], view 1 of every image then view 2. Returns the global projections u [2B, Dout], the dense
        projections z [2B, T, Dout], the pairing features f [2B, T, K], the reconstruction (or None) and, given the
        montage canvases of each level (methods.build_montages), the cell projections of each level [2n*r*r, Dout]
        (SPEC 5: mean of the cell's final-LN tokens -> the level's projector), else None."""
        tokens = self.backbone.forward_features(x)
        patches = tokens[:, 1:]
        u = self.global_head(vit.global_feature(tokens, self.agg))
        z = self.dense_head(patches) if self.dense_head is not None else None
        f = patches if self.pair == "backbone" or z is None else z
        g = self.backbone.grid
        x_hat = self.decoder(patches, g, g) if self.decoder is not None else None
        cells = None
        if canvases is not None:
            cells = []
            for i, (r, c, head) in enumerate(zip(self.montage_r, canvases, self.montage_heads)):
                mask = getattr(self, f"block_mask{i}") if self.block_attn else None
                cells.append(head(methods.cell_means(self.backbone.forward_features(c, attn_mask=mask)[:, 1:], g, r)))
        return u, z, f.detach(), x_hat, cells


def dense_kwargs(args):
    """The flags of losses.dense_loss / losses.dense_draws (beta < -1 turns thresholding off; M only for guided)."""
    guided = args.neg == "guided"
    return dict(negatives=args.neg, M=args.M if guided else 1, N=args.N, xv_exclude=args.xv_exclude,
                beta=args.beta if guided and args.beta >= -1 else None,
                score_tokens=(args.score_tokens or None) if guided else None)


def objective(out, x, args, draws, cell_labels=None, lam=None):
    """The total loss of SPEC 1.8 and its terms (detached, for the log). draws: the dense loss's random draws
    (losses.dense_draws, made by step_draws). With --montage, cell_labels are the labels of methods.build_montages and
    the montage term of SPEC 5 is added: mu * sum_r w_r * L_r, w_r = 2^-(level+1) normalised to sum 1, L_r the mean
    of both directions (view-1 cells vs view-2 globals and vice versa). lam: the dense weight in force (a tensor,
    so that --lam-warmup changes it without a recompilation; default args.lam)."""
    u, z, f, x_hat, cells = out
    B = u.shape[0] // 2
    lam = args.lam if lam is None else lam
    terms = {"global": losses.nt_xent(u[:B], u[B:], args.tau_g)}
    total = (1 - lam) * terms["global"]
    if args.lam > 0:
        terms["dense"] = losses.dense_loss(z[:B], z[B:], f[:B], f[B:], tau=args.tau_d, draws=draws,
                                           **dense_kwargs(args))
        total = total + lam * terms["dense"]
    if args.gamma > 0:
        terms["recon"] = losses.recon_loss(x.float(), x_hat.float(), args.recon,
                                           vit.CONFIGS[args.model]["patch_size"] if args.norm_pix else None)
        total = total + args.gamma * terms["recon"]
    if args.montage:
        if cells is None or cell_labels is None:
            raise ValueError("objective: --montage needs the model run with the canvases and their cell_labels "
                             "(methods.build_montages)")
        w = [0.5 ** (i + 1) for i in range(len(cells))]
        terms["montage"] = 0
        for w_r, c, lab in zip(w, cells, cell_labels):
            lab, h = lab.reshape(-1) + losses.world()[0] * B, c.shape[0] // 2  # global source index; view-1 cells
            l_r = (losses.montage_loss(c[:h], u[B:], lab[:h], args.tau_m) +
                   losses.montage_loss(c[h:], u[:B], lab[h:], args.tau_m)) / 2
            terms["montage"] = terms["montage"] + w_r / sum(w) * l_r
        total = total + args.mu * terms["montage"]
    return total, {k: v.detach() for k, v in terms.items()}


# ----------------------------------------------------------------------------------------------------------------------
# optimisation

def param_groups(model, wd):
    """AdamW groups: no weight decay on norms, biases (all 1-d tensors), the CLS token and the position embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or "cls_token" in name or "pos_embed" in name or name.endswith(".pos") else
             decay).append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step, peak, warmup_steps, total_steps):
    """Linear warm-up from 0 to `peak`, then cosine decay to 0 at `total_steps`."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def step_generator(seed, step, device):
    """The generator of the dense-loss draws of one step: a function of (seed, step) only, identical on every rank."""
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + step) % (2 ** 63))
    return gen


def step_draws(args, x, generator):
    """Every random draw of one step, made before the compiled region (which then holds no generator and compiles as
    one graph), in this order from `generator`: the montages of methods.build_montages, then the dense loss's draws
    (losses.dense_draws). Returns (canvases, cell_labels, draws); the first two are None without --montage."""
    canvases, cell_labels = methods.build_montages(x, args.montage_r, generator) if args.montage else (None, None)
    draws = None
    if args.lam > 0:
        T = (args.img_size // vit.CONFIGS[args.model]["patch_size"]) ** 2
        draws = losses.dense_draws(generator, B=x.shape[0] // 2, T=T, device=x.device, **dense_kwargs(args))
    return canvases, cell_labels, draws


def make_loss_fn(model, args, amp_dtype, use_compile, fullgraph=True):
    """(x, canvases, cell_labels, draws, lam) -> (loss, terms): the forward under autocast and the objective, the
    region torch.compile sees as one graph (fullgraph=True: an error instead of a silent graph break). lam: the dense
    weight in force, a 0-dim tensor."""
    def region(x, canvases, cell_labels, draws, lam):
        with torch.autocast(x.device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            loss, terms = objective(model(x, canvases), x, args, draws, cell_labels, lam)
        # the terms leave as one stacked tensor: returned one by one next to a loss of 1.0 * term (SimCLR), the
        # compiled loss came back without grad_fn (torch 2.14, inductor)
        return loss, torch.stack(list(terms.values())), tuple(terms)
    compiled = torch.compile(region, fullgraph=fullgraph) if use_compile else region

    def loss_fn(x, canvases, cell_labels, draws, lam):
        loss, values, names = compiled(x, canvases, cell_labels, draws, lam)
        return loss, dict(zip(names, values.unbind()))
    return loss_fn


def device_views(batch, device, photometric=data.photometric):
    """The [2B, 3, S, S] float input of a TwoViews batch (view 1 of every image, then view 2): the uint8 views are
    copied to `device` and the photometric ops run there."""
    return torch.cat([photometric(batch[f"view{i}"].to(device, non_blocking=True),
                                  batch[f"photo{i}"].to(device, non_blocking=True)) for i in (1, 2)])


def device_batches(loader, device, photometric=data.photometric):
    """(device_views of each batch, its 'skipped' list) for the batches of `loader`. On CUDA the next batch's
    host->device copy (pinned memory, ~77 MB at 224 px and batch 256) runs on a side stream while the current step
    computes, instead of in front of it on the compute stream."""
    if device.type != "cuda":
        for batch in loader:
            yield device_views(batch, device, photometric), batch["skipped"]
        return
    side, keys = torch.cuda.Stream(device), ("view1", "photo1", "view2", "photo2")

    def upload(batch):
        if batch is None:
            return None
        with torch.cuda.stream(side):
            return {k: batch[k].to(device, non_blocking=True) for k in keys}, batch["skipped"]
    batches = iter(loader)
    pending = upload(next(batches, None))
    while pending is not None:
        compute = torch.cuda.current_stream(device)
        compute.wait_stream(side)  # this batch's copy is done before the step reads it
        on_device, batch_skipped = pending
        for t in on_device.values():
            t.record_stream(compute)  # its memory is not reused before the compute stream is done with it
        pending = upload(next(batches, None))  # overlaps with the step below
        yield device_views(on_device, device, photometric), batch_skipped


def compiled_parts(model, args, amp_dtype, use_compile, world_size=1):
    """What pretrain.py and bench.py run: loss_fn (make_loss_fn; one graph, fullgraph in one process) and the batched
    photometric ops (~20 fused elementwise ops), both through torch.compile when use_compile."""
    loss_fn = make_loss_fn(model, args, amp_dtype, use_compile, fullgraph=world_size == 1)
    return loss_fn, torch.compile(data.photometric) if use_compile else data.photometric


def train_step(loss_fn, opt, x, args, step):
    """One optimisation step on the views x: the step's draws (step_draws, from step_generator), the forward and the
    objective (loss_fn of make_loss_fn) with the dense weight in force (0 for the first --lam-warmup steps, then
    --lam), backward, AdamW. Returns the loss (detached) and its terms (with --lam-warmup also that weight, 'lam')."""
    canvases, cell_labels, draws = step_draws(args, x, step_generator(args.seed, step, x.device))
    lam = torch.full((), 0.0 if step < args.lam_warmup else args.lam, device=x.device)  # a fill: no host->device copy
    loss, terms = loss_fn(x, canvases, cell_labels, draws, lam)
    if args.lam_warmup:
        terms["lam"] = lam
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach(), terms


# ----------------------------------------------------------------------------------------------------------------------
# checkpoints and the run directory

def save_checkpoint(path, state):
    """torch.save to a temp file, fsync, then rename over `path`: a crash mid-write leaves the previous checkpoint."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(path):
    """Our checkpoint, refused with a message if it is not a plain tensor file or holds non-finite weights."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"--resume: {path} is not a readable checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]})") from None
    if not isinstance(ckpt, dict) or not {"model", "heads", "optimizer", "step", "args"} <= set(ckpt):
        raise ValueError(f"--resume: {path} is not a pretrain.py checkpoint (keys: {sorted(ckpt)[:8]})")
    for part in ("model", "heads"):
        bad = vit.non_finite_keys(ckpt[part])
        if bad:
            raise ValueError(f"--resume: {path} holds non-finite weights in {bad[:3]}; refusing to continue from it")
    return ckpt


def prepare_out_dir(args, rank):
    """Refuse to clobber an existing run, and report an unwritable or full disk before training starts."""
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    log_path = os.path.join(args.out_dir, "log.jsonl")
    if not args.resume and (os.path.exists(ckpt_path) or os.path.exists(log_path)):
        found = "ckpt.pt" if os.path.exists(ckpt_path) else "log.jsonl"
        raise ValueError(f"--out-dir {args.out_dir} already holds a run ({found}); pass --resume to continue it "
                         f"or choose another --out-dir")
    if rank == 0:
        try:
            os.makedirs(args.out_dir, exist_ok=True)
            probe = os.path.join(args.out_dir, f".write_test_{os.getpid()}")
            with open(probe, "wb") as fh:
                fh.write(b"\0" * 4096)
            os.remove(probe)
        except OSError as e:
            raise ValueError(f"--out-dir {args.out_dir} is not writable: {e}") from None
    return ckpt_path, log_path


def check_disk_space(out_dir, model):
    """A checkpoint holds the weights and two AdamW moments; the temp file needs room beside the old one."""
    need = 2 * 3 * sum(p.numel() * p.element_size() for p in model.parameters()) + (64 << 20)
    free = shutil.disk_usage(out_dir).free
    if free < need:
        raise ValueError(f"--out-dir {out_dir}: {free / 2**20:.0f} MiB free, a checkpoint needs about "
                         f"{need / 2**20:.0f} MiB; free some space or choose another --out-dir")


# ----------------------------------------------------------------------------------------------------------------------
# the run

def setup_distributed(args):
    if "RANK" not in os.environ:
        device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                              ("cpu" if args.device == "auto" else args.device))
        return 0, 1, device
    rank, world_size, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return rank, world_size, torch.device(f"cuda:{local}" if use_cuda else "cpu")


def resolve_args(argv):
    args = parser.parse_args(argv)
    args.explicit = explicit_flags(argv)
    if args.data is None:  # the demo: generate the set once, switch to the small preset
        args.data = os.path.join(data.make_demo(), "images", "train")
        for k, v in DEMO.items():
            if k not in args.explicit:
                setattr(args, k, v)
    return args


def train(args):
    rank, world_size, device = setup_distributed(args)
    ckpt_path, log_path = prepare_out_dir(args, rank)
    ckpt = load_checkpoint(ckpt_path) if args.resume and os.path.exists(ckpt_path) else None
    if ckpt is not None:  # the checkpoint's flags, except those given on this command line
        for k, v in ckpt["args"].items():
            if k not in args.explicit and k not in ("resume", "explicit"):
                setattr(args, k, v)
    check_flag_use(args)
    if args.workers is None:
        args.workers = max(1, (os.cpu_count() or 2) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    files = data.list_images(args.data, args.image_root)
    global_batch = args.batch_size * world_size
    if len(files) < global_batch:
        raise ValueError(f"--data {args.data}: {len(files)} images, fewer than one global batch of {global_batch}")
    steps_per_epoch = len(files) // global_batch
    total_steps = args.max_steps or args.epochs * steps_per_epoch
    warmup_steps = max(1, int(args.warmup * steps_per_epoch))
    cuda = device.type == "cuda"
    amp_dtype = torch.bfloat16 if args.dtype == "bf16" or (args.dtype == "auto" and cuda) else None
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        torch.set_flush_denormal(True)  # tiny weights/gradients turn into denormals: up to 17x slower CPU steps

    torch.manual_seed(args.seed)
    model = Pretrainer(args).to(device)
    if rank == 0:
        check_disk_space(args.out_dir, model)
    opt = torch.optim.AdamW(param_groups(model, args.wd), lr=args.lr, betas=(0.9, 0.95), fused=cuda or None)
    step, skipped = 0, set()  # unreadable files this rank has met (names, printed once each)
    if ckpt is not None:
        try:
            model.load_state_dict({**{"backbone." + k: v for k, v in ckpt["model"].items()}, **ckpt["heads"]})
            opt.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:  # another architecture / flags than this run's
            raise ValueError(f"--resume: {ckpt_path} does not fit this model: {str(e)[:600]}") from None
        step, skipped = ckpt["step"], set(ckpt["skipped"])
        torch.set_rng_state(ckpt["rng"]["torch"])
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None) if world_size > 1 \
        else model
    use_compile = args.compile == "on" or (args.compile == "auto" and cuda)
    loss_fn, photometric = compiled_parts(ddp, args, amp_dtype, use_compile, world_size)

    boxes = None  # ContrastiveCrop: one (h0, w0, h1, w1) per file, in shared memory so loader workers see updates
    if args.crop == "ccrop":
        methods.ccrop_due(0, args.ccrop_warmup, args.ccrop_every)  # checks the flags
        methods.check_ccrop_k(args.ccrop_k)
        boxes = torch.tensor(methods.FULL_BOX).repeat(len(files), 1)
        if ckpt is not None and "ccrop_boxes" in ckpt:
            if ckpt["ccrop_boxes"].shape != boxes.shape:
                raise ValueError(f"--resume: {ckpt_path} holds {ckpt['ccrop_boxes'].shape[0]} ContrastiveCrop boxes, "
                                 f"--data {args.data} has {len(files)} images")
            boxes.copy_(ckpt["ccrop_boxes"])
        boxes.share_memory_()
    dataset = data.TwoViews(files, args.img_size, seed=args.seed, boxes=boxes, ccrop_alpha=args.ccrop_alpha,
                            ccrop_warmup=args.ccrop_warmup)
    sampler = data.RunSampler(len(files), global_batch, rank, world_size, args.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, sampler=sampler,
                                         num_workers=args.workers, collate_fn=data.two_view_batch, pin_memory=cuda,
                                         prefetch_factor=4 if args.workers else None,
                                         persistent_workers=args.workers > 0)
    n_canvases = sum(2 * max(1, math.ceil(args.batch_size / r ** 2)) for r in model.montage_r) * world_size
    flops_per_step = 3 * vit.vit_flops(model.backbone.config, args.img_size) * (2 * global_batch + n_canvases)
    peak = peak_flops(device)
    if rank == 0:
        n_params = sum(p.numel() for p in model.backbone.parameters())
        print(f"{len(files)} images from {args.data}; {world_size} process(es) on {device}; global batch {global_batch}; "
              f"{steps_per_epoch} steps/epoch, {total_steps} steps; backbone {args.model} {n_params / 1e6:.1f}M params; "
              f"lam={args.lam} neg={args.neg} M={args.M} beta={args.beta} N={args.N} gamma={args.gamma} "
              f"agg={args.agg} pair={args.pair} crop={args.crop} montage={model.montage_r or 'off'}"
              + (" (resumed at step %d)" % step if ckpt else ""), flush=True)

    def checkpoint_state(epoch):
        return {"model": model.backbone.state_dict(), "vit_config": model.backbone.config,
                "heads": {k: v for k, v in model.state_dict().items() if not k.startswith("backbone.")},
                "optimizer": opt.state_dict(), "args": {k: v for k, v in vars(args).items() if k != "explicit"},
                "step": int(step), "epoch": int(epoch), "skipped": sorted(skipped),
                "rng": {"torch": torch.get_rng_state()},
                **({"ccrop_boxes": boxes.clone()} if boxes is not None else {})}

    window_start, window_steps, window_first = time.time(), 0, step
    sums = {}
    peak_lr = args.lr * global_batch / 256
    model.train()
    while step < total_steps:  # one pass of the loader; with ContrastiveCrop one pass per localisation
        epoch = step // steps_per_epoch
        stop = total_steps
        if boxes is not None:  # the loader stops where new boxes are due, so no sample is drawn with stale boxes
            due = next((e for e in range(epoch + 1, total_steps // steps_per_epoch + 1)
                        if methods.ccrop_due(e, args.ccrop_warmup, args.ccrop_every)), None)
            stop = min(total_steps, due * steps_per_epoch) if due is not None else total_steps
        sampler.set_steps(step, stop)
        if boxes is not None and step % steps_per_epoch == 0 and methods.ccrop_due(epoch, args.ccrop_warmup,
                                                                                    args.ccrop_every):
            t0 = time.time()
            boxes.copy_(methods.localise(model.backbone, files, args.img_size, args.ccrop_heat, args.ccrop_k,
                                         args.batch_size, args.workers, device, amp_dtype))
            window_start += time.time() - t0  # not counted in the img/s of the log
            if rank == 0:
                area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).mean().item()
                print(f"ccrop: new boxes at epoch {epoch}, mean area {area:.3f} ({time.time() - t0:.1f} s)", flush=True)
        for x, batch_skipped in device_batches(loader, device, photometric):
            epoch = step // steps_per_epoch
            lr = lr_at(step, peak_lr, warmup_steps, total_steps)
            for group in opt.param_groups:
                group["lr"] = lr
            loss, terms = train_step(loss_fn, opt, x, args, step)
            for k, v in [("loss", loss)] + list(terms.items()):
                sums[k] = sums.get(k, 0.0) + v.float()
            for path in set(batch_skipped) - skipped:
                skipped.add(path)
                print(f"[rank {rank}] skipped unreadable file: {path}", flush=True)
            step += 1
            window_steps += 1
            last = step == total_steps
            log_now, ckpt_now = step % args.log_every == 0 or last, step % args.ckpt_every == 0 or last
            # a non-finite loss stops the run before anything is saved from it (on CUDA checked where we sync anyway)
            if (not cuda or log_now or ckpt_now) and not torch.isfinite(sums["loss"]).item():
                if rank == 0:
                    where = f"step {step - 1}" if not cuda else f"steps {window_first}-{step - 1}"
                    print(f"error: non-finite loss at {where}; stopping. The last good checkpoint {ckpt_path} "
                          f"is left as it was.", file=sys.stderr, flush=True)
                cleanup(world_size)
                return 3
            if log_now:
                log_line(args, rank, world_size, step, epoch, total_steps, lr, sums, window_steps, window_start,
                         global_batch, flops_per_step, peak, len(skipped), log_path, device)
                sums, window_steps, window_start, window_first = {}, 0, time.time(), step
            if ckpt_now:
                if rank == 0:
                    save_checkpoint(ckpt_path, checkpoint_state(step // steps_per_epoch))
                if world_size > 1:
                    dist.barrier()
            if last:
                break
    if rank == 0:
        print(f"done: {step} steps; checkpoint {ckpt_path}; skipped {len(skipped)} unreadable files on rank 0"
              + (": " + ", ".join(sorted(skipped)) if skipped else ""), flush=True)
    cleanup(world_size)
    return 0


def log_line(args, rank, world_size, step, epoch, total_steps, lr, sums, n, t0, global_batch, flops, peak, skipped,
             log_path, device):
    """Rank 0 prints one line and appends the same as one JSON object to log.jsonl (losses averaged over ranks)."""
    keys = sorted(sums)
    vals = torch.cat([torch.stack([sums[k] for k in keys]) / n, torch.tensor([float(skipped)], device=device)])
    if world_size > 1:
        dist.all_reduce(vals)
        vals[:-1] /= world_size
    vals, skipped = vals[:-1], int(vals[-1])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dt = (time.time() - t0) / n
    rec = {"step": step, "epoch": epoch, **{k: round(v, 6) for k, v in zip(keys, vals.tolist())}, "lr": lr,
           "img_per_s": round(global_batch / dt, 1), "skipped": skipped}
    if peak:
        rec["mfu"] = round(100 * flops / dt / (peak * world_size), 2)
    if rank != 0:
        return
    eta = (total_steps - step) * dt
    terms = " ".join(f"{k} {rec[k]:.4f}" for k in keys if k != "loss")
    print(f"step {step}/{total_steps} ep {epoch} | loss {rec['loss']:.4f} ({terms}) | lr {lr:.2e} | "
          f"{rec['img_per_s']:.0f} img/s" + (f" | MFU {rec['mfu']:.1f}%" if peak else "") +
          f" | ETA {eta / 60:.1f} min" + (f" | skipped {skipped}" if skipped else ""), flush=True)
    with open(log_path, "a") as fh:
        fh.write(json.dumps(rec) + "\n")


def cleanup(world_size):
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = resolve_args(argv)
        return train(args)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
