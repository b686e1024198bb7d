"""
The two optional pretraining methods on top of pretrain.py, as plain functions:

    ContrastiveCrop (--crop ccrop, METHOD.md 9)  ccrop_due, heat_maps, heat_to_boxes / heat_to_box, localise
    MCL montage (--montage, METHOD.md 8)         assemble_montage, build_montages, block_attn_mask,
                                                 cell_means, montage_loss, mcl_loss
    oracle negatives (--oracle-negatives, 4.8)   class_masks, CocoClassMasks, token_labels, OracleLabels
                                                 (a diagnostic)

Every random draw comes from the torch.Generator passed in, in the order the docstrings give, so tests replay
them.
"""
import collections
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import augment
import data
import losses
import probing

HEATS = ("cls_attn", "token_norm", "channel_sum")
FULL_BOX = (0.0, 0.0, 1.0, 1.0)

# ------------------------------------------------------------------------------------------------------------
# ContrastiveCrop: semantic-aware localisation (METHOD.md 9); the centre-suppressed sampling is
# data.ccrop_params


def ccrop_due(epoch, warmup, every):
    """Whether the boxes are recomputed at the start of 0-based `epoch`. METHOD.md 9 in 0-based epochs: plain
    RRC before epoch W = warmup (data.TwoViews(ccrop_warmup=W)); the boxes are recomputed at the start of
    epochs e > 0 with e >= W and (e - W) % L == 0 (L = every), i.e. after e finished epochs, and used from
    epoch W on (W = 0: the initial (0, 0, 1, 1) boxes until epoch L)."""
    if warmup < 0 or every < 1:
        raise ValueError(f"--ccrop-warmup {warmup} must be >= 0 and --ccrop-every {every} >= 1")
    return epoch > 0 and epoch >= warmup and (epoch - warmup) % every == 0


def check_ccrop_k(k):
    if not 0 <= k < 1:
        raise ValueError(f"--ccrop-k {k}: expected a threshold in [0, 1)")


def heat_to_boxes(heat, k, out_hw):
    """Boxes [N, 4] = (h0, w0, h1, w1) in [0, 1] from token heat maps heat [N, gh, gw] (METHOD.md 9): per map
    min-max normalise to [0, 1], bilinear upsampling to out_hw = (H, W) (align_corners=False, as the official
    code), then rows whose max > k give [h0, h1] and columns whose max > k give [w0, w1] (no connected
    components):
        h0 = first row / H,  h1 = (last row + 1) / H,  w0 = first col / W,  w1 = (last col + 1) / W
    (the pixel-edge convention: a map over the whole image gives the initial box (0, 0, 1, 1)). A constant map
    or one with no pixel above k (or NaN) gives the full box."""
    if heat.ndim != 3:
        raise ValueError(f"heat_to_boxes: heat must be [N, gh, gw], got {tuple(heat.shape)}")
    check_ccrop_k(k)
    heat = heat.float()
    lo, hi = heat.amin((1, 2), keepdim=True), heat.amax((1, 2), keepdim=True)
    norm = (heat - lo) / (hi - lo).clamp_min(1e-12)  # a constant map becomes all 0: no pixel above k
    up = F.interpolate(norm[:, None], size=tuple(out_hw), mode="bilinear", align_corners=False)[:, 0]
    rows, cols = up.amax(2) > k, up.amax(1) > k  # [N, H], [N, W]

    def span(m):
        n = m.shape[1]
        first = m.int().argmax(1)
        last = n - 1 - m.flip(1).int().argmax(1)
        return first / n, (last + 1) / n

    (h0, h1), (w0, w1) = span(rows), span(cols)
    boxes = torch.stack([h0, w0, h1, w1], 1).float()
    empty = ~(rows.any(1) & cols.any(1))
    boxes[empty] = torch.tensor(FULL_BOX, device=boxes.device)
    return boxes


def heat_to_box(heat, k, out_hw):
    """heat_to_boxes for one map heat [gh, gw] -> (h0, w0, h1, w1) floats (METHOD.md 9)."""
    return tuple(heat_to_boxes(heat[None], k, out_hw)[0].tolist())


