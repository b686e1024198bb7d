"""
Semantic-segmentation probe (METHOD.md 6.2): BatchNorm2d + 1x1 conv on the frozen ViT's patch-token map,
scored by mIoU.

    python probe_segment.py ckpt.pt                                   # the demo set (made if absent)
    python probe_segment.py ckpt.pt --dataset voc --root VOCdevkit/VOC2012 --out seg.json --vis vis/
    python probe_segment.py ckpt.pt --dataset coco --train-json annotations/instances_train2017.json \\
        --train-images train2017 --val-json annotations/instances_val2017.json --val-images val2017
    python probe_segment.py --random-init                             # the no-pretraining baseline

VOC: JPEGImages/<id>.jpg, SegmentationClass/<id>.png (palette indices, 255 = ignored boundary),
ImageSets/Segmentation/{train,val}.txt; classes = 0 .. the largest index in the masks. COCO: semantic masks
drawn from the instance annotations (background 0, categories 1..C in sorted-id order, crowd regions ignored).
The backbone runs on every training batch (frozen, no grad) so that each epoch sees new random scales, crops
and flips.
"""
import argparse
import json
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset

import data
import demo as demo_set
import probing


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    probing.add_probe_args(parser)
    add = parser.add_argument
    add("--dataset", choices=["voc", "coco"], default="voc", help="layout of the data")
    add("--root", help="VOC folder holding JPEGImages/, SegmentationClass/, ImageSets/ (default: demo)")
    add("--train-split", default="train",
        help="VOC: training list in ImageSets/Segmentation/ (train_aug for VOC12 + SBD)")
    add("--mask-dir", default="SegmentationClass", help="VOC: folder of the class PNGs under --root "
        "(SegmentationClassAug for VOC12 + SBD)")
    add("--train-json", help="COCO: instances file of the training split (default: the demo set)")
    add("--train-images", help="COCO: folder of the training images")
    add("--val-json", help="COCO: instances file of the evaluation split")
    add("--val-images", help="COCO: folder of the evaluation images")
    add("--img-size", type=int, default=None, help="training crop, and the short side at evaluation "
        "(default: 2x the pretraining img_size)")
    add("--epochs", type=int, default=20, help="epochs of the head")
    add("--lr", type=float, default=1e-3, help="AdamW learning rate of the head (cosine-decayed to 0)")
    add("--wd", type=float, default=1e-4, help="AdamW weight decay of the head")
    add("--batch-size", type=int, default=16, help="training batch size")
    add("--out", default=None, help="write mIoU and the per-class IoU to this JSON file")
    add("--vis", default=None, metavar="DIR", help="write image | truth | prediction PNGs of the first 8 "
        "val images to DIR (vis_000.png, ...)")
    return parser


VOC_NAMES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car",
             "cat", "chair", "cow",
             "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
             "tvmonitor"]
N_VIS = 8


# ------------------------------------------------------------------------------------------------------------
# Data: VOC palette masks, COCO semantic masks, training augmentation and evaluation resize

def voc_split(root, split, mask_dir):
    """[(image path, mask path)] of ImageSets/Segmentation/<split>.txt, after checking that all files
    exist."""
    list_file = os.path.join(root, "ImageSets", "Segmentation", f"{split}.txt")
    if not os.path.isfile(list_file):
        raise FileNotFoundError(f"VOC split list {list_file}: no such file (is --root {root} a VOC folder?)")
    with open(list_file) as f:
        ids = [line.split()[0] for line in f if line.strip()]
    if not ids:
        raise ValueError(f"VOC split list {list_file}: no image ids")
    items = [(os.path.join(root, "JPEGImages", i + ".jpg"),
              os.path.join(root, mask_dir, i + ".png")) for i in ids]
    probing.require_files([p for p, _ in items], f"images of {list_file}")
    probing.require_files([m for _, m in items], f"masks of {list_file}")
    return items


def voc_mask(path):
    """[H, W] uint8 class indices of a VOC mask: the palette indices of a P-mode PNG (or the values of an L
    PNG)."""
    with Image.open(path) as img:
        if img.mode not in ("P", "L"):
            raise ValueError(f"mask {path}: mode {img.mode}, expected a palette (P) or grey (L) PNG "
                             f"of class indices")
        return np.array(img)


