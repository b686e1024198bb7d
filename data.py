"""
Data for two-view contrastive pretraining, top to bottom:

    load_rgb / list_images           any image file -> RGB PIL image; a folder or a COCO json -> sorted file list
    rrc_params / ccrop_params        RandomResizedCrop / ContrastiveCrop boxes (SPEC 1.9, 4), draws from a Generator
    TwoViews                         loader-worker side: decode + 2 geometric crops + flips + photometric parameters
    photometric                      training-device side: batched colour jitter, grayscale, blur, normalisation
    two_view_batch / EpochSampler    collate and a deterministic, resumable, rank-aware sampler
    make_demo                        the built-in synthetic dataset (COCO json + VOC layout), generated on first use

Randomness: every draw comes from a torch.Generator. A sample's generator is seeded from (seed, epoch, index) only, so
the views do not depend on the number of workers, their order, the number of processes, or on resuming mid-epoch.
"""
import io
import json
import math
import os
import shutil
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
try:  # libjpeg-turbo through torchvision: ~1.5x faster than PIL's decode. Deprecated since torchvision 0.29 in favour
    from torchvision.io import ImageReadMode, decode_jpeg, read_file  # of TorchCodec; PIL takes over once it is gone
except ImportError:
    decode_jpeg = None

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMG_EXTS = ('.jpg', '.jpeg', '.png', '.webp', '.bmp')
BACKGROUND = (128, 128, 128)  # transparent pixels are composited onto mid-grey
MAX_TRIES = 50  # a sample gives up after this many unreadable files in a row

# ----------------------------------------------------------------------------------------------------------------------
# image files


def _open(path):
    """Image.open that turns PIL's decompression-bomb warning (more than Image.MAX_IMAGE_PIXELS pixels) into an error,
    so a huge image is skipped like a corrupt one instead of being decoded into all of memory."""
    with warnings.catch_warnings():
        warnings.simplefilter('error', Image.DecompressionBombWarning)
        try:
            return Image.open(path)
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
            raise ValueError(f"{path}: larger than Image.MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS} ({e})") from None


def _to_rgb(im):
    """Decode an opened image to 8-bit RGB. 16/32-bit integer modes (I;16*, I) are read as 0..65535 and scaled by
    255/65535; images with alpha (RGBA, LA, PA, or a 'transparency' entry as in P/L/RGB PNGs) are composited onto
    BACKGROUND (mid-grey)."""
    if im.mode.startswith('I'):
        a = np.asarray(im).astype(np.float64) * (255 / 65535)
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8)).convert('RGB')
    if im.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La') or 'transparency' in im.info:
        im = im.convert('RGBA')
        return Image.alpha_composite(Image.new('RGBA', im.size, BACKGROUND + (255,)), im).convert('RGB')
    return im.convert('RGB')


def load_rgb(path, draft_size=None):
    """Open an image file of any PIL mode (1, L, P, RGB, RGBA, LA, CMYK, I;16, ...) and return an 8-bit RGB PIL image
    (see _to_rgb: alpha is composited on mid-grey (128,128,128), 16-bit is scaled by 255/65535).
    draft_size=(w, h): a JPEG is decoded at 1/2, 1/4 or 1/8 scale (DCT scaling, PIL's Image.draft) as long as the result
    stays >= (w, h). Raises on unreadable, truncated or non-image files and on images above Image.MAX_IMAGE_PIXELS."""
    with _open(path) as im:
        if draft_size is not None:
            im.draft('RGB', tuple(draft_size))
        return _to_rgb(im)


def list_images(data, image_root=None):
    """Image paths from `data`:
    - a folder: every file below it (recursively) whose extension is in IMG_EXTS (any case), sorted;
    - a COCO instances .json: the `file_name` of each entry of `images` (json order), joined to image_root. By default
      image_root is <json folder>/../<split> (annotations/instances_train2017.json -> train2017/), else
      <json folder>/../images/<split> (the demo layout); split = the file name's last '_' part without '.json'."""
    data = os.fspath(data)
    if not os.path.exists(data):
        raise FileNotFoundError(f"data={data!r} does not exist (expected an image folder or a COCO instances .json)")
    if os.path.isdir(data):
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(data) for f in fs if f.lower().endswith(IMG_EXTS))
        if not files:
            raise ValueError(f"data={data!r}: no image files ({', '.join(IMG_EXTS)}) found in this folder or below")
        return files
    try:
        with open(data) as f:
            coco = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"data={data!r} is neither a folder nor a valid COCO .json ({e})") from None
    if not isinstance(coco, dict) or not isinstance(coco.get('images'), list):
        raise ValueError(f"data={data!r}: a COCO json needs an 'images' list of {{'file_name': ...}} entries")
    if image_root is None:
        split = os.path.basename(data)[:-len('.json')].split('_')[-1]
        parent = os.path.dirname(os.path.dirname(os.path.abspath(data)))
        tried = [os.path.join(parent, split), os.path.join(parent, 'images', split)]
        image_root = next((d for d in tried if os.path.isdir(d)), None)
        if image_root is None:
            raise FileNotFoundError(f"data={data!r}: no image folder found at {' or '.join(tried)}; pass image_root")
    files = [os.path.join(image_root, im['file_name']) for im in coco['images']]
    if not files:
        raise ValueError(f"data={data!r}: the 'images' list is empty")
    return files

