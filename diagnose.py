"""
Measured diagnostics of a backbone on a labelled evaluation set (METHOD.md 6.4): how often the dense matching
of pretraining finds the true correspondence, how much its matches pile up on a few tokens, and how well the
CLS attention picks out the objects.

    python diagnose.py out/ckpt.pt --out diag.json                   # the demo's val set (made if absent)
    python diagnose.py --random-init --model vit_demo                # the floor
    python diagnose.py CKPT --val-json data/demo_clutter/annotations/instances_val.json \\
        --val-images data/demo_clutter/images/val --out diag.json    # any COCO instances file

    match_acc     two views of each image, drawn as in pretraining from --seed (data.TwoViews: RandomResized-
                  Crop boxes and flips from a torch.Generator; then the photometric ops); losses.match on the
                  backbone's patch tokens (--pair backbone), in both directions; the share of the matches
                  within one token (Chebyshev distance <= 1 on the other view's grid) of the true
                  correspondence, the token of the other view whose cell holds the anchor token's centre
                  (mapped through the two crop boxes). Anchors whose centre falls outside the other view have
                  no correspondence: excluded, their share reported (outside). match_exact: the share on the
                  true token itself; match_chance: what uniformly random matches would score.
    hub_share     for each view and direction, the share of its T anchors whose match lands on the
                  k = ceil(T/20) tokens of the other view that receive the most matches (the 5% most-matched);
                  the mean over views and directions. A one-to-one matching gives k/T (hub_share_one_to_one,
                  0.0625 at 64 tokens), all anchors on one token 1. hub_share_truth: the same for the true
                  correspondences of the anchors that have one (a zoomed-in view maps several anchors to one
                  token by geometry alone).
    attn_jaccard  DINO's measure: the last block's CLS attention of each head, normalised over the patch
                  tokens, thresholded to the tokens that hold its top 60% of mass (DINO's
                  visualize_attention.py); Jaccard with the object tokens (a token is an object token when at
                  least half its area lies in the union of the image's instance masks, every category of the
                  instances file); per head the mean over the images with an object token, then the mean over
                  heads (attn_jaccard) and the best head (attn_jaccard_best); beside it the mean share of the
                  tokens that are object tokens and that the attention keeps (about 0.6 for a uniform
                  attention). Images are resized to img_size x img_size, no crop (as the probes).
"""
import argparse
import math
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import augment
import data
import demo as demo_set
import losses
import probing

ATTN_MASS = 0.6  # DINO keeps the top tokens holding 60% of the attention mass
HUB_TOP = 0.05  # the most-matched 5% of the tokens


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    probing.add_probe_args(parser)
    add = parser.add_argument
    add("--val-json", help="COCO instances file of the images and their object masks (default: the demo "
        "set's val split)")
    add("--val-images", help="folder of its images")
    add("--img-size", type=int, default=None, help="input size (default: the pretraining img_size)")
    add("--batch-size", type=int, default=64, help="images per batch")
    add("--out", default=None, help="write the diagnostics to this JSON file")
    return parser


# ------------------------------------------------------------------------------------------------------------
# the pieces, each tested by hand

def token_correspondence(box1, flip1, box2, flip2, grid):
    """The true correspondence of two views of one image: for each token of view 1 (row-major on a grid x
    grid map) the token of view 2 whose cell holds the image point at the token's centre, or -1 where that
    point lies outside view 2. box: (top, left, h, w) of the crop in image pixels, [B, 4]; flip: [B] bool, a
    view mirrored left-right after the crop (data.TwoViews). Token (r, c) has its centre at
    u = (c + 0.5)/grid, v = (r + 0.5)/grid of its view (u -> 1 - u if flipped), at image point
    (x, y) = (left + w u, top + h v); in view 2 that is u2 = (x - left2)/w2, v2 = (y - top2)/h2, inside when
    both are in [0, 1), in cell (floor(v2 grid), floor(u2 grid)), column mirrored (grid - 1 - column) if view
    2 is flipped. Returns [B, T] int64."""
    box1, box2 = box1.double(), box2.double()
    centre = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid
    u = centre.view(1, 1, grid).expand(len(box1), grid, grid)
    v = centre.view(1, grid, 1).expand(len(box1), grid, grid)
    u = torch.where(flip1.view(-1, 1, 1), 1 - u, u)
    x = box1[:, 1, None, None] + box1[:, 3, None, None] * u
    y = box1[:, 0, None, None] + box1[:, 2, None, None] * v
    u2 = (x - box2[:, 1, None, None]) / box2[:, 3, None, None]
    v2 = (y - box2[:, 0, None, None]) / box2[:, 2, None, None]
    inside = (u2 >= 0) & (u2 < 1) & (v2 >= 0) & (v2 < 1)
    col = (u2 * grid).floor().clamp(0, grid - 1).long()
    col = torch.where(flip2.view(-1, 1, 1), grid - 1 - col, col)
    row = (v2 * grid).floor().clamp(0, grid - 1).long()
    return torch.where(inside, row * grid + col, -1).flatten(1)