def voc_scan(items):
    """(1 + the largest class index (255 excluded) in the masks, the usable items, [(image, why)] of the pairs
    left out): every mask is read and every image's header, so that a pair whose mask is not a palette PNG or
    whose image is missing, unreadable or of another size than its mask is named and skipped here, not met in
    the middle of training."""
    top, good, bad, bar = 0, [], [], probing.Progress("scanning masks", len(items))
    for img_path, mask_path in items:
        try:
            mask = voc_mask(mask_path)
            with data._open(img_path) as img:
                if img.size != mask.shape[::-1]:
                    raise ValueError(f"{img_path} is {img.size[0]}x{img.size[1]} px but {mask_path} is "
                                     f"{mask.shape[1]}x{mask.shape[0]}")
        except Exception as e:  # any unreadable file or mismatch: this pair is skipped
            bad.append((img_path, str(e)))
        else:
            top = max(top, int(mask[mask != 255].max(initial=0)))
            good.append((img_path, mask_path))
        bar.update()
    return top + 1, good, bad


def augment(img, label, size):
    """Training pair (METHOD.md 6.2): scale the short side to size * U(0.5, 2), pad to at least size x size
    (image with 0 = the mean colour after normalisation, label with 255), random size x size crop, horizontal
    flip with p = 0.5.
    Uses the torch RNG, which DataLoader seeds per worker from torch.manual_seed."""
    w, h = img.size
    s = size * (0.5 + 1.5 * torch.rand(()).item()) / min(w, h)
    nw, nh = max(1, round(w * s)), max(1, round(h * s))
    x = normalize(img.resize((nw, nh), Image.BILINEAR))
    y = torch.from_numpy(np.array(Image.fromarray(label).resize((nw, nh), Image.NEAREST))).long()
    ph, pw = max(0, size - nh), max(0, size - nw)
    x, y = F.pad(x, (0, pw, 0, ph), value=0.0), F.pad(y, (0, pw, 0, ph), value=255)
    top = torch.randint(0, x.shape[1] - size + 1, ()).item()
    left = torch.randint(0, x.shape[2] - size + 1, ()).item()
    x, y = x[:, top:top + size, left:left + size], y[top:top + size, left:left + size]
    if torch.rand(()).item() < 0.5:
        x, y = x.flip(-1), y.flip(-1)
    return x, y


def normalize(img):
    return TF.normalize(TF.to_tensor(img), data.IMAGENET_MEAN, data.IMAGENET_STD)


class SegData(Dataset):
    """Image/label pairs. Training: augment() -> ([3, size, size], [size, size]). Evaluation: the image with
    its short side resized to `size` and padded (bottom/right) to a multiple of the patch size, the label at
    its original size, and the resized (h, w) before padding."""

    def __init__(self, items, size, patch, train, coco=None, cat_index=None):
        self.items, self.size, self.patch, self.train = items, size, patch, train
        self.coco, self.cat_index = coco, cat_index

    def __len__(self):
        return len(self.items)

    def label(self, i):
        src = self.items[i][1]
        return probing.coco_mask(self.coco, src, self.cat_index) if self.coco else voc_mask(src)

    def __getitem__(self, i):
        """Training (image, label, ok), evaluation (image, label, (h, w), ok); ok is False for a file that
        cannot be read or an image whose size is not its label's: a blank image with every pixel ignored (255),
        which adds nothing to the loss or the confusion matrix (skipped and counted by the caller)."""
        try:
            img, label = data.load_rgb(self.items[i][0]), self.label(i)
            if img.size != label.shape[::-1]:
                raise ValueError("image and label sizes differ")
        except Exception:  # any decode failure or mismatch
            n = self.size if self.train else self.patch
            blank, ignored = torch.zeros(3, n, n), torch.full((n, n), 255, dtype=torch.long)
            return (blank, ignored, False) if self.train else (blank, ignored, (n, n), False)
        if self.train:
            return (*augment(img, label, self.size), True)
        w, h = img.size
        nw, nh = max(1, round(w * self.size / min(w, h))), max(1, round(h * self.size / min(w, h)))
        x = normalize(img.resize((nw, nh), Image.BICUBIC))
        x = F.pad(x, (0, -nw % self.patch, 0, -nh % self.patch), value=0.0)
        return x, torch.from_numpy(label).long(), (nh, nw), True