# ----------------------------------------------------------------------------------------------------------------------
# crop boxes: (top, left, h, w) in pixels of an H x W image


def _rrc_size(H, W, scale, ratio, g):
    """The crop size of torchvision's RandomResizedCrop.get_params, same float32 draws from g: up to 10 tries of
    area = U(scale)*H*W, aspect = w/h = exp(U(log ratio)), w = round(sqrt(area*aspect)), h = round(sqrt(area/aspect)),
    accepted if 0 < h <= H and 0 < w <= W. Returns (h, w, True), or after 10 misses (h, w, False) of the central
    fallback: the whole image with its aspect clamped into `ratio`."""
    log_r = torch.log(torch.tensor(ratio)).tolist()
    for _ in range(10):
        area = H * W * torch.empty(1).uniform_(scale[0], scale[1], generator=g).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_r[0], log_r[1], generator=g)).item()
        w, h = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if 0 < w <= W and 0 < h <= H:
            return h, w, True
    if W / H < min(ratio):
        w, h = W, int(round(W / min(ratio)))
    elif W / H > max(ratio):
        h, w = H, int(round(H * max(ratio)))
    else:
        h, w = H, W
    return h, w, False


def rrc_params(H, W, scale, ratio, g):
    """RandomResizedCrop box (top, left, h, w), exactly torchvision's algorithm (same draws in the same order, so with
    g = torch.default_generator it reproduces T.RandomResizedCrop.get_params): size from _rrc_size, then
    top ~ randint(0, H-h+1), left ~ randint(0, W-w+1); the fallback crop is centred."""
    h, w, ok = _rrc_size(H, W, scale, ratio, g)
    if not ok:
        return (H - h) // 2, (W - w) // 2, h, w
    top = torch.randint(0, H - h + 1, (1,), generator=g).item()
    left = torch.randint(0, W - w + 1, (1,), generator=g).item()
    return top, left, h, w


def _beta(alpha, g):
    """One Beta(alpha, alpha) draw from g: X/(X+Y), X, Y ~ Gamma(alpha) (float64, so X+Y cannot underflow to 0)."""
    x, y = torch._standard_gamma(torch.full((2,), float(alpha), dtype=torch.float64), generator=g).tolist()
    return x / (x + y)


