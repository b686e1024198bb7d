"""
The input-pipeline parts of bench.py (run through it: python bench.py --skip train,vit):

    data   our two-view pipeline (TwoViews in the worker + batched photometric) against per-image torchvision
    e2e    the training step fed by the JPEG DataLoader against the same step on batches already on the
           device, the JPEGs decoded by the workers and (--decode gpu) on the device
    run    pretrain.py itself for a few steps on a folder of COCO-sized JPEGs: its last log line (img/s, MFU)
    decode --decode gpu against the workers' decode: the views' difference, the decoder's speed, and on CUDA
           the decoder's stream hazard (a decode right after a free)
"""
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch
from torchvision.transforms import v2

import augment
import data

MEAN, STD = data.IMAGENET_MEAN, data.IMAGENET_STD


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_e2e(cfg, device, files, name, step, photometric, x, rows):
    """Part e2e: steps/s (wall clock, data waits included) fed by the JPEG loader as in pretrain.py (workers,
    pinned memory, augment.device_batches, the compiled photometric ops on the device) against the same steps
    on the batch x already there; the JPEGs decoded by the workers, and on CUDA (and in the GPU check, which
    runs it on the CPU in its test) also decoded and cropped on the device (--decode gpu). Each loader is
    first run for one batch per worker (start-up, and the photometric compilation), then timed over 3x the
    steps of the other parts."""
    B, cuda = cfg.batch_size, device.type == "cuda"
    warmup, n = max(cfg.warmup, cfg.workers), 3 * cfg.steps

    def batches(device_decode):
        loader = torch.utils.data.DataLoader(
            data.TwoViews(files, cfg.img_size, device_decode=device_decode), batch_size=B,
            num_workers=cfg.workers, collate_fn=data.two_view_batch,
            sampler=[i % len(files) for i in range((warmup + n) * B)], pin_memory=cuda,
            prefetch_factor=4 if cfg.workers else None)
        for views, _ in augment.device_batches(loader, device, photometric, cfg.img_size):
            yield views

    def steps_per_s(feed, k):
        sync(device)
        t0 = time.perf_counter()
        for xb in itertools.islice(feed, k):
            step(xb)
        sync(device)
        return k / (time.perf_counter() - t0)

    measured = [("on device", steps_per_s(itertools.repeat(x), n))]
    for label, device_decode in (("JPEG loader", False), ("JPEG loader, GPU decode", True)):
        if device_decode and not (cuda or cfg.gpu_check):
            continue
        feed = batches(device_decode)
        steps_per_s(feed, warmup)
        measured.append((label, steps_per_s(feed, n)))
        feed.close()
    on_device = measured[0][1]
    for label, v in measured:
        rows.append({"part": "e2e", "name": f"{name} {label}", "steps_s": v, "img_s": v * B,
                     "ratio": v / on_device, "workers": cfg.workers})