def heat_maps(backbone, x, kind):
    """Token heat maps [N, gh, gw] (float32) of normalised images x [N, 3, H, W], METHOD.md 9 ViT adaptation:
    'cls_attn'    last-block CLS -> patch attention, averaged over heads
    'token_norm'  L2 norm of the last block's tokens before the final LayerNorm (a hook on backbone.norm)
    'channel_sum' sum over channels of the final (LayerNorm'ed) tokens: the ResNet recipe ported literally"""
    N, _, H, W = x.shape
    gh, gw = H // backbone.patch_size, W // backbone.patch_size
    if kind == "cls_attn":
        heat = backbone.last_cls_attention(x).mean(1)
    elif kind == "token_norm":
        seen = []
        hook = backbone.norm.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
        try:
            backbone.forward_features(x)
        finally:
            hook.remove()
        heat = seen[0][:, 1:].float().norm(dim=-1)
    elif kind == "channel_sum":
        heat = backbone.forward_features(x)[:, 1:].float().sum(-1)
    else:
        raise ValueError(f"--ccrop-heat {kind!r}: expected one of {HEATS}")
    return heat.float().reshape(N, gh, gw)


class ResizedImages(torch.utils.data.Dataset):
    """The un-augmented images of the localisation pass: RGB uint8 [3, S, S], resized to S x S ignoring the
    aspect ratio (METHOD.md 9), and whether the file could be read (an unreadable file gives zeros and keeps
    the full box)."""

    def __init__(self, files, size):
        self.files, self.size = list(files), size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        S = self.size
        try:
            im = data.load_rgb(self.files[i], draft_size=(S, S)).resize((S, S), Image.BILINEAR)
        except Exception:  # as TwoViews: any decode failure; the box stays the full image
            return torch.zeros(3, S, S, dtype=torch.uint8), False
        return torch.from_numpy(np.array(im)).permute(2, 0, 1).contiguous(), True


@torch.no_grad()
def localise(backbone, files, img_size, kind, k, batch_size, workers, device, amp_dtype=None):
    """Semantic-aware localisation (METHOD.md 9): one box per file, [len(files), 4] float32 on the CPU,
    computed with the backbone in eval mode (restored afterwards) over the un-augmented images resized to
    img_size x img_size and normalised as the training views (augment.photometric with identity parameters).
    Under torch.distributed rank r does files[r::world] and the boxes are all-gathered, so every rank returns
    all of them."""
    rank, world = losses.world()
    mine = ResizedImages(files[rank::world], img_size)
    # equal-sized shards for the gather (the last rows of some ranks are padding)
    m = math.ceil(len(files) / world)
    out = torch.tensor(FULL_BOX, device=device).repeat(m, 1)
    identity = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    loader = torch.utils.data.DataLoader(mine, batch_size=batch_size, num_workers=workers)
    was_training, i = backbone.training, 0
    backbone.eval()
    try:
        for imgs, ok in loader:
            x = augment.photometric(imgs.to(device, non_blocking=True), identity.expand(len(imgs), -1))
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                heat = heat_maps(backbone, x, kind)
            boxes = heat_to_boxes(heat, k, (img_size, img_size))
            out[i:i + len(imgs)] = torch.where(ok.to(device)[:, None], boxes, out[i:i + len(imgs)])
            i += len(imgs)
    finally:
        backbone.train(was_training)
    shards = losses.gather(out).view(world, m, 4).cpu()
    boxes = torch.empty(len(files), 4)
    for r in range(world):
        boxes[r::world] = shards[r, :len(range(r, len(files), world))]
    return boxes

# ------------------------------------------------------------------------------------------------------------
# MCL montages at token granularity (METHOD.md 8, ViT adaptation)