# ------------------------------------------------------------------------------------------------------------
# Metrics (METHOD.md 6.2)

def confusion_matrix(pred, target, n_classes, ignore_index=255):
    """[C, C] int64 counts, rows = truth, cols = prediction: conf[t, p] = #pixels with target t and prediction
    p, pixels whose target is ignore_index excluded. Arrays or tensors of the same shape."""
    pred, target = torch.as_tensor(pred).long().cpu(), torch.as_tensor(target).long().cpu()
    if pred.shape != target.shape:
        raise ValueError(f"prediction of shape {tuple(pred.shape)} vs target of shape {tuple(target.shape)}")
    pred, target = pred.reshape(-1), target.reshape(-1)
    keep = target != ignore_index
    pred, target = pred[keep], target[keep]
    bad = target[(target < 0) | (target >= n_classes)]
    if len(bad):
        raise ValueError(f"label {bad[0].item()} outside 0..{n_classes - 1} (and not the ignore index "
                         f"{ignore_index})")
    if len(pred) and (pred.min() < 0 or pred.max() >= n_classes):
        raise ValueError(f"prediction outside 0..{n_classes - 1}")
    counts = torch.bincount(target * n_classes + pred, minlength=n_classes * n_classes)
    return counts.reshape(n_classes, n_classes).numpy().astype(np.int64)


def miou(conf):
    """(mIoU in percent, per-class IoU in percent) from a confusion matrix accumulated over the whole set:
        IoU_c = TP_c / (TP_c + FP_c + FN_c), TP_c = conf[c, c], FP_c = column sum - TP_c,
        FN_c = row sum - TP_c;
    a class absent from both truth and prediction (TP+FP+FN = 0) gets None and is left out of the mean."""
    conf = np.asarray(conf, dtype=np.float64)
    tp = np.diag(conf)
    denom = conf.sum(0) + conf.sum(1) - tp
    ious = [100 * float(t / d) if d > 0 else None for t, d in zip(tp, denom)]
    seen = [v for v in ious if v is not None]
    return (float(np.mean(seen)) if seen else float("nan")), ious


# ------------------------------------------------------------------------------------------------------------
# Head, training, evaluation, pictures

def token_map(tokens, h, w):
    """Patch tokens [B, 1+T, D] -> the 2-D map [B, D, h, w] (row-major token order)."""
    return tokens[:, 1:].transpose(1, 2).reshape(tokens.shape[0], -1, h, w)


