"""
What the evaluation probes share (probe_multilabel.py, probe_segment.py, and pretrain.py's --probe-every): the
frozen backbone they evaluate, its features, the labelled COCO data they read, the multi-label metrics and
linear head, and the progress line of their long loops. The protocols are those of METHOD.md section 6.
"""
import json
import os
import sys
import time
from contextlib import redirect_stdout

import numpy as np
import torch
import torch.nn as nn
import torchvision.transforms as T
from torch.utils.data import Dataset

import data
import vit

# the demo set's COCO files (demo.py)
DEMO = ("data/demo/annotations/instances_train.json", "data/demo/images/train",
        "data/demo/annotations/instances_val.json", "data/demo/images/val")


# ------------------------------------------------------------------------------------------------------------
# the frozen backbone and its features

def add_probe_args(parser):
    """The flags both probes share: CKPT, --random-init, --model, --seed (for probe_backbone), --workers,
    --device."""
    parser.add_argument("ckpt", nargs="?", metavar="CKPT", help="our pretraining checkpoint, or a "
                        "timm-layout ViT state dict (timm / DINO weights)")
    parser.add_argument("--random-init", action="store_true",
                        help="evaluate a randomly initialised ViT instead of CKPT")
    parser.add_argument("--model", default=None, choices=sorted(vit.CONFIGS), help="config of --random-init "
                        "(default vit_demo on the demo set, else vit_small), or of a plain state dict whose "
                        "width does not tell its head count")
    parser.add_argument("--seed", type=int, default=0, help="seed of --random-init, of the head and "
                        "(segmentation) of the augmentations")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="image-decoding processes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (bf16 autocast of the backbone on CUDA)")


def add_coco_args(parser):
    """The COCO data flags of the multi-label and detection probes."""
    parser.add_argument("--train-json", help="COCO instances file of the training split (default: the demo set)")
    parser.add_argument("--train-images", help="folder of the training images")
    parser.add_argument("--val-json", help="COCO instances file of the evaluation split")
    parser.add_argument("--val-images", help="folder of the evaluation images")


def write_result(path, result, context):
    """A probe's metrics and the settings that made them, as one JSON object."""
    with open(path, "w") as f:
        json.dump({**result, **context}, f, indent=1)
    print(f"wrote {path}")


def probe_backbone(ckpt, random_init, name, seed, device):
    """The frozen backbone a probe evaluates -> (model in eval mode, pretraining args or {}).
    CKPT goes through vit.load_backbone (weights_only=True, layout checks); --random-init builds CONFIGS[name]
    with timm's init under torch.manual_seed(seed) (the 'no pretraining' baseline)."""
    if random_init and ckpt:
        raise ValueError(f"give either CKPT ({ckpt}) or --random-init, not both")
    if not random_init and not ckpt:
        raise ValueError("no backbone: give CKPT (a checkpoint file) or --random-init")
    if not random_init:
        return vit.load_backbone(ckpt, device, name)
    torch.manual_seed(seed)
    return vit.create_vit(name).to(device).eval(), {}


def frozen_tokens(model, images):
    """Final-LN tokens [B, 1+T, D] in float32 of the frozen backbone for a batch of normalised images [B, 3,
    H, W]: no grad, bf16 autocast on CUDA."""
    device = next(model.parameters()).device
    images = images.to(device, non_blocking=True)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        return model.forward_features(images).float()


def extract_features(model, loader, fn, what="features", quiet=False):
    """Run the frozen backbone once over `loader` (batches (images, ok) of Images) and keep fn(tokens) of
    every image on the CPU, concatenated in loader order (with a progress line unless quiet). Returns
    (features [n, ...], ok [n] bool): ok is False for a file that could not be read, whose row holds the
    features of a blank image; callers drop those rows (see readable)."""
    out, oks, bar = [], [], None if quiet else Progress(what, len(loader.dataset))
    for images, ok in loader:
        out.append(fn(frozen_tokens(model, images)).cpu())
        oks.append(torch.as_tensor(ok, dtype=torch.bool))
        if bar:
            bar.update(len(images))
    return torch.cat(out), torch.cat(oks)


def readable(ok, paths, what):
    """The files of `paths` that Images could not read (ok False), named on stderr in one line: a probe
    skips them and goes on instead of stopping on one bad file."""
    bad = [p for p, good in zip(paths, ok.tolist()) if not good]
    if bad:
        print(f"{what}: skipped {len(bad)} of {len(paths)} images that could not be read, e.g. {bad[:3]}",
              file=sys.stderr)
    return bad