def assemble_montage(views, r, generator):
    """Level-r montages of a batch of views [B, 3, S, S] (METHOD.md 8): n = max(1, ceil(B / r^2)) canvases [n,
    3, S, S], each an r x r row-major grid of cells of c = S/r pixels, and labels [n, r*r] (int64): the source
    image (0..B-1) of each cell. Draws from `generator`, in this order:
        idx = randperm(r*r*n) mod B                  sources, so every image is used about equally (MCL)
        u = rand(4, r*r*n) (float64)                 per cell: crop side, top, left, flip
    The cell's "independent augmentation" is a re-crop of its source view: a square of side s = lo + floor(u0
    * (S - lo + 1)), lo = max(c, ceil(S/2)) (25-100% of the view's area), at top = floor(u1*(S-s+1)), left =
    floor(u2*(S-s+1)), flipped horizontally if u3 < 0.5, then downsampled to c x c as F.interpolate(crop, (c,
    c), mode='bilinear', align_corners=False) (MCL: F.interpolate, default nearest). All cells are sampled in
    one grid_sample call; since s >= c it never reads outside the crop, so it equals that interpolate.
    The colour augmentation is the one of the source view (the canvases are built from the photometric
    output)."""
    if views.ndim != 4 or views.shape[2] != views.shape[3]:
        raise ValueError(f"assemble_montage: views must be [B, 3, S, S], got {tuple(views.shape)}")
    B, C, S, _ = views.shape
    if not isinstance(r, int) or r < 1 or S % r:
        raise ValueError(f"--montage-r {r}: expected a positive integer dividing the view size {S}")
    n, c = max(1, math.ceil(B / (r * r))), S // r
    cells = r * r * n
    gdev = generator.device
    idx = (torch.randperm(cells, generator=generator, device=gdev) % B).to(views.device)
    u = torch.rand(4, cells, generator=generator, device=gdev, dtype=torch.float64).to(views.device)
    lo = max(c, math.ceil(S / 2))
    s = (lo + (u[0] * (S - lo + 1)).floor()).clamp(max=S)
    top, left = (u[1] * (S - s + 1)).floor(), (u[2] * (S - s + 1)).floor()
    sign = torch.where(u[3] < 0.5, -1.0, 1.0).to(torch.float64)
    # output [-1, 1] -> input [-1, 1]
    theta = torch.zeros(cells, 2, 3, dtype=torch.float64, device=views.device)
    theta[:, 0, 0], theta[:, 0, 2] = sign * s / S, (2 * left + s) / S - 1
    theta[:, 1, 1], theta[:, 1, 2] = s / S, (2 * top + s) / S - 1
    grid = F.affine_grid(theta.to(views.dtype), [cells, C, c, c], align_corners=False)
    small = F.grid_sample(views[idx], grid, mode="bilinear", padding_mode="border", align_corners=False)
    canvases = small.view(n, r, r, C, c, c).permute(0, 3, 1, 4, 2, 5).reshape(n, C, S, S)
    return canvases, idx.view(n, r * r)


def build_montages(x, levels, generator):
    """The montages of one step: x = [view 1 of B images, view 2 of them] [2B, 3, S, S]. For each level r (in
    order): canvases [2n, 3, S, S] = (assemble_montage(view 1), assemble_montage(view 2)) and labels [2n, r*r]
    (0..B-1)."""
    B = x.shape[0] // 2
    canvases, labels = [], []
    for r in levels:
        (c1, l1), (c2, l2) = assemble_montage(x[:B], r, generator), assemble_montage(x[B:], r, generator)
        canvases.append(torch.cat([c1, c2]))
        labels.append(torch.cat([l1, l2]))
    return canvases, labels


def _check_level(grid, r):
    if r < 1 or grid % r:
        raise ValueError(f"--montage-r {r}: expected a positive integer dividing the token grid {grid}")


def _cell_of_token(grid, r):
    """Row-major cell index (0..r*r-1) of each of the grid x grid tokens of a level-r canvas, [grid*grid]."""
    _check_level(grid, r)
    t = torch.arange(grid) // (grid // r)
    return (t[:, None] * r + t[None, :]).flatten()


def block_attn_mask(grid, r):
    """Attention mask [1+T, 1+T] (bool, True = may attend; rows = queries, CLS first) of --montage-block-attn
    (METHOD.md 8): a patch token attends only to the patch tokens of its own cell; the CLS token attends to
    everything ("keeps CLS free"), but patch tokens do not attend to CLS, which would carry other cells'
    content into a cell from the second block on. So a cell's tokens, and its embedding, depend on its own
    pixels only."""
    cell = _cell_of_token(grid, r)
    T = cell.numel()
    mask = torch.zeros(1 + T, 1 + T, dtype=torch.bool)
    mask[1:, 1:] = cell[:, None] == cell[None, :]
    mask[0] = True
    return mask