def hub_share(j, n_tokens, top=HUB_TOP):
    """For each row of matches j [B, A] (indices into n_tokens tokens; -1 = none, not counted), the share of
    its counted matches that land on the k = ceil(top * n_tokens) tokens receiving the most: [B] float64 (NaN
    for a row without a counted match)."""
    k = math.ceil(top * n_tokens)
    counts = torch.zeros(len(j), n_tokens + 1, dtype=torch.float64)
    counts.scatter_add_(1, (j + 1).clamp(min=0), torch.ones_like(j, dtype=torch.float64))
    counts = counts[:, 1:]
    return counts.topk(k, dim=1).values.sum(1) / counts.sum(1)


def match_stats(f1, f2, box1, flip1, box2, flip2, grid):
    """The matching diagnostics of a batch of view pairs (patch tokens f1, f2 [B, T, D] of views 1 and 2,
    boxes and flips as token_correspondence), losses.match in both directions. Returns sums over both
    directions: anchors, valid (anchors with a true correspondence), hits (Chebyshev distance <= 1 to it),
    exact, chance (sum over valid anchors of the share of the T tokens within distance 1 of the truth), hub
    and hub_truth (sums of the per-view hub_share), views and views_truth (views with a true
    correspondence)."""
    out = dict(anchors=0, valid=0, hits=0, exact=0, chance=0.0, hub=0.0, hub_truth=0.0, views=0,
               views_truth=0)
    T = grid * grid
    for a, b, box_a, flip_a, box_b, flip_b in ((f1, f2, box1, flip1, box2, flip2),
                                               (f2, f1, box2, flip2, box1, flip1)):
        j = losses.match(a, b)
        truth = token_correspondence(box_a, flip_a, box_b, flip_b, grid)
        valid = truth >= 0
        rj, cj = j // grid, j % grid
        rt, ct = truth.clamp(min=0) // grid, truth.clamp(min=0) % grid
        dist = torch.maximum((rj - rt).abs(), (cj - ct).abs())
        span = [(torch.minimum(t + 1, torch.tensor(grid - 1)) - (t - 1).clamp(min=0) + 1) for t in (rt, ct)]
        out["anchors"] += j.numel()
        out["valid"] += int(valid.sum())
        out["hits"] += int((valid & (dist <= 1)).sum())
        out["exact"] += int((valid & (dist == 0)).sum())
        out["chance"] += float((span[0] * span[1])[valid].sum()) / T
        out["hub"] += float(hub_share(j, T).sum())
        shares = hub_share(truth, T)
        out["hub_truth"] += float(shares.nan_to_num(0).sum())
        out["views"] += len(j)
        out["views_truth"] += int((~shares.isnan()).sum())
    return out


def attention_masks(attn, mass=ATTN_MASS):
    """DINO's thresholded attention (visualize_attention.py): attn [..., T] >= 0, normalised to sum 1 over
    T, sorted ascending, cumulated; a token is kept where its cumulative sum exceeds 1 - mass, i.e. the tokens
    whose higher-ranked tokens hold less than `mass` of the total. Returns bool [..., T]."""
    val, idx = attn.double().sort(dim=-1)
    keep = (val / val.sum(-1, keepdim=True)).cumsum(-1) > 1 - mass
    return torch.zeros_like(keep).scatter(-1, idx, keep)


def jaccard(a, b):
    """|a & b| / |a | b| over the last dimension of two bool tensors (0 where both are empty): float64."""
    union = (a | b).sum(-1).double()
    return torch.where(union > 0, (a & b).sum(-1).double() / union.clamp(min=1), 0.0)


def object_tokens(mask, grid):
    """The object tokens of a binary image mask [H, W] on a grid x grid token map of the image resized to a
    square: a token is an object token when at least half of its area is mask (area-averaged by
    adaptive_avg_pool2d). Returns bool [grid * grid], row-major."""
    share = F.adaptive_avg_pool2d(torch.as_tensor(mask, dtype=torch.float64)[None, None], grid)
    return (share >= 0.5).flatten()


# ------------------------------------------------------------------------------------------------------------
# the run

def attention_stats(model, coco, image_dir, size, args):
    """Per head, the sum of attn_jaccard over the images with an object token, and their count; the mean
    object-token share and the mean share of tokens the thresholded attention keeps; the unreadable files."""
    ids = sorted(coco.imgs)
    paths = probing.image_paths(coco, image_dir)
    grid = size // model.patch_size
    loader = DataLoader(probing.Images(paths, size), batch_size=args.batch_size, num_workers=args.workers)
    device = next(model.parameters()).device
    sums, n, objects, kept_share, skipped, start = 0.0, 0, 0.0, 0.0, [], 0
    for images, ok in loader:
        kept = attention_masks(model.last_cls_attention(images.to(device)).cpu())  # [B, heads, T]
        for k in range(len(images)):
            img_id = ids[start + k]
            if not ok[k]:
                skipped.append(paths[start + k])
                continue
            union = np.zeros((coco.imgs[img_id]["height"], coco.imgs[img_id]["width"]), bool)
            for ann in coco.imgToAnns.get(img_id, []):
                union |= coco.annToMask(ann).astype(bool)
            obj = object_tokens(union, grid)
            objects += float(obj.double().mean())
            kept_share += float(kept[k].double().mean())
            if obj.any():
                sums = sums + jaccard(kept[k], obj[None])
                n += 1
        start += len(images)
    readable = max(1, len(ids) - len(skipped))
    return sums, n, objects / readable, kept_share / readable, skipped