def bench_decode(cfg, device, files, rows, hazard_tries=20):
    """Part decode: one batch of the JPEGs through augment.decode_views (--decode gpu) against the workers'
    views of the same keys, at --crop px: the largest and the mean difference where the worker decodes at full
    size too (the same boxes; on CUDA nvJPEG's IDCT and a float resize against libjpeg-turbo's and a uint8
    one) and the mean where it decodes DCT-reduced; the median time of decode_views (decode + crops) per
    batch. On CUDA also the hazard of augment.decode_images: `hazard_tries` decodes each right after freeing
    buffers that queued kernels still read; 'hazard_corrupted' counts the tries where those kernels saw other
    values."""
    B, S = cfg.batch_size, cfg.crop  # the pretraining size, also with --quick: most crops at full size
    keys = [i % len(files) for i in range(B)]
    batch = data.two_view_batch([data.TwoViews(files, S, device_decode=True)[i] for i in keys])
    want = data.two_view_batch([data.TwoViews(files, S)[i] for i in keys])
    views, _ = augment.decode_views(batch, S, device)
    diff = torch.stack([(v.cpu().float() - want[f"view{k}"].float()).abs() for k, v in enumerate(views, 1)], 1)
    side = torch.minimum(batch["box1"][:, 2:].amin(1), batch["box2"][:, 2:].amin(1))
    full = side < 2 * S  # data.TwoViews.load drafts from a factor 2 on
    times = []
    for _ in range(max(3, cfg.steps)):
        sync(device)
        t0 = time.perf_counter()
        augment.decode_views(batch, S, device)
        sync(device)
        times.append(time.perf_counter() - t0)
    row = {"part": "decode", "name": f"decode on {device.type} vs workers, batch {B}", "n_full": int(full.sum()),
           "full_max_diff": diff[full].max().item() if full.any() else None,
           "full_mean_diff": diff[full].mean().item() if full.any() else None,
           "draft_mean_diff": diff[~full].mean().item() if (~full).any() else None,
           "batch_ms": 1e3 * sorted(times)[len(times) // 2]}
    row["img_s"] = B / row["batch_ms"] * 1e3
    if device.type == "cuda":
        jpegs = [batch["jpeg"].split(batch["jpeg_sizes"].tolist())[i] for i in range(min(B, 32))]
        shapes = [tuple(img.shape) for img in augment.decode_images(jpegs, device)]
        row["hazard_corrupted"] = 0
        for _ in range(hazard_tries):
            bufs = [torch.ones(shape, dtype=torch.uint8, device=device) for shape in shapes]
            slow = torch.randn(4096, 4096, device=device)
            for _ in range(10):
                slow = slow @ slow / 64  # queued ahead of the sums
            sums = torch.stack([b.sum(dtype=torch.int64) for b in bufs])
            want_sums = torch.tensor([math.prod(shape) for shape in shapes])
            del bufs
            augment.decode_images(jpegs, device)  # its outputs may take the freed blocks
            row["hazard_corrupted"] += int(not torch.equal(sums.cpu(), want_sums))
    rows.append(row)


def bench_run(cfg, device, folder, rows, name, flags):
    """Part run: pretrain.py in its own process, as a user starts it, on the JPEG folder for --run-steps steps
    with `flags` (on CUDA --compile on --dtype bf16), logging every third of the run; the row keeps the last
    log line (the first window includes start-up and compilation) and the whole output."""
    cuda = device.type == "cuda"
    out_dir = tempfile.mkdtemp(prefix="bench_run_")
    argv = ["--data", folder, "--out-dir", os.path.join(out_dir, "run"), "--max-steps", str(cfg.run_steps),
            "--log-every", str(max(1, cfg.run_steps // 3)), "--workers", str(cfg.workers), "--warmup", "1",
            "--compile", "on" if cuda else "off", "--dtype", "bf16" if cuda else "fp32"] + flags
    cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrain.py")] + argv
    row = {"part": "run", "name": f"pretrain.py {name}", "flags": argv}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=cfg.run_timeout)
        row.update(returncode=proc.returncode, output=(proc.stdout + proc.stderr)[-4000:])
        log = os.path.join(out_dir, "run", "log.jsonl")
        recs = [json.loads(line) for line in open(log)] if os.path.exists(log) else []
        if recs:
            last = recs[-1]
            row.update(img_s=last["img_per_s"], views_s=2 * last["img_per_s"], mfu=last.get("mfu"),
                       log_line=[ln for ln in proc.stdout.splitlines() if ln.startswith("step ")][-1])
    except subprocess.TimeoutExpired as e:
        row["error"] = f"timed out after {cfg.run_timeout} s: {str(e.stdout or '')[-2000:]}"
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    row["wall_s"] = time.perf_counter() - t0
    rows.append(row)
    print(
        f"  [{time.perf_counter() - cfg.t_start:.0f} s] run: "
        f"{row.get('log_line', row.get('error', row.get('output', '')[-600:]))}",
        flush=True)


class TorchvisionTwoViews(torch.utils.data.Dataset):
    """The baseline: full PIL decode, then the augmentation of METHOD.md 10 per image and view in the worker
    (PIL ops, then to tensor: on a 2-core CPU ~1.5x faster than v2.ToImage first and tensor ops)."""

    def __init__(self, files, S):
        self.files = files
        self.tf = v2.Compose([
            v2.RandomResizedCrop(S, scale=(0.2, 1.0)), v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), v2.RandomGrayscale(0.2),
            v2.RandomApply([v2.GaussianBlur(2 * int(0.05 * S) + 1, (0.1, 2.0))], p=0.5),
            v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        img = data.load_rgb(self.files[i])
        return self.tf(img), self.tf(img)


def data_img_s(pipeline, files, S, workers, n_images, batch, device):
    """Images/s (two views each) from DataLoader creation to the last batch ready. pipeline: "ours" (loader
    workers + photometric on `device`), "loader" (ours without the photometric part: the CPU cost per process
    when the photometric ops run on a GPU), "bytes" (the workers of --decode gpu: the draws and the JPEG's
    bytes, no decode) or "torchvision"."""
    ours = pipeline != "torchvision"
    ds = data.TwoViews(files, S, device_decode=pipeline == "bytes") if ours else TorchvisionTwoViews(files, S)
    sampler = [i % len(files) for i in range(n_images)]
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers,
                                         collate_fn=data.two_view_batch if ours else None,
                                         pin_memory=device.type == "cuda")
    threads = torch.get_num_threads()
    if workers == 0:
        torch.set_num_threads(1)  # one process: as in a loader worker
    try:
        sync(device)
        t0 = time.perf_counter()
        for b in loader:
            if pipeline == "ours":  # on CPU this counts the photometric ops; on CUDA they run on the GPU
                _ = [augment.photometric(b[f"view{i}"].to(device, non_blocking=True),
                                         b[f"photo{i}"].to(device))
                     for i in (1, 2)]
            elif pipeline == "loader":
                _ = [b[f"view{i}"].to(device, non_blocking=True) for i in (1, 2)]
            elif pipeline == "bytes":
                _ = b["jpeg"].to(device, non_blocking=True)
            else:
                _ = [v.to(device, non_blocking=True) for v in b]
        sync(device)
        return n_images / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)


def bench_data(cfg, device, files, rows):
    """Part 3: one process (num_workers=0), then --workers workers; ours with and without the photometric ops,
    and the workers of --decode gpu (no decode), against torchvision doing everything."""
    batch = min(32, cfg.batch_size)
    names = {"ours": "ours", "loader": "ours, loader only", "bytes": "ours, loader of --decode gpu",
             "torchvision": "torchvision"}
    for workers in sorted({0, cfg.workers}):
        n = len(files) if workers == 0 else max(len(files), 8 * batch * workers)
        n -= n % batch
        for name in ("ours", "torchvision"):  # warm the page cache and the imports once
            data_img_s(name, files, cfg.crop, 0, batch, batch, device)
        img_s = {name: data_img_s(name, files, cfg.crop, workers, n, batch, device) for name in names}
        label = "1 process" if workers == 0 else f"{workers} workers"
        for name, title in names.items():
            rows.append({"part": "data", "name": f"{title}, {label}", "img_s": img_s[name],
                         "views_s": 2 * img_s[name], "ratio": img_s[name] / img_s["torchvision"]})