class Progress:
    """One status line on stderr for a long loop: `what done/total unit, rate/s, ETA m:ss [info]`. On a
    terminal it rewrites itself with \\r; in a log (not a TTY) it prints a line at each further 10% of the
    total (at most one in 5 s) or after 30 s without one, and always at the end."""

    def __init__(self, what, total, unit="img"):
        self.what, self.total, self.unit = what, max(1, total), unit
        self.done, self.t0, self.last, self.next_pct = 0, time.time(), time.time(), 10
        self.tty = sys.stderr.isatty()

    def update(self, n=1, info=""):
        self.done += n
        now = time.time()
        pct = 100 * self.done / self.total
        quiet = now - self.last
        due = quiet > 0.2 if self.tty else (pct >= self.next_pct and quiet > 5) or quiet > 30
        if self.done < self.total and not due:
            return
        self.last = now
        while self.next_pct <= pct:
            self.next_pct += 10
        rate = self.done / max(now - self.t0, 1e-9)
        eta = (self.total - self.done) / max(rate, 1e-9)
        line = (f"{self.what} {self.done}/{self.total} {self.unit} {rate:.1f} {self.unit}/s "
                f"ETA {int(eta) // 60}:{int(eta) % 60:02d} {info}")
        end = "\n" if self.done >= self.total or not self.tty else ""
        print(("\r" if self.tty else "") + line.rstrip(), end=end, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------------------
# COCO files, multi-hot labels, images

def check_flags(args, counts=("epochs", "batch_size")):
    """The checks of the flags the probes share (the positive integers `counts`, by default --epochs and
    --batch-size, then --device, --workers, --out)."""
    for flag in counts:
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
    if args.out and (os.path.isdir(args.out)
                     or not os.path.isdir(os.path.dirname(os.path.abspath(args.out)))):
        raise ValueError(f"--out {args.out}: expected a file path in an existing folder")


def check_output_path(path, flag, folder=False):
    """Refuse an output flag whose target cannot be written: a file path must lie in an existing folder and not
    be a folder; with folder=True the path must be a folder (made if missing) inside an existing one."""
    if path is None:
        return
    parent_ok = os.path.isdir(os.path.dirname(os.path.abspath(path)))
    if not parent_ok or (os.path.isdir(path) != folder and os.path.exists(path)):
        raise ValueError(f"{flag} {path}: expected a {'folder (made if missing)' if folder else 'file path'} "
                         f"in an existing folder")


def require_files(paths, what):
    """Raise a ValueError naming how many of `paths` are missing and the first few."""
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise ValueError(f"{what}: {len(missing)} of {len(paths)} files missing, e.g. {missing[:3]}")


def load_coco(json_path, images_dir, check_images=True):
    """A pycocotools COCO index of `json_path` after checking that it is COCO instances JSON and (unless
    check_images=False: the caller skips missing files) that every image it names is in `images_dir`; images
    sorted by id (a fixed order for features and labels)."""
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
        bad = [a["id"] for a in d["annotations"] if a["category_id"] not in coco.cats
               or a["image_id"] not in coco.imgs]
        paths = image_paths(coco, images_dir)
    except (KeyError, TypeError) as e:
        raise ValueError(f"annotation file {json_path}: not COCO instances format (an entry "
                         f"without {e})") from None
    if bad:
        raise ValueError(f"annotation file {json_path}: {len(bad)} annotations name an unknown image or "
                         f"category, e.g. ids {bad[:3]}")
    if check_images:
        require_files(paths, f"images of {json_path} in {images_dir}")
    return coco


def image_paths(coco, images_dir):
    """The file of every image of a COCO index, in sorted-id order (the order of features and labels)."""
    return [os.path.join(images_dir, coco.imgs[i]["file_name"]) for i in sorted(coco.imgs)]


def same_categories(train, val, train_json, val_json):
    """The sorted category ids shared by both files (a head trained on one set of classes is scored on the
    same)."""
    ids = sorted(train.cats)
    if ids != sorted(val.cats):
        raise ValueError(f"{val_json} has category ids {sorted(val.cats)[:10]}..., {train_json} "
                         f"has {ids[:10]}...")
    return ids


def coco_mask(coco, img_id, cat_index):
    """[H, W] uint8 semantic mask of one COCO image: 0 background, cat_index[category_id] for each instance,
    255 for crowd regions; instances are drawn in descending area so smaller objects are painted last and stay
    visible. (probe_segment.py's COCO labels, and the oracle's class masks of a COCO --data: methods.py)"""
    info = coco.imgs[img_id]
    mask = np.zeros((info["height"], info["width"]), dtype=np.uint8)
    for ann in sorted(coco.imgToAnns.get(img_id, []), key=lambda a: -a["area"]):
        mask[coco.annToMask(ann) > 0] = 255 if ann.get("iscrowd") else cat_index[ann["category_id"]]
    return mask


def multi_hot(coco, cat_ids):
    """[n_images, n_classes] float multi-hot labels, images in sorted-id order, class c = cat_ids[c] (the
    sorted non-contiguous COCO ids -> 0..C-1); crowd annotations count, images without annotations are
    all-negative."""
    index = {c: i for i, c in enumerate(cat_ids)}
    img_ids = sorted(coco.imgs)
    labels = np.zeros((len(img_ids), len(cat_ids)), dtype=np.float32)
    for row, img_id in enumerate(img_ids):
        for ann in coco.imgToAnns.get(img_id, []):
            labels[row, index[ann["category_id"]]] = 1
    return labels


class Images(Dataset):
    """Image files resized to size x size (no crop), ImageNet-normalised; items are (image, True), or (a
    blank image, False) for a file that cannot be read (missing, truncated, not an image, larger than PIL's
    limit): one bad file is skipped and counted by the caller, never the end of a run."""

    def __init__(self, paths, size):
        self.paths, self.size = list(paths), size
        self.tf = T.Compose([T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(),
                             T.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD)])

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return self.tf(data.load_rgb(self.paths[i])), True
        except Exception:  # any decode failure
            return torch.zeros(3, self.size, self.size), False