def matching_stats(model, paths, size, args):
    """match_stats summed over the two views of every image (data.TwoViews with --seed, photometric ops)."""
    views = data.TwoViews(paths, size, seed=args.seed)
    loader = DataLoader(views, batch_size=args.batch_size, num_workers=args.workers,
                        collate_fn=data.two_view_batch)
    grid, total, skipped = size // model.patch_size, None, []
    for batch in loader:
        x = augment.photometric(torch.cat([batch["view1"], batch["view2"]]),
                                torch.cat([batch["photo1"], batch["photo2"]]))
        tokens = probing.frozen_tokens(model, x)[:, 1:].cpu()
        B = len(batch["view1"])
        stats = match_stats(tokens[:B], tokens[B:], batch["box1"], batch["flip1"], batch["box2"],
                            batch["flip2"], grid)
        total = stats if total is None else {k: total[k] + v for k, v in stats.items()}
        skipped += batch["skipped"]
    return total, skipped


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    try:
        if bool(args.val_json) != bool(args.val_images):
            raise ValueError("give both --val-json and --val-images, or neither for the demo set")
        probing.check_flags(args, counts=("batch_size",))
        demo = not args.val_json
        if args.random_init and not args.model:
            args.model = "vit_demo" if demo else "vit_small"
        model, ckpt_args = probing.probe_backbone(args.ckpt, args.random_init, args.model, args.seed,
                                                  args.device)
        size = args.img_size or ckpt_args.get("img_size") or model.config["img_size"]
        if size < model.patch_size or size % model.patch_size:
            raise ValueError(f"--img-size {size}: expected a positive multiple of the patch size "
                             f"{model.patch_size}")
        if demo:
            demo_set.make_demo()
        val_json, val_dir = probing.DEMO[2:] if demo else (args.val_json, args.val_images)
        coco = probing.load_coco(val_json, val_dir)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    backbone = args.ckpt or f"random-init {args.model} seed {args.seed}"
    paths = probing.image_paths(coco, val_dir)
    grid = size // model.patch_size
    m, skipped = matching_stats(model, paths, size, args)
    sums, n_obj, object_share, kept_share, skipped_attn = attention_stats(model, coco, val_dir, size, args)
    per_head = (sums / max(1, n_obj)).tolist() if n_obj else []
    result = dict(
        match_acc=m["hits"] / max(1, m["valid"]), match_exact=m["exact"] / max(1, m["valid"]),
        match_chance=m["chance"] / max(1, m["valid"]), outside=1 - m["valid"] / m["anchors"],
        hub_share=m["hub"] / m["views"], hub_share_one_to_one=math.ceil(HUB_TOP * grid ** 2) / grid ** 2,
        hub_share_truth=m["hub_truth"] / max(1, m["views_truth"]),
        attn_jaccard=float(np.mean(per_head)) if per_head else float("nan"),
        attn_jaccard_best=max(per_head) if per_head else float("nan"), attn_jaccard_per_head=per_head,
        object_token_share=object_share, attn_token_share=kept_share)
    print(f"{backbone}: match_acc {result['match_acc']:.3f} (exact {result['match_exact']:.3f}, chance "
          f"{result['match_chance']:.3f}; {100 * result['outside']:.0f}% of anchors outside the other "
          f"view) | "
          f"hub_share {result['hub_share']:.3f} (one-to-one {result['hub_share_one_to_one']:.3f}, truth "
          f"{result['hub_share_truth']:.3f}) | attn_jaccard {result['attn_jaccard']:.3f} (best head "
          f"{result['attn_jaccard_best']:.3f}; objects {100 * object_share:.0f}%, attention "
          f"{100 * kept_share:.0f}% of tokens)")
    skipped = sorted(set(skipped) | set(skipped_attn))
    if skipped:
        print(f"skipped {len(skipped)} unreadable images, e.g. {skipped[:3]}", file=sys.stderr)
    if args.out:
        context = dict(backbone=backbone, img_size=size, grid=grid, seed=args.seed,
                       val=[val_json, val_dir], n_images=len(paths), n_jaccard_images=n_obj,
                       n_anchors=m["anchors"], skipped=skipped, attn_mass=ATTN_MASS, hub_top=HUB_TOP)
        probing.write_result(args.out, result, context)
    return 0


if __name__ == "__main__":
    sys.exit(main())
