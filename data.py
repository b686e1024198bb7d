"""
Data for two-view contrastive pretraining, top to bottom:

    load_rgb / list_images           any image file -> RGB PIL image; a folder or a COCO json -> sorted file list
    rrc_params / ccrop_params        RandomResizedCrop / ContrastiveCrop boxes (METHOD.md 10, 9), draws from a Generator
    TwoViews                         loader-worker side: decode + 2 geometric crops + flips + photometric parameters
    photometric                      training-device side: batched colour jitter, grayscale, blur, normalisation
    two_view_batch / device_batches  collate; the views on the training device (side-stream upload, photometric)
    EpochSampler / RunSampler        deterministic, resumable, rank-aware samplers (one epoch / a span of steps)

Randomness: every draw comes from a torch.Generator. A sample's generator is seeded from (seed, epoch, index)
only, so the views do not depend on the number of workers, their order, the number of processes, or on
resuming mid-epoch.
"""
import json
import math
import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
# libjpeg-turbo through torchvision: ~1.5x faster than PIL's decode. Deprecated since torchvision 0.29 in
# favour
try:
    # of TorchCodec; PIL takes over once it is gone
    from torchvision.io import ImageReadMode, decode_jpeg, read_file
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
    """Image.open that turns PIL's decompression-bomb warning (more than Image.MAX_IMAGE_PIXELS pixels) into an
    error, so a huge image is skipped like a corrupt one instead of being decoded into all of memory."""
    with warnings.catch_warnings():
        warnings.simplefilter('error', Image.DecompressionBombWarning)
        try:
            return Image.open(path)
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
            raise ValueError(f"{path}: larger than Image.MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS} ({e})") from None


def _to_rgb(im):
    """Decode an opened image to 8-bit RGB. 16/32-bit integer modes (I;16*, I) are read as 0..65535 and scaled by
    255/65535; images with alpha (RGBA, LA, PA, or a 'transparency' entry as in P/L/RGB PNGs) are composited
    onto BACKGROUND (mid-grey)."""
    if im.mode.startswith('I'):
        a = np.asarray(im).astype(np.float64) * (255 / 65535)
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8)).convert('RGB')
    if im.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La') or 'transparency' in im.info:
        im = im.convert('RGBA')
        return Image.alpha_composite(Image.new('RGBA', im.size, BACKGROUND + (255,)), im).convert('RGB')
    return im.convert('RGB')


def load_rgb(path, draft_size=None):
    """Open an image file of any PIL mode (1, L, P, RGB, RGBA, LA, CMYK, I;16, ...) and return an 8-bit RGB PIL
    image (see _to_rgb: alpha is composited on mid-grey (128,128,128), 16-bit is scaled by 255/65535).
    draft_size=(w, h): a JPEG is decoded at 1/2, 1/4 or 1/8 scale (DCT scaling, PIL's Image.draft) as long as
    the result stays >= (w, h). Raises on unreadable, truncated or non-image files and on images above
    Image.MAX_IMAGE_PIXELS."""
    with _open(path) as im:
        if draft_size is not None:
            im.draft('RGB', tuple(draft_size))
        return _to_rgb(im)


def coco_image_root(json_path):
    """The image folder of a COCO .json: <json folder>/../<split> (annotations/instances_train2017.json ->
    train2017/), else <json folder>/../images/<split> (the demo layout); split = the last '_' part of the
    name."""
    split = os.path.basename(json_path)[:-len('.json')].split('_')[-1]
    parent = os.path.dirname(os.path.dirname(os.path.abspath(json_path)))
    tried = [os.path.join(parent, split), os.path.join(parent, 'images', split)]
    found = next((d for d in tried if os.path.isdir(d)), None)
    if found is None:
        raise FileNotFoundError(f"{json_path}: no image folder found at {' or '.join(tried)}; pass its image root")
    return found


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
    image_root = image_root or coco_image_root(data)
    files = [os.path.join(image_root, im['file_name']) for im in coco['images']]
    if not files:
        raise ValueError(f"data={data!r}: the 'images' list is empty")
    return files

# ----------------------------------------------------------------------------------------------------------------------
# crop boxes: (top, left, h, w) in pixels of an H x W image


