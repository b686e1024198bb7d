"""
COCO multi-label classification probe (METHOD.md 6.1): a linear head on the frozen global feature of a ViT.

    python probe_multilabel.py ckpt.pt                      # the demo set (data/demo, made if absent)
    python probe_multilabel.py ckpt.pt --train-json annotations/instances_train2017.json \\
        --train-images train2017 --val-json annotations/instances_val2017.json --val-images val2017 \\
        --out ml.json
    python probe_multilabel.py --random-init                # the no-pretraining baseline

The backbone features are extracted once (eval resize to img_size x img_size, no crop, so all objects stay in
view) and cached, so a second run with other head settings skips the backbone (instead of a train-time
RandomResizedCrop augmentation of the probe: one pass over the data instead of one per epoch).
"""
import argparse
import hashlib
import json
import os
import sys
import tempfile

import torch
from torch.utils.data import DataLoader

import demo as demo_set
import probing
import vit


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    probing.add_probe_args(parser)
    probing.add_coco_args(parser)
    add = parser.add_argument
    add("--drop-empty", action="store_true", help="drop images without annotations (default: keep them as "
        "all-negative examples)")
    add("--agg", choices=["cls", "gap", "cls+gap"], default=None, help="global feature: CLS token, mean of "
        "the patch tokens, or both concatenated (default: the checkpoint's pretraining --agg, else gap)")
    add("--img-size", type=int, default=None, help="input size (default: the pretraining img_size)")
    add("--epochs", type=int, default=1000, help="full-batch AdamW steps of the linear head on the cached "
        "features (cheap: no backbone)")
    add("--lr", type=float, default=1e-2, help="AdamW learning rate of the head (cosine-decayed to 0)")
    add("--wd", type=float, default=1e-4, help="AdamW weight decay of the head")
    add("--batch-size", type=int, default=256, help="images per batch of the feature extraction")
    add("--cache", default=None,
        help="feature cache folder (default: probe_cache/ next to --out, else in the system temp dir)")
    add("--out", default=None, help="write the metrics to this JSON file")
    return parser


# ------------------------------------------------------------------------------------------------------------
# cached features of the frozen backbone

def file_id(path):
    st = os.stat(path)
    return [os.path.abspath(path), st.st_mtime_ns, st.st_size]


def features(model, backbone_id, split, coco, images_dir, json_path, size, args):
    """([n_images, 2, D] float32 (CLS token, mean patch token), ok [n_images] bool: False for a file that could
    not be read) of every image, read from the cache when the key (backbone file path+mtime+size or random-init
    config, img size, annotation file, image folder) matches."""
    key = json.dumps([backbone_id, size, file_id(json_path), os.path.abspath(images_dir)])
    path = os.path.join(args.cache, f"ml_{split}_{hashlib.sha1(key.encode()).hexdigest()[:16]}.pt")
    if os.path.isfile(path):
        cached = torch.load(path, map_location="cpu", weights_only=True)
        if cached.get("key") == key and len(cached["feats"]) == len(coco.imgs) and "ok" in cached:
            print(f"{split}: cached features {path}")
            return cached["feats"], cached["ok"]
    loader = DataLoader(probing.Images(probing.image_paths(coco, images_dir), size), batch_size=args.batch_size,
                        num_workers=args.workers, pin_memory=args.device.startswith("cuda"))
    # noqa: E731
    both = lambda t: torch.stack([vit.global_feature(t, "cls"), vit.global_feature(t, "gap")], 1)
    feats, ok = probing.extract_features(model, loader, both, f"{split} features")
    os.makedirs(args.cache, exist_ok=True)
    torch.save({"key": key, "feats": feats, "ok": ok}, path + ".tmp")
    os.replace(path + ".tmp", path)
    return feats, ok


