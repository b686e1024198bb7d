"""
COCO multi-label classification probe (SPEC 1.10, protocol A): a linear head on the frozen global feature of a ViT.

    python probe_multilabel.py ckpt.pt                      # the built-in demo set (data/demo, made if missing)
    python probe_multilabel.py ckpt.pt --train-json annotations/instances_train2017.json --train-images train2017 \\
        --val-json annotations/instances_val2017.json --val-images val2017 --out ml.json
    python probe_multilabel.py --random-init                # the no-pretraining baseline

The backbone features are extracted once (eval resize to img_size x img_size, no crop, so all objects stay in view)
and cached, so a second run with other head settings skips the backbone. This replaces SPEC's train-time
RandomResizedCrop augmentation of the probe: one pass over the data instead of one per epoch.
"""
import argparse
import hashlib
import json
import os
import sys
import tempfile
from contextlib import redirect_stdout

import numpy as np
import torch
import torch.nn as nn
import torchvision.transforms as T
from torch.utils.data import DataLoader, Dataset

import data
import vit

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
vit.add_probe_args(parser)
parser.add_argument("--train-json", help="COCO instances file of the training split (default: the demo set)")
parser.add_argument("--train-images", help="folder of the training images")
parser.add_argument("--val-json", help="COCO instances file of the evaluation split")
parser.add_argument("--val-images", help="folder of the evaluation images")
parser.add_argument("--drop-empty", action="store_true",
                    help="drop images without annotations (default: keep them as all-negative examples)")
parser.add_argument("--agg", choices=["cls", "gap", "cls+gap"], default=None,
                    help="global feature: CLS token, mean of the patch tokens, or both concatenated "
                         "(default: the checkpoint's pretraining --agg, else gap)")
parser.add_argument("--img-size", type=int, default=None, help="input size (default: the pretraining img_size)")
parser.add_argument("--epochs", type=int, default=1000,
                    help="full-batch AdamW steps of the linear head on the cached features (cheap: no backbone)")
parser.add_argument("--lr", type=float, default=1e-2, help="AdamW learning rate of the head (cosine-decayed to 0)")
parser.add_argument("--wd", type=float, default=1e-4, help="AdamW weight decay of the head")
parser.add_argument("--batch-size", type=int, default=256, help="images per batch of the feature extraction")
parser.add_argument("--cache", default=None,
                    help="feature cache folder (default: probe_cache/ next to --out, else in the system temp dir)")
parser.add_argument("--out", default=None, help="write the metrics to this JSON file")

DEMO = ("data/demo/annotations/instances_train.json", "data/demo/images/train",
        "data/demo/annotations/instances_val.json", "data/demo/images/val")


# ----------------------------------------------------------------------------------------------------------------------
# Flags and COCO files (both also used by probe_segment.py), multi-hot labels, images

def check_flags(args):
    """The checks of the flags both probes share (--epochs, --batch-size, --device, --workers, --out)."""
    for flag in ("epochs", "batch_size"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: expected a positive integer")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ValueError(f"--device {args.device}: not a torch device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: this torch has no CUDA device")
    if args.workers < 0:
        raise ValueError(f"--workers {args.workers}: expected 0 (load in the main process) or more")
    if args.out and (os.path.isdir(args.out) or not os.path.isdir(os.path.dirname(os.path.abspath(args.out)))):
        raise ValueError(f"--out {args.out}: expected a file path in an existing folder")


def require_files(paths, what):
    """Raise a ValueError naming how many of `paths` are missing and the first few."""
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise ValueError(f"{what}: {len(missing)} of {len(paths)} files missing, e.g. {missing[:3]}")


def load_coco(json_path, images_dir):
    """A pycocotools COCO index of `json_path` after checking that it is COCO instances JSON and that every image it
    names is in `images_dir`; images sorted by id (a fixed order for features and labels)."""
    from pycocotools.coco import COCO
    if not os.path.isfile(json_path):
        raise FileNotFoundError(f"annotation file {json_path}: no such file")
    if not os.path.isdir(images_dir):
        raise FileNotFoundError(f"image folder {images_dir}: no such folder")
    try:
        with open(json_path) as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"annotation file {json_path}: not JSON ({e})") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(d, dict) or not isinstance(d.get(key), list):
            raise ValueError(f"annotation file {json_path}: not COCO instances format (no '{key}' list)")
    coco = COCO()
    coco.dataset = d
    try:
        with open(os.devnull, "w") as null, redirect_stdout(null):  # pycocotools prints "creating index..."
            coco.createIndex()
        bad = [a["id"] for a in d["annotations"] if a["category_id"] not in coco.cats or a["image_id"] not in coco.imgs]
        paths = [os.path.join(images_dir, coco.imgs[i]["file_name"]) for i in sorted(coco.imgs)]
    except (KeyError, TypeError) as e:
        raise ValueError(f"annotation file {json_path}: not COCO instances format (an entry without {e})") from None
    if bad:
        raise ValueError(f"annotation file {json_path}: {len(bad)} annotations name an unknown image or category, "
                         f"e.g. ids {bad[:3]}")
    require_files(paths, f"images of {json_path} in {images_dir}")
    return coco