def cell_means(tokens, grid, r):
    """Cell embeddings (METHOD.md 8): the mean of each cell's patch tokens. tokens [n, T, D] (T = grid^2,
    row-major) -> [n * r * r, D], canvas-major then row-major cells (the layout of assemble_montage's
    labels)."""
    n, T, D = tokens.shape
    if T != grid * grid:
        raise ValueError(f"cell_means: {T} tokens is not a {grid} x {grid} grid")
    _check_level(grid, r)
    k = grid // r
    return tokens.reshape(n, r, k, r, k, D).mean((2, 4)).reshape(n * r * r, D)


def montage_loss(cells, targets, labels, tau):
    """MCL's montage loss for one level and one direction, ViT port (METHOD.md 8). cells: unnormalised
    projections [Nc, D] of the montage cells; targets: unnormalised global projections [B, D] of this rank's
    images (the other view); labels [Nc] (int64): the global index rank*B + i of each cell's source image.
    With p = norm(cells), y = norm(targets) gathered over ranks (Bg rows, differentiable: the targets carry
    gradient, SimCLR style):
        l_c = -log exp(p_c.y_label(c)/tau) / sum_{j < Bg} exp(p_c.y_j/tau),     L = mean_c l_c
    i.e. the positive is the source image, the negatives all other images of the global batch. Returns the
    mean over this rank's cells (the DDP convention of losses.py's docstring)."""
    if cells.ndim != 2 or targets.ndim != 2 or cells.shape[1] != targets.shape[1]:
        raise ValueError(f"montage_loss: cells [Nc, D] and targets [B, D] need the same D; got "
                         f"{tuple(cells.shape)} and {tuple(targets.shape)}")
    if labels.shape != cells.shape[:1] or labels.dtype != torch.int64:
        raise ValueError(f"montage_loss: labels must be int64 [Nc={cells.shape[0]}], got {labels.dtype} "
                         f"{tuple(labels.shape)}")
    y = losses.gather(F.normalize(targets.to(losses._acc(targets.dtype)), dim=-1))
    if labels.numel() and not torch.compiler.is_compiling() and not (  # (a host sync: eager only)
            0 <= int(labels.min()) and int(labels.max()) < y.shape[0]):
        raise ValueError(f"montage_loss: labels must index the {y.shape[0]} gathered targets, got "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    p = F.normalize(cells.to(y.dtype), dim=-1)
    with torch.autocast(p.device.type, enabled=False):  # [Nc, Bg] logits in float32, as nt_xent
        return F.cross_entropy(p @ y.T / tau, labels)


def mcl_loss(cells, u, labels, tau):
    """MCL's multi-level montage loss (METHOD.md 8), both directions and all levels. For level r (in the order
    given) cells[r]: unnormalised cell projections [2n*r*r, D], the cells of the view-1 canvases then of the
    view-2 canvases (build_montages); labels[r]: [2n, r*r] (int64) source image 0..B-1 of each cell on this
    rank; u: global projections [2B, D] of this rank's views (view 1 of every image, then view 2). With
    w_r = 2^-(r+1) normalised to sum 1 over the levels, c1 / c2 the cells of the view-1 / view-2 canvases and
    u1 / u2 the view-1 / view-2 globals:
        L = sum_r w_r * (montage_loss(c1, u2) + montage_loss(c2, u1)) / 2
    each cell's positive being the other view of its source image (global index rank*B + label)."""
    if len(cells) != len(labels) or not cells:
        raise ValueError(f"mcl_loss: one labels tensor per level; got {len(cells)} levels of cells, "
                         f"{len(labels)} of labels")
    B, offset = u.shape[0] // 2, losses.world()[0] * (u.shape[0] // 2)
    w = [0.5 ** (i + 1) for i in range(len(cells))]
    total = 0
    for w_r, c, lab in zip(w, cells, labels):
        lab, h = lab.reshape(-1) + offset, c.shape[0] // 2
        both = montage_loss(c[:h], u[B:], lab[:h], tau) + montage_loss(c[h:], u[:B], lab[h:], tau)
        total = total + w_r / sum(w) * both / 2
    return total


# ------------------------------------------------------------------------------------------------------------
# oracle false negatives (--oracle-negatives, METHOD.md 4.8): a diagnostic that reads the class masks


def class_masks(files):
    """The class mask of every file of a demo-layout set (demo.make_demo): <root>/images/<split>/<stem>.jpg ->
    <root>/voc/SegmentationClass/<stem>.png, each a uint8 [H, W] tensor of palette indices (0 background,
    1.. the classes, 255 void), all loaded once."""
    masks = []
    for f in files:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(f))))
        path = os.path.join(root, "voc", "SegmentationClass", os.path.splitext(os.path.basename(f))[0] + ".png")
        if not os.path.exists(path):
            raise ValueError(f"--oracle-negatives needs the class mask of every image (a demo-layout set, "
                             f"demo.make_demo); {path} for {f} does not exist")
        with Image.open(path) as im:
            masks.append(torch.from_numpy(np.array(im)))
    return masks


