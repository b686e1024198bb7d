"""
Part detect of bench.py (run through it: python bench.py, or --gpu-check): a training iteration of
probe_detect.py's COCO fine-tuning protocol on one GPU, and the GPU-hours of its COCO and VOC protocols at that
speed.
"""
import sys
import time

import torch

import probe_detect
import probing

# a COCO 4:3 image at the protocol's largest training short side, 800 (it draws one of 640, 672, ... 800 a
# batch; 1067 is under the longest-side cap 1333): the costliest of its draws
IMAGE = (800, 1067)
PER_GPU = 2  # images an iteration on one GPU: the protocol's batch 16 over 8 GPUs, as Detectron2 runs it
CLASSES, OBJECTS = 80, 7  # COCO's classes; boxes (and masks) an image, COCO's average (7.3)
STEPS = (3, 5)  # warm-up and timed iterations
# --quick, a CPU smoke run: 64x96 images, the demo protocol's width and RoIs (COCO's 256 and 512 take ~20 s an
# iteration on a CPU core, the mask head's convolutions most of it), one warm-up and one timed iteration
QUICK_IMAGE, QUICK_STEPS = (64, 96), (1, 1)
QUICK_FLAGS = ["--channels", str(probe_detect.PROTOCOLS["demo"]["channels"]),
               "--rois", str(probe_detect.PROTOCOLS["demo"]["rois"])]


def synthetic_batch(H, W, device):
    """PER_GPU images [3, H, W] in [0, 1], each with OBJECTS boxes (sides 10-50% of the image's), labels in
    1..CLASSES and masks (the boxes filled), as the training DetData gives them, on the device."""
    g, size = torch.Generator().manual_seed(0), torch.tensor([W, H, W, H], dtype=torch.float32)
    ys, xs, images, targets = torch.arange(H)[None, :, None], torch.arange(W)[None, None, :], [], []
    for _ in range(PER_GPU):
        corner = torch.rand(OBJECTS, 2, generator=g) * 0.5
        boxes = torch.cat([corner, corner + 0.1 + 0.4 * torch.rand(OBJECTS, 2, generator=g)], 1) * size
        x0, y0, x1, y1 = (boxes[:, i, None, None] for i in range(4))
        masks = ((xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)).to(torch.uint8)
        images.append(torch.rand(3, H, W, generator=g).to(device))
        targets.append({"boxes": boxes.to(device), "labels": torch.randint(1, CLASSES + 1, (OBJECTS,),
                                                                           generator=g).to(device),
                        "masks": masks.to(device)})
    return images, targets


def detect_step(flags, device, H, W):
    """probe_detect.py's detector and optimiser for its command-line `flags` on COCO files (with --random-init
    --finetune: Mask R-CNN on the simple pyramid, the COCO protocol's width and RoIs unless the flags say
    otherwise, AdamW over its layer-decayed param_groups at the lr after warm-up), and its training iteration
    (probe_detect.train_step: bf16 autocast on CUDA, eager as probe_detect runs) on synthetic_batch(H, W),
    already on the device (no loader)."""
    args = probe_detect.get_args_parser().parse_args(flags + ["--device", str(device)])
    probe_detect.resolve_flags(args, demo=False)  # the COCO protocol
    backbone, _ = probing.probe_backbone(None, True, args.model, args.seed, device)
    torch.manual_seed(args.seed)
    model = probe_detect.build_detector(backbone, CLASSES, args.masks, args).to(device).train()
    opt = probe_detect.optimizer(model, args)
    for group in opt.param_groups:
        group["lr"] = args.lr * group["lr_scale"]
    images, targets = synthetic_batch(H, W, device)
    return lambda: probe_detect.train_step(model, opt, images, targets, device)


def bench_detect(cfg, device, rows, median_time, free):
    """Part detect: detect_step of `probe_detect.py --random-init --finetune --model cfg.model --img-size 800`
    at IMAGE (--quick: QUICK_IMAGE and QUICK_FLAGS), PER_GPU images an iteration: ms and iterations/s,
    images/s, peak memory on CUDA, and the GPU-hours of each protocol on one GPU at that speed (its iters x its
    batch 16 / images/s; VOC's Faster R-CNN at its 480-800 short sides costs less than this iteration, so its
    figure is an upper bound). Under-counted: a random-init RPN proposes almost nothing on the objects, so the
    mask head sees ~8 RoIs an image (the truth boxes, which torchvision adds to the proposals; measured on the
    CPU at IMAGE) where a trained one gets up to 128, ~1 GFLOP forward each. median_time(fn, device, warmup,
    steps) and free(device) are bench.py's timer and memory reset."""
    (H, W), (warmup, steps) = (QUICK_IMAGE, QUICK_STEPS) if cfg.quick else (IMAGE, STEPS)
    flags = ["--random-init", "--finetune", "--model", cfg.model, "--img-size", str(H)] + \
        (QUICK_FLAGS if cfg.quick else [])
    row, t0 = {"part": "detect", "name": f"Mask R-CNN fine-tuning, {cfg.model} {H}x{W} x{PER_GPU}",
               "flags": flags, "image": [H, W], "batch": PER_GPU}, time.perf_counter()
    try:
        free(device)
        step = detect_step(flags, device, H, W)
        t = median_time(step, device, warmup, steps)
        row.update(step_ms=1e3 * t, steps_s=1 / t, img_s=PER_GPU / t, wall_s=time.perf_counter() - t0,
                   mem_gb=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None)
        for name in ("coco", "voc"):
            protocol = probe_detect.PROTOCOLS[name]
            row[f"{name}_gpu_h"] = protocol["iters"] * protocol["batch_size"] / row["img_s"] / 3600
    except Exception as e:  # one broken part (an OOM too) must not cost the rest of a GPU check
        row["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
        print(f"error in detect row {row['name']}: {row['error'][:400]}", file=sys.stderr, flush=True)
    rows.append(row)
    print(f"  [{time.perf_counter() - cfg.t_start:.0f} s] detect {row['name']}: "
          f"{row.get('step_ms', float('nan')):.1f} ms", flush=True)
    step = None
    free(device)