def same_categories(train, val, train_json, val_json):
    """The sorted category ids shared by both files (a head trained on one set of classes is scored on the same)."""
    ids = sorted(train.cats)
    if ids != sorted(val.cats):
        raise ValueError(f"{val_json} has category ids {sorted(val.cats)[:10]}..., {train_json} has {ids[:10]}...")
    return ids


def multi_hot(coco, cat_ids):
    """[n_images, n_classes] float multi-hot labels, images in sorted-id order, class c = cat_ids[c] (the sorted
    non-contiguous COCO ids -> 0..C-1); crowd annotations count, images without annotations are all-negative."""
    index = {c: i for i, c in enumerate(cat_ids)}
    img_ids = sorted(coco.imgs)
    labels = np.zeros((len(img_ids), len(cat_ids)), dtype=np.float32)
    for row, img_id in enumerate(img_ids):
        for ann in coco.imgToAnns.get(img_id, []):
            labels[row, index[ann["category_id"]]] = 1
    return labels


class Images(Dataset):
    """The images of a COCO file in sorted-id order, resized to size x size (no crop), ImageNet-normalised."""

    def __init__(self, coco, images_dir, size):
        self.paths = [os.path.join(images_dir, coco.imgs[i]["file_name"]) for i in sorted(coco.imgs)]
        self.tf = T.Compose([T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(),
                             T.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD)])

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return (self.tf(data.load_rgb(self.paths[i])),)


def file_id(path):
    st = os.stat(path)
    return [os.path.abspath(path), st.st_mtime_ns, st.st_size]


def features(model, backbone_id, split, coco, images_dir, json_path, size, args):
    """[n_images, 2, D] float32 (CLS token, mean patch token) of every image, read from the cache when the key
    (backbone file path+mtime+size or random-init config, img size, annotation file, image folder) matches."""
    key = json.dumps([backbone_id, size, file_id(json_path), os.path.abspath(images_dir)])
    path = os.path.join(args.cache, f"ml_{split}_{hashlib.sha1(key.encode()).hexdigest()[:16]}.pt")
    if os.path.isfile(path):
        cached = torch.load(path, map_location="cpu", weights_only=True)
        if cached.get("key") == key and len(cached["feats"]) == len(coco.imgs):
            print(f"{split}: cached features {path}")
            return cached["feats"]
    loader = DataLoader(Images(coco, images_dir, size), batch_size=args.batch_size, num_workers=args.workers,
                        pin_memory=args.device.startswith("cuda"))
    feats = vit.extract_features(model, loader, lambda t: torch.stack([vit.global_feature(t, "cls"),
                                                                       vit.global_feature(t, "gap")], 1),
                                 f"{split} features")
    os.makedirs(args.cache, exist_ok=True)
    torch.save({"key": key, "feats": feats}, path + ".tmp")
    os.replace(path + ".tmp", path)
    return feats


def select(feats, agg):
    return {"cls": feats[:, 0], "gap": feats[:, 1], "cls+gap": feats.flatten(1)}[agg]


# ----------------------------------------------------------------------------------------------------------------------
# Metrics (SPEC 1.10)

def mean_average_precision(scores, targets):
    """mAP in percent over [n_images, n_classes] scores and 0/1 targets. Per class, rank images by score; with
    precision P_k and recall R_k at the k-th distinct score threshold (tied scores form one threshold),
        AP_c = sum_k (R_k - R_{k-1}) * P_k        (no interpolation; = sklearn average_precision_score)
    and mAP = 100 * mean_c AP_c over the classes with at least one positive."""
    scores, targets = np.asarray(scores, dtype=np.float64), np.asarray(targets) > 0
    aps = []
    for c in range(scores.shape[1]):
        t = targets[:, c]
        if not t.any():
            continue
        order = np.argsort(-scores[:, c], kind="stable")
        s, t = scores[order, c], t[order]
        last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each run of tied scores
        tp = np.cumsum(t)[last]
        precision, recall = tp / (last + 1), tp / t.sum()
        aps.append(np.sum(np.diff(np.r_[0.0, recall]) * precision))
    return 100 * float(np.mean(aps)) if aps else float("nan")


def f1_scores(scores, targets, threshold=0.5):
    """The ML-GCN F1 metrics in percent from probabilities [n_images, n_classes] (sigmoid applied by the caller),
    predicted positive = score >= threshold; per class TP_c, FP_c, FN_c over the whole set, 0/0 := 0:
        CP = mean_c TP_c/(TP_c+FP_c)   CR = mean_c TP_c/(TP_c+FN_c)   CF1 = 2 CP CR / (CP+CR)     (per class)
        OP = sum TP / sum(TP+FP)       OR = sum TP / sum(TP+FN)       OF1 = 2 OP OR / (OP+OR)     (overall)"""
    pred, t = np.asarray(scores) >= threshold, np.asarray(targets) > 0
    tp, fp, fn = (pred & t).sum(0), (pred & ~t).sum(0), (~pred & t).sum(0)

    def div(a, b):
        return np.divide(a, b, out=np.zeros(np.shape(a), dtype=np.float64), where=np.asarray(b) > 0)

    cp, cr = div(tp, tp + fp).mean(), div(tp, tp + fn).mean()
    op, orr = div(tp.sum(), tp.sum() + fp.sum()), div(tp.sum(), tp.sum() + fn.sum())
    return {k: 100 * float(v) for k, v in dict(CP=cp, CR=cr, CF1=div(2 * cp * cr, cp + cr),
                                               OP=op, OR=orr, OF1=div(2 * op * orr, op + orr)).items()}