class CocoClassMasks:
    """The class masks of a COCO instances .json given as --data (data.list_images: its images in the json's
    order): mask i is probing.coco_mask of image i (0 the unlabelled rest, 1..K the json's categories in id
    order, 255 crowd); with stuff_json (COCO-Stuff's annotations of the same image ids) its stuff categories
    follow as K+1.., painted first, the things over them. Made on first use and kept at every `stride`-th pixel
    of both axes (pixel (y, x) of the image is mask[y // stride, x // stride]). At 640x480 a mask takes ~10 ms
    to make (pycocotools, in the training process, once per image) and ~19 KB to keep at stride 4: ~2.3 GB a
    process once all of COCO train2017 has passed. A mask that cannot be made (an annotation that does not fit
    its image's size in the json) is kept empty, so that token_labels finds it unfit."""

    def __init__(self, json_path, files, image_root=None, stride=4, stuff_json=None):
        images = image_root or data.coco_image_root(json_path)
        paths = [json_path] + ([stuff_json] if stuff_json else [])
        self.cocos = [probing.load_coco(p, images, check_images=False) for p in paths]
        self.ids = [im["id"] for im in self.cocos[0].dataset["images"]]
        if len(self.ids) != len(files):
            raise ValueError(f"--oracle-negatives: {json_path} names {len(self.ids)} images, --data {len(files)}")
        cats = [c for coco in self.cocos for c in sorted(coco.cats)]
        if len(set(cats)) != len(cats) or len(cats) > 254:
            raise ValueError(f"--oracle-negatives: {len(cats)} categories in {json_path} and --oracle-stuff "
                             f"{stuff_json}: a uint8 mask needs at most 254, with no id in both")
        if stuff_json and not set(self.ids) <= set(self.cocos[1].imgs):
            raise ValueError(f"--oracle-stuff: {stuff_json} lacks images of {json_path}, e.g. id "
                             f"{min(set(self.ids) - set(self.cocos[1].imgs))}")
        self.cat_index = {c: k + 1 for k, c in enumerate(cats)}
        self.stride, self.kept = stride, {}

    def __getitem__(self, i):
        if i not in self.kept:
            try:
                mask = probing.coco_mask(self.cocos[-1], self.ids[i], self.cat_index)
                if len(self.cocos) == 2:  # the things over the stuff
                    things = probing.coco_mask(self.cocos[0], self.ids[i], self.cat_index)
                    mask = np.where(things > 0, things, mask)
                mask = mask[::self.stride, ::self.stride]
            except (ValueError, IndexError, TypeError, KeyError):  # an annotation that does not fit its image
                mask = np.zeros((0, 0), np.uint8)  # fits no image: token_labels finds it unfit
            self.kept[i] = torch.from_numpy(np.ascontiguousarray(mask))
        return self.kept[i]


