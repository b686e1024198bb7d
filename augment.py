"""
The training-device side of the two-view data (METHOD.md 10): the uint8 views of data.TwoViews go to the
device, where the photometric augmentation runs batched over all views, with the parameters the workers drew.

    photometric                   colour jitter, grayscale, blur and normalisation of a batch of views
    decode_images / decode_views  --decode gpu: the JPEGs of a batch decoded on the device, cropped there
    device_batches                the [2B, 3, S, S] input of each batch (upload and decode on a side CUDA
                                  stream)
"""
import contextlib
import warnings

import numpy as np
import torch
import torch.nn.functional as F

import data
from data import IMAGENET_MEAN, IMAGENET_STD, PHOTO_KEYS


def _gray(x):
    """ITU-R 601 luma as torchvision: 0.2989 R + 0.587 G + 0.114 B, [N, 1, H, W]."""
    red, green, blue = x.unbind(1)
    return red.mul(0.2989).add_(green, alpha=0.587).add_(blue, alpha=0.114).unsqueeze(1)


def _shift_hue(x, shift):
    """torchvision's adjust_hue for [N, 3, H, W] in [0, 1] with a per-sample shift [N]: RGB -> HSV, hue = (hue
    + shift) mod 1, HSV -> RGB via channel_n = V - V*S*clip(min(k, 4-k), 0, 1), k = (n + 6*hue) mod 6, n = 5,
    3, 1 for R, G, B."""
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
    """Separable Gaussian blur with one sigma per sample [N] (> 0): kernel size K = 2*floor(0.05*S) + 1 (~10%
    of the side, odd; 23 at 224 px, 7 at 64 px), weights exp(-t^2 / (2 sigma^2)) normalised, t = -K//2..K//2,
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


def decode_images(jpegs, device):
    """JPEG files' bytes (a list of uint8 tensors) -> decoded [3, h, w] uint8 RGB images on `device`, by
    torchvision's batched decoder (nvJPEG on CUDA, its hardware engine where the card has one); None for an
    image the decoder rejects (the batch failed: each image is then tried alone). On CUDA the current stream
    is drained first: the hardware decoder writes its outputs, allocated from the caching allocator on that
    stream, without waiting for the work queued on it, so a block freed there and still read by a queued
    kernel would be overwritten (reported against torchvision and TorchCodec)."""
    def decode(batch):
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()
        return data.decode_jpeg(batch, mode=data.ImageReadMode.RGB, device=device)
    if not jpegs:
        return []
    try:
        return list(decode(jpegs))
    except RuntimeError as e:
        error, out = e, []
    for x in jpegs:
        try:
            out.append(decode([x])[0])
        except RuntimeError:
            out.append(None)
    if len(jpegs) > 1 and all(img is None for img in out):  # the decoder, not the files (a build without it?)
        warnings.warn(f"decode_images: the {device} decoder rejected all {len(jpegs)} JPEGs of a batch ({error}); "
                      f"PIL decodes them in the training process, slowly: --decode cpu is faster")
    return out


def decode_views(batch, size, device):
    """The uint8 views [B, 3, size, size] of both views on `device` and the 'skipped' list of a batch of
    data.TwoViews(device_decode=True) (--decode gpu): the JPEGs the workers left undecoded are decoded here at
    full size (decode_images), then cropped, resized and flipped by data.crop_views with the workers' boxes
    and flips (the worker's function: the same views as a full-size decode in the worker); the
    worker-decoded views are copied in. A JPEG the device decoder rejects after passing the worker's checks
    is decoded by PIL here (data.load_rgb); if that fails too, its views are mid-grey and its path joins the
    skipped list (the draws of the batch stay as they are)."""
    sizes, paths, B = batch["jpeg_sizes"].tolist(), batch["path"], len(batch["path"])
    jpegs = batch["jpeg"].split(sizes)
    left = [i for i, n in enumerate(sizes) if n]
    boxes = [batch[f"box{k}"].tolist() for k in (1, 2)]
    flips = [batch[f"flip{k}"].tolist() for k in (1, 2)]
    shapes, skipped, crops = batch["size"].tolist(), list(batch["skipped"]), []
    for i, img in zip(left, decode_images([jpegs[i] for i in left], device)):
        if img is None:
            try:
                img = torch.from_numpy(np.array(data.load_rgb(paths[i]))).permute(2, 0, 1).to(device)
            except Exception:  # as a worker's failed decode: counted, and the run goes on
                skipped.append(paths[i])
                img = torch.full((3, *shapes[i]), data.BACKGROUND[0], dtype=torch.uint8, device=device)
        crops.append(data.crop_views(img, [boxes[0][i], boxes[1][i]], [flips[0][i], flips[1][i]], size))
    views = torch.empty(2, B, 3, size, size, dtype=torch.uint8, device=device)
    if crops:
        views[:, torch.tensor(left, device=device)] = torch.stack(crops, 1)
    if len(left) < B:
        worker = torch.tensor([i for i, n in enumerate(sizes) if not n], device=device)
        for k in (1, 2):  # from pinned memory
            views[k - 1, worker] = batch[f"view{k}"].to(device, non_blocking=True)
    return views.unbind(), skipped


def device_batches(loader, device, photometric=photometric, size=None):
    """(the [2B, 3, S, S] float input, its 'skipped' list) of each batch of `loader` (view 1 of every image,
    then view 2): the uint8 views and their parameters are copied to `device`, where the photometric ops run.
    Batches of data.TwoViews(device_decode=True) are decoded and cropped on `device` (decode_views; size = the
    view size S). On CUDA the next batch's host->device copy (pinned memory, ~77 MB at 224 px and batch 256),
    and its decode and crops, run on a side stream while the current step computes, and are queued after it:
    torchvision's decoder holds the host until it is done."""
    def to_device(batch):
        photos = [batch[f"photo{k}"].to(device, non_blocking=True) for k in (1, 2)]
        if "jpeg" in batch:
            if size is None:
                raise ValueError("device_batches: a batch of TwoViews(device_decode=True) needs size (the view size)")
            return (*decode_views(batch, size, device), photos)
        return [batch[f"view{k}"].to(device, non_blocking=True) for k in (1, 2)], batch["skipped"], photos

    side = torch.cuda.Stream(device) if device.type == "cuda" else None

    def upload(batch):
        if batch is None:
            return None
        with torch.cuda.stream(side) if side else contextlib.nullcontext():
            return to_device(batch)
    batches = iter(loader)
    pending = upload(next(batches, None))
    while pending is not None:
        views, skipped, photos = pending
        if side:
            compute = torch.cuda.current_stream(device)
            compute.wait_stream(side)  # this batch's copy (and decode) is done before the step reads it
            for t in (*views, *photos):
                t.record_stream(compute)  # its memory is not reused before the compute stream is done with it
        yield torch.cat([photometric(v, p) for v, p in zip(views, photos)]), skipped
        pending = upload(next(batches, None))  # queued after the step: overlaps with it