# ----------------------------------------------------------------------------------------------------------------------
# The linear head

def train_head(x, y, args):
    """Linear(D, C) on features standardised with the training mean/std (= BatchNorm1d(affine=False) at eval), trained
    full-batch (one AdamW step per epoch over all cached features; the problem is convex, so no mini-batch noise is
    needed) on BCE-with-logits, lr cosine-decayed to 0. Returns (mean, std, head)."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    x, y = ((x - mean) / std).to(args.device), y.to(args.device)
    head = nn.Linear(x.shape[1], y.shape[1]).to(args.device)
    opt = torch.optim.AdamW(head.parameters(), lr=args.lr, weight_decay=args.wd)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.epochs)
    bar = vit.Progress("head", args.epochs, unit="epoch")
    for _ in range(args.epochs):
        loss = nn.functional.binary_cross_entropy_with_logits(head(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.update(1, f"loss {loss.item():.4f}")
    return mean, std, head


def main(argv=None):
    args = parser.parse_args(argv)
    try:
        demo = not any([args.train_json, args.train_images, args.val_json, args.val_images])
        if not demo and not all([args.train_json, args.train_images, args.val_json, args.val_images]):
            raise ValueError("give all four of --train-json --train-images --val-json --val-images, or none for the "
                             "demo set")
        check_flags(args)
        if args.random_init and not args.model:
            args.model = "vit_demo" if demo else "vit_small"
        model, ckpt_args = vit.probe_backbone(args.ckpt, args.random_init, args.model, args.seed, args.device)
        size = args.img_size or ckpt_args.get("img_size") or model.config["img_size"]
        if size < model.patch_size or size % model.patch_size:
            raise ValueError(f"--img-size {size}: expected a multiple of the patch size {model.patch_size}")
        agg = args.agg or ckpt_args.get("agg") or "gap"
        if agg not in ("cls", "gap", "cls+gap"):
            raise ValueError(f"checkpoint {args.ckpt}: pretraining agg={agg!r}; pass --agg cls|gap|cls+gap")
        if demo:
            data.make_demo()
        train_json, train_dir, val_json, val_dir = DEMO if demo else (args.train_json, args.train_images,
                                                                      args.val_json, args.val_images)
        train, val = load_coco(train_json, train_dir), load_coco(val_json, val_dir)
        cat_ids = same_categories(train, val, train_json, val_json)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    names = [train.cats[c]["name"] for c in cat_ids]
    args.cache = args.cache or os.path.join(os.path.dirname(os.path.abspath(args.out)) if args.out
                                            else tempfile.gettempdir(), "probe_cache")
    backbone_id = (["random-init", args.model, args.seed] if args.random_init else file_id(args.ckpt) + [args.model])
    print(f"backbone {args.ckpt or 'random-init ' + args.model}, feature {agg}, {size}x{size} px, "
          f"{len(train.imgs)} train / {len(val.imgs)} val images, {len(cat_ids)} classes")
    x_train = select(features(model, backbone_id, "train", train, train_dir, train_json, size, args), agg)
    x_val = select(features(model, backbone_id, "val", val, val_dir, val_json, size, args), agg)
    y_train, y_val = torch.from_numpy(multi_hot(train, cat_ids)), multi_hot(val, cat_ids)
    if args.drop_empty:
        keep = y_train.sum(1) > 0
        x_train, y_train = x_train[keep], y_train[keep]
        keep = y_val.sum(1) > 0
        x_val, y_val = x_val[torch.from_numpy(keep)], y_val[keep]

    torch.manual_seed(args.seed)
    mean, std, head = train_head(x_train, y_train, args)
    with torch.no_grad():
        scores = torch.sigmoid(head(((x_val - mean) / std).to(args.device))).float().cpu().numpy()
    result = {"mAP": mean_average_precision(scores, y_val), **f1_scores(scores, y_val)}
    print("\n" + " ".join(f"{k:>6}" for k in result) + "\n" + " ".join(f"{v:6.2f}" for v in result.values()))
    if args.out:
        per_class = {n: mean_average_precision(scores[:, [c]], y_val[:, [c]]) if y_val[:, c].any() else None
                     for c, n in enumerate(names)}
        context = dict(backbone=args.ckpt or f"random-init {args.model} seed {args.seed}", agg=agg, img_size=size,
                       train=[train_json, train_dir], val=[val_json, val_dir], n_train=len(x_train),
                       n_val=len(x_val), epochs=args.epochs, lr=args.lr, wd=args.wd, batch_size=args.batch_size,
                       AP_per_class=per_class)
        with open(args.out, "w") as f:
            json.dump({**result, **context}, f, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