# ------------------------------------------------------------------------------------------------------------
# multi-label metrics (METHOD.md 6.1) and the linear head

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
    """The ML-GCN F1 metrics in percent from probabilities [n_images, n_classes] (sigmoid applied by the
    caller), predicted positive = score >= threshold; per class TP_c, FP_c, FN_c over the whole set, 0/0 := 0:
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


def train_linear_head(x, y, steps, lr, wd, device, quiet=False):
    """Linear(D, C) on features standardised with the training mean/std (= BatchNorm1d(affine=False) at eval),
    trained full-batch (one AdamW step per epoch over all cached features; the problem is convex, so no
    mini-batch noise is needed) on BCE-with-logits, lr cosine-decayed to 0 over `steps`. Returns (mean, std,
    head)."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    x, y = ((x - mean) / std).to(device), y.to(device)
    head = nn.Linear(x.shape[1], y.shape[1]).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=wd)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    bar = None if quiet else Progress("head", steps, unit="epoch")
    for _ in range(steps):
        loss = nn.functional.binary_cross_entropy_with_logits(head(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if bar:
            bar.update(1, f"loss {loss.item():.4f}")
    return mean, std, head


class OnlineProbe:
    """pretrain.py's --probe-every: a frozen-feature multi-label linear probe on n images of a labelled COCO
    file, fixed at the start (a subset drawn from its own generator seeded with `seed`): the first half of the
    subset trains the head, the second half is held out for the mAP. Each call: `agg` features of the subset
    (no grad), `steps` full-batch AdamW steps of the head (under a forked RNG: the caller's random state is
    untouched), mAP."""

    def __init__(self, json_path, image_root, n_images, img_size, agg, seed, workers, steps=300):
        image_root = image_root or data.coco_image_root(json_path)
        coco = load_coco(json_path, image_root)
        ids = sorted(coco.imgs)
        pick = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))[:n_images].tolist()
        if len(pick) < 4:
            raise ValueError(f"--probe-json {json_path}: {len(ids)} images, the online probe "
                             f"needs at least 4")
        labels = torch.from_numpy(multi_hot(coco, sorted(coco.cats)))[pick]
        self.n_train = len(pick) // 2
        self.train_labels, self.heldout_labels = labels[:self.n_train], labels[self.n_train:].numpy()
        paths = [os.path.join(image_root, coco.imgs[ids[i]]["file_name"]) for i in pick]
        self.images = Images(paths, img_size)
        self.agg, self.seed, self.workers, self.steps = agg, seed, workers, steps

    def __call__(self, backbone, device):
        t0 = time.time()
        with torch.random.fork_rng(devices=[]):  # the loader and the head draw from the global generator
            loader = torch.utils.data.DataLoader(self.images, batch_size=64, num_workers=self.workers)
            feats, ok = extract_features(backbone, loader, lambda t: vit.global_feature(t, self.agg), quiet=True)
            train, held = ok[:self.n_train], ok[self.n_train:]  # unreadable files are left out of both halves
            readable(ok, self.images.paths, "online probe")
            mAP = float("nan")
            if train.any() and held.any():
                torch.manual_seed(self.seed)
                mean, std, head = train_linear_head(feats[:self.n_train][train], self.train_labels[train],
                                                    self.steps, 1e-2, 1e-4, device, quiet=True)
                with torch.no_grad():
                    logits = head(((feats[self.n_train:][held] - mean) / std).to(device))
                    scores = torch.sigmoid(logits).float().cpu().numpy()
                mAP = mean_average_precision(scores, self.heldout_labels[held.numpy()])
        return {"probe_mAP": round(mAP, 4), "n_train": int(train.sum()), "n_heldout": int(held.sum()),
                "probe_s": round(time.time() - t0, 2)}