def ccrop_params(H, W, box, scale, ratio, alpha, g):
    """ContrastiveCrop box (top, left, h, w), SPEC 4 / the official code: h, w drawn as RRC (same fallback); then with
    the normalised box (h0, w0, h1, w1)
        ch0 = clip(int(H*h0) - h//2, 0, H-h),  ch1 = clip(int(H*h1) - h//2, 0, H-h),  top = ch0 + floor((ch1-ch0)*b1)
        cw0 = clip(int(W*w0) - w//2, 0, W-w),  cw1 = clip(int(W*w1) - w//2, 0, W-w),  left = cw0 + floor((cw1-cw0)*b2)
    b1, b2 ~ Beta(alpha, alpha) independent: the crop centre lies in the box, alpha < 1 pushes it towards the box edges.
    (The official code clips ch0 only from below and ch1 only from above; clipping both keeps crops in the image.)"""
    h, w, ok = _rrc_size(H, W, scale, ratio, g)
    if not ok:
        return (H - h) // 2, (W - w) // 2, h, w
    h0, w0, h1, w1 = box
    ch0, ch1 = (min(max(int(H * v) - h // 2, 0), H - h) for v in (h0, h1))
    cw0, cw1 = (min(max(int(W * v) - w // 2, 0), W - w) for v in (w0, w1))
    top = ch0 + math.floor((ch1 - ch0) * _beta(alpha, g))
    left = cw0 + math.floor((cw1 - cw0) * _beta(alpha, g))
    return top, left, h, w

# ----------------------------------------------------------------------------------------------------------------------
# the two-view dataset (runs in loader workers)

PHOTO_KEYS = ('brightness', 'contrast', 'saturation', 'hue', 'gray', 'blur_sigma')  # layout of a 'photo' vector, P = 6


def draw_photo(g):
    """Photometric parameters of one view (SPEC 1.9), always 8 draws from g. ColorJitter(0.4, 0.4, 0.4, 0.1) with p=0.8:
    brightness, contrast, saturation ~ U(0.6, 1.4), hue ~ U(-0.1, 0.1), or the identity (1, 1, 1, 0) when not applied;
    gray = 1 with p=0.2 else 0; blur_sigma ~ U(0.1, 2) with p=0.5 else 0 (= no blur)."""
    u = torch.rand(8, generator=g, dtype=torch.float64).tolist()
    jitter = u[0] < 0.8
    b, c, s = ((0.6 + 0.8 * v) if jitter else 1.0 for v in u[1:4])
    hue = (-0.1 + 0.2 * u[4]) if jitter else 0.0
    gray = float(u[5] < 0.2)
    sigma = (0.1 + 1.9 * u[7]) if u[6] < 0.5 else 0.0
    return torch.tensor([b, c, s, hue, gray, sigma], dtype=torch.float32)


class TwoViews(torch.utils.data.Dataset):
    """Decode + geometric crop in loader workers; returns uint8 views and the photometric parameters.

    Sample i uses the generator seeded with ((seed*1_000_003 + epoch)*10_000_019 + i) mod 2**63 and draws per view, in
    this order: crop box (rrc_params, or ccrop_params with boxes[index] when `boxes` is given), flip ~ Bernoulli(0.5),
    photometric parameters (draw_photo). The boxes are drawn on the original size (read from the file header), then a
    JPEG is decoded at the largest DCT reduction (1/2, 1/4, 1/8) that keeps both crops >= img_size pixels on each side
    (PIL's draft; at full size through torchvision's decode_jpeg, which is faster), and each crop (its corners rounded
    to the decoded grid) is resized to img_size x img_size with torch's antialiased bilinear interpolation on uint8.
    `boxes` ([n_files, 4] normalised (h0, w0, h1, w1), SPEC 4) is read at __getitem__ time, so a tensor in shared memory
    updated in place by the trainer is seen by running workers; pass boxes=None for plain RRC. With ccrop_warmup=W the
    boxes are used from epoch W on and epochs < W use plain RRC (SPEC 4 warm-up; read from the shared epoch, so
    persistent workers switch too).
    A file that fails to load is skipped: files (i+1) % n, (i+2) % n, ... are tried with the same generator seed, the
    failed paths are returned in 'skipped', and RuntimeError is raised after MAX_TRIES failures in a row."""

    def __init__(self, files, img_size=224, scale=(0.2, 1.0), ratio=(3/4, 4/3), seed=0, boxes=None, ccrop_alpha=0.6,
                 ccrop_warmup=0):
        if len(files) == 0:
            raise ValueError("TwoViews: files is empty (expected a list of image paths, see list_images)")
        if not (isinstance(img_size, int) and img_size >= 1):
            raise ValueError(f"TwoViews: img_size={img_size!r}, expected a positive int")
        if not (0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1]):
            raise ValueError(f"TwoViews: scale={scale}, ratio={ratio}; expected 0 < scale[0] <= scale[1] <= 1 and "
                             "0 < ratio[0] <= ratio[1]")
        if boxes is not None and tuple(boxes.shape) != (len(files), 4):
            raise ValueError(f"TwoViews: boxes has shape {tuple(boxes.shape)}, expected ({len(files)}, 4)")
        if ccrop_alpha <= 0:
            raise ValueError(f"TwoViews: ccrop_alpha={ccrop_alpha}, expected > 0")
        self.files, self.img_size, self.scale, self.ratio = list(files), img_size, tuple(scale), tuple(ratio)
        self.seed, self.boxes, self.ccrop_alpha, self.ccrop_warmup = seed, boxes, ccrop_alpha, ccrop_warmup
        # in shared memory, so that set_epoch also reaches persistent loader workers
        self.epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch):
        self.epoch.fill_(epoch)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, key):
        """key: an index i (drawn with the epoch of set_epoch) or a pair (epoch, i) (RunSampler's keys)."""
        epoch, i = key if isinstance(key, tuple) else (int(self.epoch), key)
        skipped, n, error = [], len(self.files), None
        for t in range(min(MAX_TRIES, n)):
            j = (i + t) % n
            g = torch.Generator().manual_seed(((self.seed * 1_000_003 + epoch) * 10_000_019 + i) % 2**63)
            try:
                out = self.load(j, g, epoch)
            except Exception as e:  # any decode failure (PIL raises OSError, ValueError, SyntaxError...) skips the file
                skipped.append(self.files[j])
                error = e
                continue
            out['index'] = torch.tensor(j)
            out['skipped'] = skipped
            return out
        raise RuntimeError(f"TwoViews: {len(skipped)} unreadable files in a row from index {i}: {skipped} "
                           f"(last error: {error!r})")

    def load(self, j, g, epoch):
        """Sample j's two views with the draws of g (see the class docstring)."""
        S, path = self.img_size, self.files[j]
        with _open(path) as im:  # reads the header only: size, format, mode, decompression-bomb check
            W, H = im.size
            views = []
            for _ in range(2):
                if self.boxes is None or epoch < self.ccrop_warmup:
                    box = rrc_params(H, W, self.scale, self.ratio, g)
                else:
                    box = ccrop_params(H, W, self.boxes[j].tolist(), self.scale, self.ratio, self.ccrop_alpha, g)
                flip = torch.rand((), generator=g).item() < 0.5
                views.append((box, flip, draw_photo(g)))
            f = min(min(box[2], box[3]) for box, _, _ in views) / S  # largest downscale keeping both crops >= S px
            drafted = im.draft('RGB', (math.ceil(W / f), math.ceil(H / f))) if f >= 2 else None  # None: not a JPEG
            if decode_jpeg and drafted is None and im.format == 'JPEG' and im.mode in ('RGB', 'L', 'CMYK'):
                img = decode_jpeg(read_file(path), mode=ImageReadMode.RGB)  # libjpeg-turbo, ~1.5x faster than PIL's
            else:
                img = torch.from_numpy(np.array(_to_rgb(im))).permute(2, 0, 1)
        d = W / img.shape[2]  # the DCT scale of the decode: 1, 2, 4 or 8
        out = {'size': torch.tensor([H, W])}
        for k, ((top, left, h, w), flip, photo) in enumerate(views, 1):
            t0, l0, t1, l1 = (round(v / d) for v in (top, left, top + h, left + w))  # exact unless d > 1
            view = F.interpolate(img[None, :, t0:t1, l0:l1], size=(S, S), mode='bilinear', antialias=True)[0]
            out[f'view{k}'] = (view.flip(-1) if flip else view).contiguous()
            out[f'box{k}'] = torch.tensor([top, left, h, w], dtype=torch.float32)
            out[f'flip{k}'] = torch.tensor(flip)
            out[f'photo{k}'] = photo
        return out


def two_view_batch(batch_list):
    """collate_fn for TwoViews: stacks every tensor, concatenates the 'skipped' path lists."""
    out = {k: torch.stack([b[k] for b in batch_list]) for k in batch_list[0] if k != 'skipped'}
    out['skipped'] = [p for b in batch_list for p in b['skipped']]
    return out

# ----------------------------------------------------------------------------------------------------------------------
# photometric augmentation (runs batched on the training device)


def _gray(x):
    """ITU-R 601 luma as torchvision: 0.2989 R + 0.587 G + 0.114 B, [N, 1, H, W]."""
    r, g, b = x.unbind(1)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(1)


def _shift_hue(x, shift):
    """torchvision's adjust_hue for [N, 3, H, W] in [0, 1] with a per-sample shift [N]: RGB -> HSV,
    hue = (hue + shift) mod 1, HSV -> RGB via channel_n = V - V*S*clip(min(k, 4-k), 0, 1), k = (n + 6*hue) mod 6,
    n = 5, 3, 1 for R, G, B."""
    r, g, b = x.unbind(1)
    v, minc = x.amax(1), x.amin(1)
    d = v - minc
    s = d / v.clamp_min(1e-12)  # 0 where v = 0 (then d = 0)
    dd = d.clamp_min(1e-12)  # where d = 0 the hue is irrelevant (s = 0)
    h = torch.where(v == r, ((g - b) / dd) % 6, torch.where(v == g, (b - r) / dd + 2, (r - g) / dd + 4)) / 6
    h = (h + shift.view(-1, 1, 1)) % 1
    n = torch.arange(5.0, 0.0, -2.0, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)  # 5, 3, 1 without a host copy
    k = (n + 6 * h.unsqueeze(1)) % 6
    return v.unsqueeze(1) - (v * s).unsqueeze(1) * torch.minimum(k, 4 - k).clamp(0, 1)


def _blur(x, sigma):
    """Separable Gaussian blur with one sigma per sample [N] (> 0): kernel size K = 2*floor(0.05*S) + 1 (~10% of the
    side, odd; 23 at 224 px, 7 at 64 px), weights exp(-t^2 / (2 sigma^2)) normalised, t = -K//2..K//2, reflect
    padding, as torchvision's gaussian_blur. One grouped conv over all N*3 channels per direction."""
    N, C, S, _ = x.shape
    r = int(0.05 * S)
    x = x.float()
    t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-t ** 2 / (2 * sigma.view(-1, 1) ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(C, 0)  # [N*C, K]
    y = F.pad(x.reshape(1, N * C, S, S), (r, r, r, r), mode='reflect')
    y = F.conv2d(y, k.view(N * C, 1, 1, 2 * r + 1), groups=N * C)
    y = F.conv2d(y, k.view(N * C, 1, 2 * r + 1, 1), groups=N * C)
    return y.view(N, C, S, S)


def _where(mask, fn, x):
    """fn applied where mask [N] is set, x elsewhere; fn takes an index into the batch. Eager on CPU only the selected
    samples are computed; on an accelerator or under torch.compile one dense torch.where keeps the op free of host
    syncs and of data-dependent shapes."""
    if x.device.type == 'cpu' and not torch.compiler.is_compiling():
        idx = mask.nonzero().squeeze(1)
        return x.index_copy(0, idx, fn(idx)) if len(idx) else x
    return torch.where(mask.view(-1, 1, 1, 1), fn(slice(None)), x)


def photometric(views_uint8, params, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Batched photometric augmentation on the training device (GPU in practice), SPEC 1.9.
    views_uint8: [N, 3, S, S] uint8; params: [N, 6] float (stacked 'photo' tensors, layout PHOTO_KEYS). Returns
    [N, 3, S, S] float32. With x = views/255, in this fixed order (torchvision's ColorJitter permutes b, c, s, h per
    call; a fixed order keeps the op vectorised and the parameters meaningful), clamping to [0, 1] after each jitter op:
        brightness  x <- clip(b x)
        contrast    x <- clip(c x + (1 - c) mean(gray(x)))      mean over the whole image
        saturation  x <- clip(s x + (1 - s) gray(x))            gray = 0.2989 R + 0.587 G + 0.114 B
        hue         x <- rotate hue by h in HSV                 only where h != 0
        grayscale   x <- gray(x) on all 3 channels              where gray = 1
        blur        x <- Gaussian blur with blur_sigma          where blur_sigma > 0 (see _blur)
        normalise   (x - mean) / std
    Identity parameters (1, 1, 1, 0, 0, 0) reproduce (views/255 - mean)/std exactly."""
    if views_uint8.dtype != torch.uint8 or views_uint8.ndim != 4 or views_uint8.shape[1] != 3:
        raise ValueError(f"photometric: views_uint8 must be uint8 [N, 3, S, S], got {views_uint8.dtype} "
                         f"{tuple(views_uint8.shape)}")
    if tuple(params.shape) != (views_uint8.shape[0], len(PHOTO_KEYS)):
        raise ValueError(f"photometric: params must be [N={views_uint8.shape[0]}, {len(PHOTO_KEYS)}] "
                         f"({', '.join(PHOTO_KEYS)}), got {tuple(params.shape)}")
    x = views_uint8.float() / 255
    p = params.to(x.device, torch.float32)
    b, c, s = (p[:, k].view(-1, 1, 1, 1) for k in (0, 1, 2))
    x = (b * x).clamp(0, 1)
    x = (c * x + (1 - c) * _gray(x).mean(dim=(1, 2, 3), keepdim=True)).clamp(0, 1)
    x = (s * x + (1 - s) * _gray(x)).clamp(0, 1)
    x = _where(p[:, 3] != 0, lambda i: _shift_hue(x[i], p[i, 3]), x)
    x = _where(p[:, 4] > 0, lambda i: _gray(x[i]).expand(-1, 3, -1, -1), x)
    with torch.autocast(x.device.type, enabled=False):  # keep the blur in float32 under a bf16 autocast
        x = _where(p[:, 5] > 0, lambda i: _blur(x[i], p[i, 5].clamp_min(1e-3)), x)
    m, sd = x.new_empty(1, 3, 1, 1), x.new_empty(1, 3, 1, 1)
    for c in range(3):  # filled on the device: a torch.tensor(..., device=cuda) copy would stall the GPU queue
        m[:, c].fill_(mean[c])
        sd[:, c].fill_(std[c])
    return (x - m) / sd

# ----------------------------------------------------------------------------------------------------------------------
# sampler


class EpochSampler(torch.utils.data.Sampler):
    """Deterministic, resumable, rank-aware. Each epoch: perm = randperm(n) from a Generator seeded with seed + epoch;
    n_batches = n // G (the tail is dropped); global batch b = perm[b*G:(b+1)*G], of which this rank yields the slice
    perm[b*G + rank*G/world : b*G + (rank+1)*G/world] for b = start_batch .. n_batches-1. So `world` ranks together see
    exactly the global batches of one process, and a run resumed at start_batch skips the seen batches without reading
    them. Use with DataLoader(batch_size=G // world)."""

    def __init__(self, n, global_batch, rank=0, world=1, seed=0, epoch=0, start_batch=0):
        if global_batch < 1 or global_batch % world:
            raise ValueError(f"EpochSampler: global_batch={global_batch} must be a positive multiple of world={world}")
        if n < global_batch:
            raise ValueError(f"EpochSampler: n={n} images is fewer than one global batch of {global_batch}")
        if not 0 <= rank < world:
            raise ValueError(f"EpochSampler: rank={rank} not in [0, world={world})")
        self.n, self.global_batch, self.rank, self.world, self.seed = n, global_batch, rank, world, seed
        self.n_batches = n // global_batch
        self.set_epoch(epoch, start_batch)

    def set_epoch(self, epoch, start_batch=0):
        if not 0 <= start_batch <= self.n_batches:
            raise ValueError(f"EpochSampler: start_batch={start_batch} not in [0, n_batches={self.n_batches}]")
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self):
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        G, B = self.global_batch, self.global_batch // self.world
        for b in range(self.start_batch, self.n_batches):
            yield from perm[b * G + self.rank * B: b * G + (self.rank + 1) * B]

    def __len__(self):
        return (self.n_batches - self.start_batch) * (self.global_batch // self.world)


class RunSampler(EpochSampler):
    """EpochSampler's batches over a span of global steps [start, stop) that crosses epoch boundaries (step s is
    batch s % n_batches of epoch s // n_batches), as (epoch, index) keys for TwoViews. One loader then serves a whole
    run: its workers run ahead into the next epoch, where a loader restarted at every epoch would drain (with 16
    workers and 16 batches an epoch, half the time of an H200 run went there)."""

    def __init__(self, n, global_batch, rank=0, world=1, seed=0):
        super().__init__(n, global_batch, rank, world, seed)
        self.set_steps(0, 0)

    def set_steps(self, start, stop):
        if not 0 <= start <= stop:
            raise ValueError(f"RunSampler: steps [{start}, {stop}) is not a span of steps")
        self.start, self.stop = start, stop

    def __iter__(self):
        G, B = self.global_batch, self.global_batch // self.world
        perm, epoch = None, None
        for s in range(self.start, self.stop):
            if s // self.n_batches != epoch:
                epoch = s // self.n_batches
                perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
            b = s % self.n_batches
            yield from ((epoch, i) for i in perm[b * G + self.rank * B: b * G + (self.rank + 1) * B])

    def __len__(self):
        return (self.stop - self.start) * (self.global_batch // self.world)

# ----------------------------------------------------------------------------------------------------------------------
# the built-in demo set

DEMO_SIZE, DEMO_TRAIN, DEMO_VAL = 96, 400, 100
DEMO_CATEGORIES = [  # (COCO id, name, shape, hue, texture); non-contiguous ids like COCO; all 3 traits differ
    (1, 'red_disc', 'disc', 0.00, 'plain'),
    (3, 'orange_square', 'square', 0.08, 'stripes'),
    (7, 'yellow_triangle', 'triangle', 0.16, 'dots'),
    (8, 'green_star', 'star', 0.33, 'checker'),
    (13, 'cyan_ring', 'ring', 0.50, 'stripes'),
    (18, 'blue_cross', 'cross', 0.62, 'plain'),
    (22, 'purple_diamond', 'diamond', 0.75, 'dots'),
    (25, 'pink_hexagon', 'hexagon', 0.88, 'checker'),
]


def _regular(n, a0=0.0, r=1.0):
    """n polygon vertices (x, y) on the circle of radius r around 0, the first at angle a0."""
    return [(r * math.cos(a0 + 2 * math.pi * k / n), r * math.sin(a0 + 2 * math.pi * k / n)) for k in range(n)]


DEMO_OUTLINES = {  # polygon shapes: vertices (x, y) around 0 with radius <= 1; disc and ring are drawn from distances
    'square': _regular(4, math.pi / 4),
    'triangle': _regular(3, -math.pi / 2),
    'star': [p for pair in zip(_regular(5, -math.pi / 2), _regular(5, -math.pi / 2 + math.pi / 5, 0.45)) for p in pair],
    'cross': [(-.33, -1), (.33, -1), (.33, -.33), (1, -.33), (1, .33), (.33, .33), (.33, 1), (-.33, 1), (-.33, .33),
              (-1, .33), (-1, -.33), (-.33, -.33)],
    'diamond': [(0, -1), (.6, 0), (0, 1), (-.6, 0)],
    'hexagon': _regular(6),
}


def _u(g, lo=0.0, hi=1.0):
    """One U(lo, hi) draw from g."""
    return lo + (hi - lo) * torch.rand((), generator=g, dtype=torch.float64).item()


def _hsv(h, s, v):
    """HSV in [0, 1] -> RGB array in [0, 255] (same channel formula as _shift_hue)."""
    k = (np.array([5.0, 3.0, 1.0]) + 6 * (h % 1)) % 6
    return 255 * (v - v * s * np.clip(np.minimum(k, 4 - k), 0, 1))


def _demo_shape(shape, cx, cy, r, angle):
    """Boolean [S, S] mask of a shape of radius r centred at (cx, cy), and its COCO polygon (None for disc and ring).
    Polygons are rasterised by pycocotools itself, so a json polygon decodes to exactly the drawn pixels."""
    from pycocotools import mask as mask_utils
    S = DEMO_SIZE
    if shape in ('disc', 'ring'):
        yy, xx = np.mgrid[0:S, 0:S] + 0.5
        d = np.hypot(xx - cx, yy - cy)
        return (d <= r) & (d >= (0.55 * r if shape == 'ring' else 0)), None
    c, s = math.cos(angle), math.sin(angle)
    poly = [round(v, 2) for x, y in DEMO_OUTLINES[shape] for v in (cx + r * (c * x - s * y), cy + r * (s * x + c * y))]
    return mask_utils.decode(mask_utils.frPyObjects([poly], S, S))[:, :, 0] > 0, poly


def _demo_texture(texture, g):
    """Brightness multiplier [S, S] of a texture (stripes, checker, dots, plain), random period 4-8 px and angle."""
    S, p, phi = DEMO_SIZE, _u(g, 4, 8), _u(g, 0, math.pi)
    yy, xx = np.mgrid[0:S, 0:S] + 0.5
    u, v = xx * math.cos(phi) + yy * math.sin(phi), -xx * math.sin(phi) + yy * math.cos(phi)
    if texture == 'stripes':
        return np.where(np.floor(u / (p / 2)) % 2 == 0, 1.0, 0.5)
    if texture == 'checker':
        return np.where((np.floor(u / (p / 2)) + np.floor(v / (p / 2))) % 2 == 0, 1.0, 0.5)
    if texture == 'dots':
        return np.where((u % p - p / 2) ** 2 + (v % p - p / 2) ** 2 < (0.3 * p) ** 2, 0.4, 1.0)
    return np.ones((S, S))


def _demo_scene(g, n_objects, crowd):
    """One image: a smooth random two-colour gradient + low-frequency colour noise + pixel noise, then n_objects objects
    (radius 6-24 px, i.e. 12-48 px wide, random position/rotation, category colour with jitter and category texture)
    painted in order, later on top. If crowd, the first object is a cluster of 3-5 small same-category objects (one
    iscrowd=1 annotation). Objects left with < 30% of their area visible are not drawn. Returns uint8 [S, S, 3] and a
    list of (category index, full mask, visible mask, polygon or None, iscrowd) in drawing order."""
    S = DEMO_SIZE
    yy, xx = np.mgrid[0:S, 0:S] + 0.5
    c0, c1 = (_hsv(_u(g), _u(g, 0.1, 0.45), _u(g, 0.3, 0.9)) for _ in range(2))
    a = _u(g, 0, 2 * math.pi)
    t = np.clip(((xx - S / 2) * math.cos(a) + (yy - S / 2) * math.sin(a)) / S + 0.5, 0, 1)[..., None]
    low = F.interpolate(torch.randn(1, 3, 4, 4, generator=g), size=(S, S), mode='bicubic', align_corners=False)
    img = c0 * (1 - t) + c1 * t + 20 * low[0].permute(1, 2, 0).numpy() + 8 * torch.randn(S, S, 3, generator=g).numpy()
    objects = []
    for k in range(n_objects):
        ci = int(torch.randint(len(DEMO_CATEGORIES), (1,), generator=g))
        shape = DEMO_CATEGORIES[ci][2]
        if crowd and k == 0:
            cx, cy = _u(g, 20, S - 20), _u(g, 20, S - 20)
            parts = [_demo_shape(shape, cx + _u(g, -14, 14), cy + _u(g, -14, 14), _u(g, 4, 7), _u(g, 0, 2 * math.pi))[0]
                     for _ in range(int(torch.randint(3, 6, (1,), generator=g)))]
            mask, poly = np.logical_or.reduce(parts), None
        else:
            r = _u(g, 6, 24)
            mask, poly = _demo_shape(shape, _u(g, r, S - r), _u(g, r, S - r), r, _u(g, 0, 2 * math.pi))
        objects.append([ci, mask, None, poly, int(crowd and k == 0)])
    covered, kept = np.zeros((S, S), bool), []
    for obj in reversed(objects):  # from the top: an object hidden by the ones drawn after it is dropped
        obj[2] = obj[1] & ~covered
        if obj[2].sum() >= 0.3 * obj[1].sum():
            kept.insert(0, tuple(obj))
            covered |= obj[1]
    for ci, mask, _, _, _ in kept:
        _, _, _, hue, texture = DEMO_CATEGORIES[ci]
        colour = _hsv(hue + 0.02 * torch.randn((), generator=g).item(), _u(g, 0.7, 1.0), _u(g, 0.75, 1.0))
        obj_img = colour * _demo_texture(texture, g)[..., None] + 6 * torch.randn(S, S, 3, generator=g).numpy()
        img[mask] = obj_img[mask]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), kept


def _voc_palette():
    """The PASCAL VOC colour map: bit 3j+ch of the class index i -> bit 7-j of channel ch (1 -> (128, 0, 0), 255 ->
    (224, 224, 192)). A flat list of 768 values for Image.putpalette."""
    return [sum(((i >> (3 * j + ch)) & 1) << (7 - j) for j in range(8)) for i in range(256) for ch in range(3)]


def make_demo(root='data/demo', seed=0):
    """Generate the built-in demo set deterministically on first use (idempotent: if root/DONE exists return at once).
    Written into a temp folder next to root, then os.replace'd into place: an interrupted generation leaves no half set.

    root/images/{train,val}/<id:06d>.jpg        96x96 RGB JPEG q90; 400 train (ids 1-400) + 100 val (ids 401-500)
    root/annotations/instances_{train,val}.json COCO instances: polygons for unoccluded polygon shapes, RLE (counts
                                                as str) for discs, rings, occluded objects and iscrowd=1 clusters;
                                                bbox/area of the visible mask; 8 categories, ids 1,3,7,8,13,18,22,25
    root/voc/JPEGImages/<id>.jpg                the same images
    root/voc/SegmentationClass/<id>.png         'P' PNG, VOC palette: 0 background, 1..8 = category in DEMO_CATEGORIES
                                                order, 255 on the 2-px band where the instance id changes (like VOC)
    root/voc/ImageSets/Segmentation/{train,val}.txt
    Every 33rd image (k % 33 == 5) has no object; the others have 2-4 objects (see _demo_scene); the json masks are the
    visible masks, so they agree with the PNGs. Random draws: torch.Generator seeded with `seed`."""
    from pycocotools import mask as mask_utils  # only the demo needs pycocotools
    root = os.fspath(root)
    if os.path.exists(os.path.join(root, 'DONE')):
        return root
    if os.path.exists(root):
        raise FileExistsError(f"make_demo: {root} exists but has no DONE file (not a finished demo set); delete it")
    tmp = f"{root.rstrip('/')}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    for d in ('images/train', 'images/val', 'annotations', 'voc/JPEGImages', 'voc/SegmentationClass',
              'voc/ImageSets/Segmentation'):
        os.makedirs(os.path.join(tmp, d))
    g, S, palette = torch.Generator().manual_seed(seed), DEMO_SIZE, _voc_palette()
    categories = [{'id': cid, 'name': name, 'supercategory': 'shape'} for cid, name, _, _, _ in DEMO_CATEGORIES]
    ann_id = 1
    for split, n, first_id in (('train', DEMO_TRAIN, 1), ('val', DEMO_VAL, DEMO_TRAIN + 1)):
        images, annotations, stems = [], [], []
        for k in range(n):
            image_id, stem = first_id + k, f'{first_id + k:06d}'
            n_objects = 0 if k % 33 == 5 else int(torch.randint(2, 5, (1,), generator=g))
            img, objects = _demo_scene(g, n_objects, crowd=n_objects > 0 and _u(g) < 0.06)
            inst, label = np.zeros((S, S), np.int64), np.zeros((S, S), np.uint8)
            for idx, (ci, mask, _, _, _) in enumerate(objects, 1):
                inst[mask], label[mask] = idx, ci + 1
            for idx, (ci, mask, visible, poly, iscrowd) in enumerate(objects, 1):
                if poly is not None and np.array_equal(mask, visible):
                    segmentation, rle = [poly], mask_utils.merge(mask_utils.frPyObjects([poly], S, S))
                else:
                    rle = mask_utils.encode(np.asfortranarray(visible.astype(np.uint8)))
                    segmentation = {'size': [S, S], 'counts': rle['counts'].decode('ascii')}
                annotations.append({'id': ann_id, 'image_id': image_id, 'category_id': DEMO_CATEGORIES[ci][0],
                                    'segmentation': segmentation, 'area': int(mask_utils.area(rle)),
                                    'bbox': [float(v) for v in mask_utils.toBbox(rle)], 'iscrowd': iscrowd})
                ann_id += 1
            p = np.pad(inst, 1, mode='edge')  # VOC-style void band: pixels with a differently-labelled 3x3 neighbour
            band = np.logical_or.reduce([p[dy:dy + S, dx:dx + S] != inst for dy in range(3) for dx in range(3)])
            label[band] = 255
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, 'JPEG', quality=90)
            for path in (f'images/{split}/{stem}.jpg', f'voc/JPEGImages/{stem}.jpg'):
                with open(os.path.join(tmp, path), 'wb') as f:
                    f.write(buf.getvalue())
            png = Image.fromarray(label)
            png.putpalette(palette)
            png.save(os.path.join(tmp, f'voc/SegmentationClass/{stem}.png'))
            images.append({'id': image_id, 'file_name': f'{stem}.jpg', 'width': S, 'height': S})
            stems.append(stem)
        coco = {'info': {'description': f'data.py make_demo(seed={seed})'}, 'images': images,
                'annotations': annotations, 'categories': categories}
        with open(os.path.join(tmp, f'annotations/instances_{split}.json'), 'w') as f:
            json.dump(coco, f)
        with open(os.path.join(tmp, f'voc/ImageSets/Segmentation/{split}.txt'), 'w') as f:
            f.write('\n'.join(stems) + '\n')
    with open(os.path.join(tmp, 'README.txt'), 'w') as f:
        names = ', '.join(c[1] for c in DEMO_CATEGORIES)
        f.write(f"Synthetic scenes from data.py make_demo(seed={seed}), see its docstring: {DEMO_TRAIN} train + "
                f"{DEMO_VAL} val {S}x{S} images of 0-4 objects of 8 categories ({names}).\n"
                "images/ + annotations/instances_*.json: COCO format. voc/: the same images with VOC class PNGs.\n")
    with open(os.path.join(tmp, 'DONE'), 'w') as f:
        f.write('done\n')
    try:
        os.replace(tmp, root)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.exists(os.path.join(root, 'DONE')):
            raise
    return root
