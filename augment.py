"""
The training-device side of the two-view data (METHOD.md 10): the uint8 views of data.TwoViews go to the
device, where the photometric augmentation runs batched over all views, with the parameters the workers drew.

    photometric                   colour jitter, grayscale, blur and normalisation of a batch of views
    device_views / device_batches the [2B, 3, S, S] input of each batch (upload on a side CUDA stream)
"""
import torch
import torch.nn.functional as F

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