def train_head(model, head, loader, args):
    """CE of the head logits, bilinearly upsampled to the label crops, averaged over the pixels that are not
    255 (a crop of ignored pixels only gives 0); AdamW, lr cosine-decayed to 0. Items that could not be read
    are left out of their batch. Returns how many of the first epoch's items were left out."""
    opt = torch.optim.AdamW(head.parameters(), lr=args.lr, weight_decay=args.wd)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.epochs * len(loader))
    bar, p = probing.Progress("training head", args.epochs * len(loader.dataset)), model.patch_size
    head.train()
    skipped = 0
    for epoch in range(args.epochs):
        for x, y, ok in loader:
            skipped += int((~ok).sum()) if epoch == 0 else 0
            x, y = x[ok], y[ok].to(args.device)
            if not len(x):
                continue
            logits = head(token_map(probing.frozen_tokens(model, x), x.shape[2] // p, x.shape[3] // p))
            logits = F.interpolate(logits, size=y.shape[-2:], mode="bilinear", align_corners=False)
            loss = F.cross_entropy(logits, y, ignore_index=255,
                                   reduction="sum") / (y != 255).sum().clamp(min=1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(len(x), f"epoch {epoch + 1}/{args.epochs} loss {loss.item():.3f}")
    return skipped


def save_vis(path, img, truth, pred, names):
    """image | truth | prediction side by side (each at least 160 px high) in the VOC colours (ignored =
    cream), with a legend of the classes shown."""
    colours, k = np.array(demo_set.voc_palette(),
                          dtype=np.uint8).reshape(256, 3), max(1, -(-160 // img.size[1]))
    w, h = img.size[0] * k, img.size[1] * k
    panels = [img.resize((w, h), Image.BICUBIC)] + [Image.fromarray(colours[m]).resize((w, h), Image.NEAREST)
                                                    for m in (truth, pred)]
    shown = np.union1d(np.unique(truth), np.unique(pred)).tolist()
    names = {**dict(enumerate(names)), 255: "ignored"}
    canvas = Image.new("RGB", (3 * w + 20, h + 20 + 14 * len(shown) + 4), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (panel, title) in enumerate(zip(panels, ["image", "truth", "prediction"])):
        canvas.paste(panel, (i * (w + 10), 16))
        draw.text((i * (w + 10), 2), title, fill="black")
    for row, c in enumerate(shown):
        y = h + 22 + 14 * row
        draw.rectangle([0, y, 10, y + 10], fill=tuple(int(v) for v in colours[c]), outline="black")
        draw.text((16, y), names[c], fill="black")
    canvas.save(path)


def evaluate(model, head, dataset, names, args):
    """One confusion matrix over the whole set: logits upsampled to the resized input, the padding cropped
    off, then upsampled to the original label size and argmaxed. Writes the first N_VIS pictures to --vis.
    Returns (the matrix, the images that could not be read, left out)."""
    loader = DataLoader(dataset, batch_size=1, num_workers=args.workers)
    n, p = len(names), model.patch_size
    conf, bar, skipped = np.zeros((n, n), dtype=np.int64), probing.Progress("evaluating", len(dataset)), []
    head.eval()
    with torch.no_grad():
        for i, (x, y, (nh, nw), ok) in enumerate(loader):
            bar.update()
            if not ok.item():
                skipped.append(dataset.items[i][0])
                continue
            logits = head(token_map(probing.frozen_tokens(model, x), x.shape[2] // p, x.shape[3] // p))
            logits = F.interpolate(logits, size=x.shape[2:], mode="bilinear",
                                   align_corners=False)[..., :nh, :nw]
            pred = F.interpolate(logits, size=y.shape[-2:], mode="bilinear",
                                 align_corners=False).argmax(1).cpu()
            conf += confusion_matrix(pred, y, n)
            if args.vis and i < N_VIS:
                save_vis(os.path.join(args.vis, f"vis_{i:03d}.png"), data.load_rgb(dataset.items[i][0]),
                         y[0].numpy().astype(np.uint8), pred[0].numpy().astype(np.uint8), names)
    return conf, skipped


def datasets(args, demo, size, patch):
    """(training SegData, evaluation SegData, class names) of --dataset, every file checked before any
    work."""
    if args.dataset == "voc":
        root = args.root or "data/demo/voc"
        if not os.path.isdir(root):
            raise FileNotFoundError(f"--root {root}: no such folder")
        train_items, val_items = voc_split(root, args.train_split,
                                           args.mask_dir), voc_split(root, "val", args.mask_dir)
        n_classes, good, bad = voc_scan(train_items + val_items)
        if bad:
            print(f"skipped {len(bad)} of {len(good) + len(bad)} image/mask pairs, e.g. {bad[0][1]}",
                  file=sys.stderr)
        good = set(good)
        train_items, val_items = [i for i in train_items if i in good], [i for i in val_items if i in good]
        if not train_items or not val_items:
            raise ValueError(f"--root {root}: no usable image/mask pair in the {'val' if train_items else 'train'}"
                             f" split" + (f" (e.g. {bad[0][1]})" if bad else ""))
        names = ["background"] + [f"class {c}" for c in range(1, n_classes)]
        if demo and n_classes == 1 + len(demo_set.DEMO_CATEGORIES):
            names = ["background"] + [c[1] for c in demo_set.DEMO_CATEGORIES]
        elif n_classes == len(VOC_NAMES):
            names = VOC_NAMES
        return SegData(train_items, size, patch, True), SegData(val_items, size, patch, False), names
    tj, ti, vj, vi = probing.DEMO if demo else (args.train_json, args.train_images, args.val_json,
                                                args.val_images)
    train, val = probing.load_coco(tj, ti), probing.load_coco(vj, vi)
    cat_ids = probing.same_categories(train, val, tj, vj)
    if len(cat_ids) > 254:
        raise ValueError(f"{tj}: {len(cat_ids)} categories; at most 254 fit the uint8 masks")
    cat_index = {c: i + 1 for i, c in enumerate(cat_ids)}
    items = [[(os.path.join(folder, coco.imgs[i]["file_name"]), i) for i in sorted(coco.imgs)]
             for coco, folder in ((train, ti), (val, vi))]
    names = ["background"] + [train.cats[c]["name"] for c in cat_ids]
    return SegData(items[0], size, patch, True, train, cat_index), SegData(items[1], size, patch, False, val,
                                                                           cat_index), names


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    try:
        coco_flags = [args.train_json, args.train_images, args.val_json, args.val_images]
        if args.dataset == "voc" and any(coco_flags):
            raise ValueError("--train-json/--train-images/--val-json/--val-images need --dataset coco")
        if args.dataset == "coco" and args.root:
            raise ValueError("--root is the VOC folder; with --dataset coco give --train-json "
                             "... --val-images")
        if any(coco_flags) and not all(coco_flags):
            raise ValueError("give all four of --train-json --train-images --val-json --val-images, or none "
                             "for the demo set")
        probing.check_flags(args)
        if args.vis and (os.path.exists(args.vis) and not os.path.isdir(args.vis)
                         or not os.path.isdir(os.path.dirname(os.path.abspath(args.vis)))):
            raise ValueError(f"--vis {args.vis}: expected a folder (made if missing) inside an "
                             f"existing folder")
        demo = not (args.root or any(coco_flags))
        if args.random_init and not args.model:
            args.model = "vit_demo" if demo else "vit_small"
        model, ckpt_args = probing.probe_backbone(args.ckpt, args.random_init, args.model,
                                                  args.seed, args.device)
        size = args.img_size or 2 * (ckpt_args.get("img_size") or model.config["img_size"])
        if size < model.patch_size or size % model.patch_size:
            raise ValueError(f"--img-size {size}: expected a multiple of the patch size {model.patch_size}")
        if demo:
            demo_set.make_demo()
        train_set, val_set, names = datasets(args, demo, size, model.patch_size)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"backbone {args.ckpt or 'random-init ' + args.model}, {args.dataset}, train crop {size} px, "
          f"{len(train_set)} train / {len(val_set)} val images, {len(names)} classes")
    if args.vis:
        os.makedirs(args.vis, exist_ok=True)

    torch.manual_seed(args.seed)
    head = nn.Sequential(nn.BatchNorm2d(model.embed_dim),
                         nn.Conv2d(model.embed_dim, len(names), 1)).to(args.device)
    loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                        pin_memory=args.device.startswith("cuda"), persistent_workers=args.workers > 0)
    skipped_train = train_head(model, head, loader, args)
    conf, skipped = evaluate(model, head, val_set, names, args)
    score, ious = miou(conf)
    if skipped_train or skipped:
        print(f"skipped images that could not be read: {skipped_train} of {len(train_set)} train, "
              f"{len(skipped)} of {len(val_set)} val {skipped[:3]}", file=sys.stderr)
    print(f"\nmIoU {score:.2f}  (" + ", ".join(f"{n} {v:.1f}" for n, v in zip(names, ious)
                                               if v is not None) + ")")
    if args.out:
        result = dict(mIoU=score, IoU=dict(zip(names, ious)),
                      backbone=args.ckpt or f"random-init {args.model} seed {args.seed}",
                      dataset=args.dataset,
                      img_size=size, epochs=args.epochs, lr=args.lr, wd=args.wd, batch_size=args.batch_size,
                      n_train=len(train_set) - skipped_train, n_val=len(val_set) - len(skipped),
                      skipped_train=skipped_train, skipped_val=skipped)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