def _rrc_size(H, W, scale, ratio, g):
    """The crop size of torchvision's RandomResizedCrop.get_params, same float32 draws from g: up to 10 tries of
    area = U(scale)*H*W, aspect = w/h = exp(U(log ratio)), w = round(sqrt(area*aspect)), h =
    round(sqrt(area/aspect)), accepted if 0 < h <= H and 0 < w <= W. Returns (h, w, True), or after 10 misses
    (h, w, False) of the central fallback: the whole image with its aspect clamped into `ratio`."""
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
    """RandomResizedCrop box (top, left, h, w), exactly torchvision's algorithm (same draws in the same order, so
    with g = torch.default_generator it reproduces T.RandomResizedCrop.get_params): size from _rrc_size, then
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
    """ContrastiveCrop box (top, left, h, w), METHOD.md 9 / the official code: h, w drawn as RRC (same fallback);
    then with the normalised box (h0, w0, h1, w1)
        ch0 = clip(int(H*h0) - h//2, 0, H-h),  ch1 = clip(int(H*h1) - h//2, 0, H-h),  top = ch0 + floor((ch1-ch0)*b1)
        cw0 = clip(int(W*w0) - w//2, 0, W-w),  cw1 = clip(int(W*w1) - w//2, 0, W-w),  left = cw0 + floor((cw1-cw0)*b2)
    b1, b2 ~ Beta(alpha, alpha) independent: the crop centre lies in the box, alpha < 1 pushes it towards the
    box edges. (The official code clips ch0 only from below and ch1 only from above; clipping both keeps crops
    in the image.)"""
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

# layout of a 'photo' vector, P = 6
PHOTO_KEYS = ('brightness', 'contrast', 'saturation', 'hue', 'gray', 'blur_sigma')


def draw_photo(g):
    """Photometric parameters of one view (METHOD.md 10), always 8 draws from g. ColorJitter(0.4, 0.4, 0.4, 0.1)
    with p=0.8: brightness, contrast, saturation ~ U(0.6, 1.4), hue ~ U(-0.1, 0.1), or the identity (1, 1, 1,
    0) when not applied;
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

    Sample i of epoch e (key (e, i), as RunSampler yields them; a plain index i takes e from set_epoch) uses
    the generator seeded with ((seed*1_000_003 + e)*10_000_019 + i) mod 2**63 and draws per view, in this
    order: crop box (rrc_params, or ccrop_params with boxes[index] when `boxes` is given), flip ~
    Bernoulli(0.5), photometric parameters (draw_photo). The boxes are drawn on the original size (read from
    the file header), then a JPEG is decoded at the largest DCT reduction (1/2, 1/4, 1/8) that keeps both
    crops >= img_size pixels on each side (PIL's draft; at full size through torchvision's decode_jpeg, which
    is faster), and each crop (its corners rounded to the decoded grid) is resized to img_size x img_size with
    torch's antialiased bilinear interpolation on uint8. `boxes` ([n_files, 4] normalised (h0, w0, h1, w1),
    METHOD.md 9) is read at __getitem__ time, so a tensor in shared memory updated in place by the trainer is
    seen by running workers; pass boxes=None for plain RRC. With ccrop_warmup=W the boxes are used from epoch
    W on and epochs < W use plain RRC (METHOD.md 9 warm-up).
    A file that fails to load is skipped: files (i+1) % n, (i+2) % n, ... are tried with the same generator
    seed, the failed paths are returned in 'skipped', and RuntimeError is raised after MAX_TRIES failures in a
    row."""

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
            # any decode failure (PIL raises OSError, ValueError, SyntaxError...) skips the file
            except Exception as e:
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
            # largest downscale keeping both crops >= S px
            f = min(min(box[2], box[3]) for box, _, _ in views) / S
            # None: not a JPEG
            drafted = im.draft('RGB', (math.ceil(W / f), math.ceil(H / f))) if f >= 2 else None
            if decode_jpeg and drafted is None and im.format == 'JPEG' and im.mode in ('RGB', 'L', 'CMYK'):
                # libjpeg-turbo, ~1.5x faster than PIL's
                img = decode_jpeg(read_file(path), mode=ImageReadMode.RGB)
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
    red, green, blue = x.unbind(1)
    return red.mul(0.2989).add_(green, alpha=0.587).add_(blue, alpha=0.114).unsqueeze(1)


def _shift_hue(x, shift):
    """torchvision's adjust_hue for [N, 3, H, W] in [0, 1] with a per-sample shift [N]: RGB -> HSV, hue = (hue +
    shift) mod 1, HSV -> RGB via channel_n = V - V*S*clip(min(k, 4-k), 0, 1), k = (n + 6*hue) mod 6, n = 5, 3,
    1 for R, G, B."""
    red, green, blue = x.unbind(1)
    v, minc = x.amax(1), x.amin(1)
    d = v - minc
    s = d / v.clamp_min(1e-12)  # 0 where v = 0 (then d = 0)
    dd = d.clamp_min(1e-12)  # where d = 0 the hue is irrelevant (s = 0)
    h = torch.where(v == red, ((green - blue) / dd) % 6,
                    torch.where(v == green, (blue - red) / dd + 2, (red - green) / dd + 4)) / 6
    h = (h + shift.view(-1, 1, 1)) % 1
    # 5, 3, 1 without a host copy
    n = torch.arange(5.0, 0.0, -2.0, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = (n + 6 * h.unsqueeze(1)) % 6
    return v.unsqueeze(1) - (v * s).unsqueeze(1) * torch.minimum(k, 4 - k).clamp(0, 1)


def _blur(x, sigma):
    """Separable Gaussian blur with one sigma per sample [N] (> 0): kernel size K = 2*floor(0.05*S) + 1 (~10% of
    the side, odd; 23 at 224 px, 7 at 64 px), weights exp(-t^2 / (2 sigma^2)) normalised, t = -K//2..K//2,
    reflect padding, as torchvision's gaussian_blur. One grouped conv over all N*3 channels per direction."""
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
    """fn applied where mask [N] is set, x elsewhere; fn takes an index into the batch. Eager on CPU only the
    selected samples are computed; on an accelerator or under torch.compile one dense torch.where keeps the op
    free of host syncs and of data-dependent shapes."""
    if x.device.type == 'cpu' and not torch.compiler.is_compiling():
        idx = mask.nonzero().squeeze(1)
        return x.index_copy(0, idx, fn(idx)) if len(idx) else x
    return torch.where(mask.view(-1, 1, 1, 1), fn(slice(None)), x)