def token_labels(masks, batch, grid, stride=1, unfit=None):
    """The class of every token of both views of a data.TwoViews batch: [2B, grid*grid] int64 (view 1 of
    every image, then view 2; -1 where the class is void). For view k of image b: the mask of file
    batch['index'][b] (of size batch['size'][b], or kept at every `stride`-th pixel: ceil(H / stride) x
    ceil(W / stride)), cropped to the view's box (top, left, h, w) = batch['boxk'][b] on the original image,
    token (r, c) of the grid takes the pixel at its centre
        (top + floor((r + 1/2) h / grid), left + floor((c + 1/2) w / grid))   (each divided by stride, floored)
    and the grid is mirrored left-right where batch['flipk'][b] (the view was). A mask of another size is an
    error, or with a set `unfit` (a long run) its image's index is added to it and its tokens are unknown."""
    out, odd = [], 2 * torch.arange(grid) + 1  # token centres at (2r + 1) / (2 grid), in integers
    for k in (1, 2):
        for b, i in enumerate(batch["index"].tolist()):
            mask = masks[i]
            if list(mask.shape) != [-(-n // stride) for n in batch["size"][b].tolist()]:
                if unfit is not None:
                    unfit.add(i)
                    out.append(torch.full((grid * grid,), -1, dtype=torch.long))
                    continue
                raise ValueError(f"--oracle-negatives: the class mask of image {i} is {tuple(mask.shape)} (every "
                                 f"{stride}th pixel), the image {tuple(batch['size'][b].tolist())}")
            top, left, h, w = (int(v) for v in batch[f"box{k}"][b].tolist())
            labels = mask[(top + odd * h // (2 * grid)) // stride][:, (left + odd * w // (2 * grid)) // stride].long()
            out.append((labels.flip(-1) if batch[f"flip{k}"][b] else labels).flatten())
    labels = torch.stack(out)
    return labels.masked_fill_(labels == 255, -1)


class OracleLabels:
    """--oracle-negatives: the token labels of each batch of a loader. tap(loader) passes its batches on
    unchanged and keeps each one's crop geometry; next(step) gives the token_labels of the oldest batch kept,
    so that it pairs with the views of the same batch however far ahead augment.device_batches reads.
    shuffle_seed (--oracle-shuffle, the oracle's control): the labels of step s permuted across all of the
    batch's tokens by torch.randperm under a generator seeded with (shuffle_seed, s), the same draw after a
    resume: the oracle then leaves out about as many negatives, but not by class (METHOD.md 4.8). An image
    whose mask is not its size (a wrong width/height in a COCO json) is named on stderr and its tokens are
    unknown: a long run goes on."""

    KEYS = ("index", "size", "box1", "box2", "flip1", "flip2")

    def __init__(self, files, grid, shuffle_seed=None, coco_json=None, image_root=None, stuff_json=None):
        """The class masks of a demo-layout set (class_masks, all loaded now), or with coco_json (a COCO
        instances .json given as --data) made from its annotations, and stuff_json's, as batches need them
        (CocoClassMasks)."""
        self.masks = CocoClassMasks(coco_json, files, image_root, stuff_json=stuff_json) if coco_json else \
            class_masks(files)
        self.stride = self.masks.stride if coco_json else 1
        self.grid, self.pending, self.shuffle_seed = grid, collections.deque(), shuffle_seed
        self.files, self.unfit = files, set()

    def tap(self, loader):
        for batch in loader:
            self.pending.append({k: batch[k] for k in self.KEYS})
            yield batch

    def next(self, step=0):
        before = set(self.unfit)
        labels = token_labels(self.masks, self.pending.popleft(), self.grid, self.stride, self.unfit)
        for i in sorted(self.unfit - before):  # a wrong size in a COCO json: its tokens unknown, the run goes on
            print(f"--oracle-negatives: the class mask of {self.files[i]} cannot be made or is not the size of the "
                  f"image (its tokens count as unknown; {len(self.unfit)} such images so far)", file=sys.stderr)
        if self.shuffle_seed is None:
            return labels
        g = torch.Generator().manual_seed(self.shuffle_seed * 1_000_003 + step)
        return labels.flatten()[torch.randperm(labels.numel(), generator=g)].view_as(labels)
