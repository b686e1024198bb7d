"""
Data for two-view contrastive pretraining, top to bottom:

    load_rgb / list_images      any image file -> RGB PIL image; a folder or a COCO json -> sorted file list
    rrc_params / ccrop_params   RandomResizedCrop / ContrastiveCrop boxes (METHOD.md 10, 9) from a Generator
    TwoViews / two_view_batch   loader-worker side: decode + 2 geometric crops + flips + photometric
                                parameters (or, --decode gpu, the JPEG's bytes); collate
    crop_views                  crop-resize-flip of a decoded image on any device (worker and --decode gpu)
    EpochSampler / RunSampler   deterministic, resumable, rank-aware samplers (one epoch / a span of steps)

The training-device side (the photometric ops, batched, the upload, the JPEG decode on the GPU) is augment.py.

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
# libjpeg-turbo through torchvision: ~1.5x faster than PIL's decode (deprecated since torchvision 0.29 in
# favour of TorchCodec; PIL takes over once it is gone)
try:
    from torchvision.io import ImageReadMode, decode_jpeg, read_file
except ImportError:
    decode_jpeg = None

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMG_EXTS = ('.jpg', '.jpeg', '.png', '.webp', '.bmp')
BACKGROUND = (128, 128, 128)  # transparent pixels are composited onto mid-grey
MAX_TRIES = 50  # a sample gives up after this many unreadable files in a row
JPEG_EOI = b'\xff\xd9'  # the end-of-image marker: the last two bytes of a complete JPEG

# ------------------------------------------------------------------------------------------------------------
# image files


def _open(path):
    """Image.open that turns PIL's decompression-bomb warning (more than Image.MAX_IMAGE_PIXELS pixels) into
    an error, so a huge image is skipped like a corrupt one instead of being decoded into all of memory."""
    with warnings.catch_warnings():
        warnings.simplefilter('error', Image.DecompressionBombWarning)
        try:
            return Image.open(path)
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
            raise ValueError(f"{path}: larger than Image.MAX_IMAGE_PIXELS="
                             f"{Image.MAX_IMAGE_PIXELS} ({e})") from None


def _to_rgb(im):
    """Decode an opened image to 8-bit RGB. 16/32-bit integer modes (I;16*, I) are read as 0..65535 and scaled
    by 255/65535; images with alpha (RGBA, LA, PA, or a 'transparency' entry as in P/L/RGB PNGs) are
    composited onto BACKGROUND (mid-grey)."""
    if im.mode.startswith('I'):
        a = np.asarray(im).astype(np.float64) * (255 / 65535)
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8)).convert('RGB')
    if im.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La') or 'transparency' in im.info:
        im = im.convert('RGBA')
        return Image.alpha_composite(Image.new('RGBA', im.size, BACKGROUND + (255,)), im).convert('RGB')
    return im.convert('RGB')


def load_rgb(path, draft_size=None):
    """Open an image file of any PIL mode (1, L, P, RGB, RGBA, LA, CMYK, I;16, ...) and return an 8-bit RGB
    PIL image (see _to_rgb: alpha is composited on mid-grey (128,128,128), 16-bit is scaled by 255/65535).
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
        raise FileNotFoundError(f"{json_path}: no image folder found at {' or '.join(tried)}; "
                                f"pass its image root")
    return found


def list_images(data, image_root=None):
    """Image paths from `data`:
    - a folder: every file below it (recursively) whose extension is in IMG_EXTS (any case), sorted;
    - a COCO instances .json: the `file_name` of each entry of `images` (json order), joined to image_root. By
      default image_root is <json folder>/../<split> (annotations/instances_train2017.json -> train2017/),
      else <json folder>/../images/<split> (the demo layout); split = the file name's last '_' part without
      '.json'."""
    data = os.fspath(data)
    if not os.path.exists(data):
        raise FileNotFoundError(f"data={data!r} does not exist (expected an image folder or a COCO "
                                f"instances .json)")
    if os.path.isdir(data):
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(data) for f in fs
                       if f.lower().endswith(IMG_EXTS))
        if not files:
            raise ValueError(f"data={data!r}: no image files ({', '.join(IMG_EXTS)}) found in this "
                             f"folder or below")
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

# ------------------------------------------------------------------------------------------------------------
# crop boxes: (top, left, h, w) in pixels of an H x W image