def photometric(views_uint8, params, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Batched photometric augmentation on the training device (GPU in practice), METHOD.md 10.
    views_uint8: [N, 3, S, S] uint8; params: [N, 6] float (stacked 'photo' tensors, layout PHOTO_KEYS).
    Returns [N, 3, S, S] float32. With x = views/255, in this fixed order (torchvision's ColorJitter permutes
    b, c, s, h per call; a fixed order keeps the op vectorised and the parameters meaningful), clamping to [0,
    1] after each jitter op:
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
    # filled on the device: a torch.tensor(..., device=cuda) copy would stall the GPU queue
    for c in range(3):
        m[:, c].fill_(mean[c])
        sd[:, c].fill_(std[c])
    return (x - m) / sd

def device_views(batch, device, photometric=photometric):
    """The [2B, 3, S, S] float input of a TwoViews batch (view 1 of every image, then view 2): the uint8 views
    are copied to `device` and the photometric ops run there."""
    return torch.cat([photometric(batch[f"view{i}"].to(device, non_blocking=True),
                                  batch[f"photo{i}"].to(device, non_blocking=True)) for i in (1, 2)])


def device_batches(loader, device, photometric=photometric):
    """(device_views of each batch, its 'skipped' list) for the batches of `loader`. On CUDA the next batch's
    host->device copy (pinned memory, ~77 MB at 224 px and batch 256) runs on a side stream while the current
    step computes, instead of in front of it on the compute stream."""
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

# ----------------------------------------------------------------------------------------------------------------------
# sampler


class EpochSampler(torch.utils.data.Sampler):
    """Deterministic, resumable, rank-aware. Each epoch: perm = randperm(n) from a Generator seeded with seed +
    epoch;
    n_batches = n // G (the tail is dropped); global batch b = perm[b*G:(b+1)*G], of which this rank yields
    the slice perm[b*G + rank*G/world : b*G + (rank+1)*G/world] for b = start_batch .. n_batches-1. So `world`
    ranks together see exactly the global batches of one process, and a run resumed at start_batch skips the
    seen batches without reading them. Use with DataLoader(batch_size=G // world)."""

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
    batch s % n_batches of epoch s // n_batches), as (epoch, index) keys for TwoViews. One loader then serves
    a whole run: its workers run ahead into the next epoch, where a loader restarted at every epoch would
    drain (with 16 workers and 16 batches an epoch, half the time of an H200 run went there)."""

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