def select(feats, agg):
    return {"cls": feats[:, 0], "gap": feats[:, 1], "cls+gap": feats.flatten(1)}[agg]


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    try:
        demo = not any([args.train_json, args.train_images, args.val_json, args.val_images])
        if not demo and not all([args.train_json, args.train_images, args.val_json, args.val_images]):
            raise ValueError("give all four of --train-json --train-images --val-json --val-images, or none "
                             "for the demo set")
        probing.check_flags(args)
        if args.random_init and not args.model:
            args.model = "vit_demo" if demo else "vit_small"
        model, ckpt_args = probing.probe_backbone(args.ckpt, args.random_init, args.model,
                                                  args.seed, args.device)
        size = args.img_size or ckpt_args.get("img_size") or model.config["img_size"]
        if size < model.patch_size or size % model.patch_size:
            raise ValueError(f"--img-size {size}: expected a multiple of the patch size {model.patch_size}")
        agg = args.agg or ckpt_args.get("agg") or "gap"
        if agg not in ("cls", "gap", "cls+gap"):
            raise ValueError(f"checkpoint {args.ckpt}: pretraining agg={agg!r}; pass --agg cls|gap|cls+gap")
        if demo:
            demo_set.make_demo()
        train_json, train_dir, val_json, val_dir = probing.DEMO if demo else (
            args.train_json, args.train_images, args.val_json, args.val_images)
        train, val = probing.load_coco(train_json, train_dir), probing.load_coco(val_json, val_dir)
        cat_ids = probing.same_categories(train, val, train_json, val_json)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    names = [train.cats[c]["name"] for c in cat_ids]
    args.cache = args.cache or os.path.join(os.path.dirname(os.path.abspath(args.out)) if args.out
                                            else tempfile.gettempdir(), "probe_cache")
    backbone_id = (["random-init", args.model, args.seed] if args.random_init
                   else file_id(args.ckpt) + [args.model])
    print(f"backbone {args.ckpt or 'random-init ' + args.model}, feature {agg}, {size}x{size} px, "
          f"{len(train.imgs)} train / {len(val.imgs)} val images, {len(cat_ids)} classes")
    x, y, skipped = {}, {}, []
    for split, coco, folder, json_path in (("train", train, train_dir, train_json),
                                           ("val", val, val_dir, val_json)):
        feats, ok = features(model, backbone_id, split, coco, folder, json_path, size, args)
        skipped += probing.readable(ok, probing.image_paths(coco, folder), split)
        labels = torch.from_numpy(probing.multi_hot(coco, cat_ids))
        keep = ok & (labels.sum(1) > 0) if args.drop_empty else ok  # unreadable images are left out
        x[split], y[split] = select(feats, agg)[keep], labels[keep]
    if not len(y["train"]) or not len(y["val"]):
        print(f"error: no readable image with labels in the {'train' if not len(y['train']) else 'val'} split",
              file=sys.stderr)
        return 2
    x_train, y_train, x_val, y_val = x["train"], y["train"], x["val"], y["val"].numpy()

    torch.manual_seed(args.seed)
    mean, std, head = probing.train_linear_head(x_train, y_train, args.epochs, args.lr, args.wd, args.device)
    with torch.no_grad():
        scores = torch.sigmoid(head(((x_val - mean) / std).to(args.device))).float().cpu().numpy()
    result = {"mAP": probing.mean_average_precision(scores, y_val), **probing.f1_scores(scores, y_val)}
    print("\n" + " ".join(f"{k:>6}" for k in result) + "\n" + " ".join(f"{v:6.2f}" for v in result.values()))
    if args.out:
        per_class = {n: probing.mean_average_precision(scores[:, [c]], y_val[:, [c]]) if y_val[:, c].any()
                     else None for c, n in enumerate(names)}
        context = dict(backbone=args.ckpt or f"random-init {args.model} seed {args.seed}",
                       agg=agg, img_size=size,
                       train=[train_json, train_dir], val=[val_json, val_dir], n_train=len(x_train),
                       n_val=len(x_val), skipped=skipped, epochs=args.epochs, lr=args.lr,
                       wd=args.wd, batch_size=args.batch_size, AP_per_class=per_class)
        probing.write_result(args.out, result, context)
    return 0


if __name__ == "__main__":
    sys.exit(main())