def _rrc_size(H, W, scale, ratio, g):
    """The crop size of torchvision's RandomResizedCrop.get_params, same float32 draws from g: up to 10 tries
    of area = U(scale)*H*W, aspect = w/h = exp(U(log ratio)), w = round(sqrt(area*aspect)), h =
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
    """RandomResizedCrop box (top, left, h, w), exactly torchvision's algorithm (same draws in the same order,
    so with g = torch.default_generator it reproduces T.RandomResizedCrop.get_params): size from _rrc_size,
    then top ~ randint(0, H-h+1), left ~ randint(0, W-w+1); the fallback crop is centred."""
    h, w, ok = _rrc_size(H, W, scale, ratio, g)
    if not ok:
        return (H - h) // 2, (W - w) // 2, h, w
    top = torch.randint(0, H - h + 1, (1,), generator=g).item()
    left = torch.randint(0, W - w + 1, (1,), generator=g).item()
    return top, left, h, w


def _beta(alpha, g):
    """One Beta(alpha, alpha) draw from g: X/(X+Y), X, Y ~ Gamma(alpha) (float64, so X+Y cannot underflow to
    0)."""
    x, y = torch._standard_gamma(torch.full((2,), float(alpha), dtype=torch.float64), generator=g).tolist()
    return x / (x + y)


def ccrop_params(H, W, box, scale, ratio, alpha, g):
    """ContrastiveCrop box (top, left, h, w), METHOD.md 9 / the official code: h, w drawn as RRC (same
    fallback); then with the normalised box (h0, w0, h1, w1)
        ch0 = clip(int(H*h0) - h//2, 0, H-h), ch1 = clip(int(H*h1) - h//2, 0, H-h)
        cw0 = clip(int(W*w0) - w//2, 0, W-w), cw1 = clip(int(W*w1) - w//2, 0, W-w)
        top = ch0 + floor((ch1-ch0)*b1), left = cw0 + floor((cw1-cw0)*b2)
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

# ------------------------------------------------------------------------------------------------------------
# the two-view dataset (runs in loader workers)

# layout of a 'photo' vector, P = 6
PHOTO_KEYS = ('brightness', 'contrast', 'saturation', 'hue', 'gray', 'blur_sigma')


def draw_photo(g):
    """Photometric parameters of one view (METHOD.md 10), always 8 draws from g. ColorJitter(0.4, 0.4, 0.4,
    0.1) with p=0.8: brightness, contrast, saturation ~ U(0.6, 1.4), hue ~ U(-0.1, 0.1), or the identity (1,
    1, 1, 0) when not applied;
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
    torch's antialiased bilinear interpolation on uint8 (crop_views). With device_decode=True (--decode gpu)
    the draws are the same, but a complete baseline JPEG (device_decodable) is not decoded: the sample holds
    'jpeg' = its bytes and 'path', no views, and the training process decodes it at full size and crops it
    with the same crop_views (augment.decode_views); every other file is decoded here as above ('jpeg'
    empty).
    Where the worker would decode a JPEG DCT-reduced, the device's full-size views differ slightly (the same
    boxes, another resampling). `boxes` ([n_files, 4] normalised (h0, w0, h1, w1),
    METHOD.md 9) is read at __getitem__ time, so a tensor in shared memory updated in place by the trainer is
    seen by running workers; pass boxes=None for plain RRC. With ccrop_warmup=W the boxes are used from epoch
    W on and epochs < W use plain RRC (METHOD.md 9 warm-up).
    A file that fails to load is skipped: files (i+1) % n, (i+2) % n, ... are tried with the same generator
    seed, the failed paths are returned in 'skipped', and RuntimeError is raised after MAX_TRIES failures in a
    row."""

    def __init__(self, files, img_size=224, scale=(0.2, 1.0), ratio=(3/4, 4/3), seed=0, boxes=None,
                 ccrop_alpha=0.6, ccrop_warmup=0, device_decode=False):
        if len(files) == 0:
            raise ValueError("TwoViews: files is empty (expected a list of image paths, see list_images)")
        if not (isinstance(img_size, int) and img_size >= 1):
            raise ValueError(f"TwoViews: img_size={img_size!r}, expected a positive int")
        if not (0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1]):
            raise ValueError(f"TwoViews: scale={scale}, ratio={ratio}; expected 0 < scale[0] <= scale[1] <= "
                             f"1 and " "0 < ratio[0] <= ratio[1]")
        if boxes is not None and tuple(boxes.shape) != (len(files), 4):
            raise ValueError(f"TwoViews: boxes has shape {tuple(boxes.shape)}, expected ({len(files)}, 4)")
        if ccrop_alpha <= 0:
            raise ValueError(f"TwoViews: ccrop_alpha={ccrop_alpha}, expected > 0")
        if device_decode and decode_jpeg is None:
            raise ValueError("TwoViews: device_decode needs torchvision.io.decode_jpeg (not importable here)")
        self.files, self.img_size, self.scale, self.ratio = list(files), img_size, tuple(scale), tuple(ratio)
        self.seed, self.boxes, self.ccrop_alpha, self.ccrop_warmup = seed, boxes, ccrop_alpha, ccrop_warmup
        self.device_decode = device_decode
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
                    box = ccrop_params(H, W, self.boxes[j].tolist(), self.scale, self.ratio,
                                       self.ccrop_alpha, g)
                flip = torch.rand((), generator=g).item() < 0.5
                views.append((box, flip, draw_photo(g)))
            out = {'size': torch.tensor([H, W])}
            for k, (box, flip, photo) in enumerate(views, 1):
                out[f'box{k}'] = torch.tensor(box, dtype=torch.float32)
                out[f'flip{k}'] = torch.tensor(flip)
                out[f'photo{k}'] = photo
            if self.device_decode:
                raw = b''
                if device_decodable(im):
                    with open(path, 'rb') as fh:
                        raw = fh.read()
                out['path'] = path
                if raw.endswith(JPEG_EOI):  # a complete file: left to the device
                    return {**out, 'jpeg': torch.frombuffer(bytearray(raw), dtype=torch.uint8), 'view1': None,
                            'view2': None}
                out['jpeg'] = torch.zeros(0, dtype=torch.uint8)
            # largest downscale keeping both crops >= S px
            f = min(min(box[2], box[3]) for box, _, _ in views) / S
            # None: not a JPEG
            drafted = im.draft('RGB', (math.ceil(W / f), math.ceil(H / f))) if f >= 2 else None
            if decode_jpeg and drafted is None and im.format == 'JPEG' and im.mode in ('RGB', 'L', 'CMYK'):
                # libjpeg-turbo, ~1.5x faster than PIL's
                img = decode_jpeg(read_file(path), mode=ImageReadMode.RGB)
            else:
                img = torch.from_numpy(np.array(_to_rgb(im))).permute(2, 0, 1)
        crops = crop_views(img, [box for box, _, _ in views], [flip for _, flip, _ in views], S,
                           W / img.shape[2])  # the scale of the decode: 1, or 2, 4, 8 after a draft
        return {**out, 'view1': crops[0], 'view2': crops[1]}


def device_decodable(im):
    """Whether the training device decodes this opened file (TwoViews with device_decode): a baseline JPEG in
    RGB/YCbCr or grayscale. CMYK/YCCK and progressive JPEGs, and every other format, are decoded by the
    worker (the complete-file check, an end-of-image marker last, is made on the bytes)."""
    return im.format == 'JPEG' and im.mode in ('RGB', 'L') and not im.info.get('progressive')


def crop_views(img, boxes, flips, size, scale=1):
    """The views of one decoded image img [3, h, w] uint8, on any device: box k = (top, left, h, w) in pixels
    of the original image, its corners rounded to the decoded grid, (round(top/scale), round(left/scale)) to
    (round((top+h)/scale), round((left+w)/scale)) with scale = original / decoded width (1, or 2, 4, 8 after
    a DCT-reduced decode; exact at 1), resized to size x size by torch's antialiased bilinear interpolation,
    flipped horizontally where flips[k]. Returns [len(boxes), 3, size, size] uint8. On the CPU the resize runs
    on uint8 (torch's uint8 kernel); on CUDA, which has no uint8 kernel, in float32, rounded to uint8 (within
    one level of the CPU's). The worker (TwoViews.load) and the device (augment.decode_views) both crop with
    this function."""
    views = []
    for (top, left, h, w), flip in zip(boxes, flips):
        t0, l0, t1, l1 = (round(v / scale) for v in (top, left, top + h, left + w))
        crop = img[None, :, t0:t1, l0:l1]
        crop = crop if img.device.type == 'cpu' else crop.float()
        view = F.interpolate(crop, size=(size, size), mode='bilinear', antialias=True)[0]
        views.append(view.flip(-1) if flip else view)
    views = torch.stack(views)
    return views if views.dtype == torch.uint8 else views.round_().clamp_(0, 255).to(torch.uint8)


def two_view_batch(batch_list):
    """collate_fn for TwoViews: stacks every tensor, concatenates the 'skipped' path lists. With
    device_decode: 'jpeg' is every left JPEG's bytes in one tensor (one shared-memory block, not one a file),
    'jpeg_sizes' [B] their lengths (0 where the worker decoded), 'path' the list of paths; 'view1'/'view2'
    stack the worker-decoded views only ([n, 3, S, S], n = the zeros in 'jpeg_sizes'; [0] if none)."""
    out = {k: torch.stack([b[k] for b in batch_list]) for k in batch_list[0]
           if k not in ('skipped', 'jpeg', 'view1', 'view2', 'path')}
    out['skipped'] = [p for b in batch_list for p in b['skipped']]
    for k in ('view1', 'view2'):
        views = [b[k] for b in batch_list if b[k] is not None]
        out[k] = torch.stack(views) if views else torch.zeros(0, dtype=torch.uint8)
    if 'jpeg' in batch_list[0]:
        out['jpeg'] = torch.cat([b['jpeg'] for b in batch_list])
        out['jpeg_sizes'] = torch.tensor([len(b['jpeg']) for b in batch_list])
        out['path'] = [b['path'] for b in batch_list]
    return out

# ------------------------------------------------------------------------------------------------------------
# sampler


class EpochSampler(torch.utils.data.Sampler):
    """Deterministic, resumable, rank-aware. Each epoch: perm = randperm(n) from a Generator seeded with
    seed + epoch;
    n_batches = n // G (the tail is dropped); global batch b = perm[b*G:(b+1)*G], of which this rank yields
    the slice perm[b*G + rank*G/world : b*G + (rank+1)*G/world] for b = start_batch .. n_batches-1. So `world`
    ranks together see exactly the global batches of one process, and a run resumed at start_batch skips the
    seen batches without reading them. Use with DataLoader(batch_size=G // world)."""

    def __init__(self, n, global_batch, rank=0, world=1, seed=0, epoch=0, start_batch=0):
        if global_batch < 1 or global_batch % world:
            raise ValueError(f"EpochSampler: global_batch={global_batch} must be a positive multiple "
                             f"of world={world}")
        if n < global_batch:
            raise ValueError(f"EpochSampler: n={n} images is fewer than one global batch of {global_batch}")
        if not 0 <= rank < world:
            raise ValueError(f"EpochSampler: rank={rank} not in [0, world={world})")
        self.n, self.global_batch, self.rank, self.world, self.seed = n, global_batch, rank, world, seed
        self.n_batches = n // global_batch
        self.set_epoch(epoch, start_batch)

    def set_epoch(self, epoch, start_batch=0):
        if not 0 <= start_batch <= self.n_batches:
            raise ValueError(f"EpochSampler: start_batch={start_batch} not in [0, "
                             f"n_batches={self.n_batches}]")
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self):
        perm = torch.randperm(self.n,
                              generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        G, B = self.global_batch, self.global_batch // self.world
        for b in range(self.start_batch, self.n_batches):
            yield from perm[b * G + self.rank * B: b * G + (self.rank + 1) * B]

    def __len__(self):
        return (self.n_batches - self.start_batch) * (self.global_batch // self.world)


class RunSampler(EpochSampler):
    """EpochSampler's batches over a span of global steps [start, stop) that crosses epoch boundaries (step s
    is batch s % n_batches of epoch s // n_batches), as (epoch, index) keys for TwoViews. One loader then
    serves a whole run: its workers run ahead into the next epoch, where a loader restarted at every epoch
    would drain (with 16 workers and 16 batches an epoch, half the time of an H200 run went there)."""

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
                perm = torch.randperm(self.n,
                                      generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
            b = s % self.n_batches
            yield from ((epoch, i) for i in perm[b * G + self.rank * B: b * G + (self.rank + 1) * B])

    def __len__(self):
        return (self.stop - self.start) * (self.global_batch // self.world)
