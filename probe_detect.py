"""
Detection transfer (METHOD.md 14): the ViT as the backbone of torchvision's Mask R-CNN (Faster R-CNN with
--no-masks, on VOC and on the demo) through ViTDet's simple feature pyramid, scored by pycocotools' COCOeval.

    python probe_detect.py ckpt.pt                             # the demo set, frozen backbone (CPU minutes)
    python probe_detect.py ckpt.pt --finetune                  # the whole network, layer-wise lr decay
    python probe_detect.py ckpt.pt --finetune --train-json coco/annotations/instances_train2017.json \\
        --train-images coco/train2017 --val-json coco/annotations/instances_val2017.json \\
        --val-images coco/val2017 --out det.json                # COCO, Mask R-CNN 1x
    python probe_detect.py ckpt.pt --finetune --voc-root VOCdevkit/VOC2007 --voc-root VOCdevkit/VOC2012 \\
        --out det.json                                          # VOC07+12 trainval -> VOC07 test
    python probe_detect.py --random-init                       # the no-pretraining baseline

Two protocols, reported separately: the default trains the pyramid, RPN and RoI heads on the frozen backbone;
--finetune trains everything. Flags left unset take the defaults of the data set's protocol (PROTOCOLS, the
sources in METHOD.md 14). VOC: Annotations/<id>.xml, JPEGImages/<id>.jpg, ImageSets/Main/<split>.txt; boxes
only; 'difficult' objects are trained on and ignored at evaluation. Scores: COCO-style AP, AP50, AP75 of the
boxes (and masks), on VOC too (as DenseCL reports VOC). Unreadable images, boxes outside the image and crowd
regions are skipped, clipped or ignored and counted, never fatal.
"""
import argparse
import json
import os
import sys
import time
from collections import OrderedDict
from contextlib import redirect_stdout

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import ImageDraw
from torch.utils.data import DataLoader
from torchvision.models.convnext import LayerNorm2d
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import MultiScaleRoIAlign

import data
import demo as demo_set
import detect_data
import probe_segment
import probing

# defaults of the flags left unset, per data set (METHOD.md 14): training short sides (one drawn per batch),
# test short side, longest side, iterations, lr x0.1 at these fractions of them, warm-up iterations, batch,
# RoIs sampled per image for the box head, width of the pyramid and heads, Mask R-CNN or Faster R-CNN, AdamW
PROTOCOLS = {
    "coco": dict(img_size=list(range(640, 801, 32)), test_size=800, max_size=1333, iters=90000,
                 lr_steps=[2 / 3, 8 / 9], warmup=250, batch_size=16, rois=512, channels=256, masks=True,
                 lr=5e-5, wd=0.05),
    "voc": dict(img_size=list(range(480, 801, 32)), test_size=800, max_size=1333, iters=24000,
                lr_steps=[0.75, 11 / 12], warmup=100, batch_size=16, rois=512, channels=256, masks=False,
                lr=5e-5, wd=0.05),
    "demo": dict(img_size=[96], test_size=96, max_size=96, iters=300, lr_steps=[2 / 3, 8 / 9], warmup=20,
                 batch_size=8, rois=128, channels=64, masks=False, lr=1e-4, wd=0.05),
}
N_VIS = 8


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    probing.add_probe_args(parser)
    probing.add_coco_args(parser)
    add = parser.add_argument
    add("--voc-root", action="append", default=[], metavar="ROOT", help="VOC folder (Annotations/, "
        "JPEGImages/, ImageSets/Main/) to train on; repeat it to join several (VOC2007 + VOC2012)")
    add("--voc-train-split", default="trainval", help="VOC: training list in ImageSets/Main/ of every root")
    add("--voc-test-root", default=None, help="VOC folder of the evaluation split (default: the first "
        "--voc-root)")
    add("--voc-test-split", default="test", help="VOC: evaluation list in ImageSets/Main/")
    add("--finetune", action="store_true", help="train the whole network (default: the backbone frozen, "
        "the pyramid, RPN and RoI heads trained)")
    add("--masks", action=argparse.BooleanOptionalAction, default=None, help="Mask R-CNN (--masks) or "
        "Faster R-CNN (--no-masks, boxes only); default: masks on COCO files, boxes on VOC and on the demo "
        "(3x faster on the CPU)")
    add("--img-size", type=int, nargs="+", default=None, help="training short sides, one drawn per batch "
        "(default: the protocol's, e.g. 640 672 ... 800 on COCO)")
    add("--test-size", type=int, default=None, help="evaluation short side (default: 800, demo 96)")
    add("--max-size", type=int, default=None, help="cap of the longest side (default: 1333, demo 96)")
    add("--iters", type=int, default=None, help="training iterations (default: COCO 90000 = 1x, VOC 24000, "
        "demo 300)")
    add("--lr-steps", type=float, nargs="+", default=None, help="fractions of --iters where the lr is "
        "multiplied by 0.1 (default: COCO 2/3 8/9, VOC 0.75 11/12)")
    add("--warmup", type=int, default=None, help="iterations of linear lr warm-up from 0.001x (default: "
        "COCO 250, VOC 100, demo 20)")
    add("--batch-size", type=int, default=None, help="images per iteration (default 16, demo 8)")
    add("--rois", type=int, default=None, help="RoIs sampled per image for the box head (default 512, "
        "demo 128)")
    add("--channels", type=int, default=None, help="width of the pyramid levels, RPN and mask head; box "
        "head 4x (default 256 as ViTDet and torchvision, demo 64)")
    add("--lr", type=float, default=None, help="AdamW peak learning rate (default 5e-5, demo 1e-4)")
    add("--wd", type=float, default=None, help="AdamW weight decay, none on norms, biases, CLS token and "
        "position embedding (default 0.05)")
    add("--layer-decay", type=float, default=None, help="--finetune: lr x decay^(depth+1-layer) per "
        "backbone layer (default 0.8)")
    add("--out", default=None, help="write box (and mask) AP, AP50, AP75 and the run's settings to this JSON")
    add("--save-detections", default=None, metavar="FILE", help="write the validation detections in the "
        "COCO results format (re-score with pycocotools)")
    add("--vis", default=None, metavar="DIR", help="draw truth (green) and detections with score >= 0.5 "
        "(red) on the first 8 val images into DIR (det_000.png, ...)")
    return parser


# ------------------------------------------------------------------------------------------------------------
# the backbone: ViT + simple feature pyramid (ViTDet)

class SimplePyramid(nn.Module):
    """ViTDet's simple feature pyramid on the final-LN patch-token map of `vit` (stride p = its patch size):
    scale 4x = ConvTranspose(2, 2) -> LN -> GELU -> ConvTranspose(2, 2), 2x = ConvTranspose(2, 2), 1x = the
    map, 1/2 = MaxPool(2); each then 1x1 conv + LN, 3x3 conv + LN to `channels`; 'pool' = P6, a stride-2
    subsampling of the last level. Levels '0', '1', '2', '3', 'pool' at strides p/4, p/2, p, 2p, 4p. The
    position embedding is interpolated to every padded input's token grid by the ViT (vit.tokens_in).
    frozen: the ViT's parameters do not require gradients, so autograd records nothing in it and no optimiser
    sees them."""

    def __init__(self, vit, frozen, channels=256):
        super().__init__()
        D, p = vit.embed_dim, vit.patch_size
        if p % 4:
            raise ValueError(f"patch size {p}: the pyramid's 4x level needs a multiple of 4")
        self.body, self.out_channels = vit, channels
        self.strides = [p // 4, p // 2, p, 2 * p, 4 * p]
        self.scales = nn.ModuleList([
            nn.Sequential(nn.ConvTranspose2d(D, D // 2, 2, 2), LayerNorm2d(D // 2, eps=1e-6), nn.GELU(),
                          nn.ConvTranspose2d(D // 2, D // 4, 2, 2)),
            nn.ConvTranspose2d(D, D // 2, 2, 2), nn.Identity(), nn.MaxPool2d(2)])
        self.convs = nn.ModuleList([
            nn.Sequential(nn.Conv2d(d, channels, 1, bias=False), LayerNorm2d(channels, eps=1e-6),
                          nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                          LayerNorm2d(channels, eps=1e-6))
            for d in (D // 4, D // 2, D, D)])
        if frozen:
            vit.requires_grad_(False)

    def forward(self, x):
        p = self.body.patch_size
        fmap = probe_segment.token_map(self.body.forward_features(x), x.shape[2] // p, x.shape[3] // p)
        levels = [conv(scale(fmap)) for scale, conv in zip(self.scales, self.convs)]
        out = OrderedDict((str(i), level) for i, level in enumerate(levels))
        out["pool"] = F.max_pool2d(levels[-1], 1, 2)
        return out


def build_detector(vit, n_classes, masks, args):
    """Mask R-CNN (or Faster R-CNN) of torchvision on SimplePyramid(vit) with its heads at width C =
    args.channels (C = 256: torchvision's defaults): RPN head, box head 2 fc of 4C on 7x7 RoIs, mask head 4
    convs of C on 14x14 RoIs. One anchor size a level, 8 x its stride, ratios 0.5, 1, 2; inputs
    ImageNet-normalised and zero-padded to a multiple of 4 patches (so that P5 and P6 have exact strides)."""
    C, levels = args.channels, ["0", "1", "2", "3"]
    pyramid = SimplePyramid(vit, not args.finetune, C)
    kw = dict(min_size=tuple(args.img_size), max_size=args.max_size,
              image_mean=data.IMAGENET_MEAN, image_std=data.IMAGENET_STD, size_divisible=4 * vit.patch_size,
              rpn_anchor_generator=AnchorGenerator(tuple((8 * s,) for s in pyramid.strides),
                                                   ((0.5, 1.0, 2.0),) * len(pyramid.strides)),
              box_roi_pool=MultiScaleRoIAlign(levels, 7, 2), box_batch_size_per_image=args.rois,
              box_head=TwoMLPHead(C * 7 * 7, 4 * C), box_predictor=FastRCNNPredictor(4 * C, n_classes + 1))
    if masks:
        return MaskRCNN(pyramid, mask_roi_pool=MultiScaleRoIAlign(levels, 14, 2),
                        mask_head=MaskRCNNHeads(C, [C] * 4, 1),
                        mask_predictor=MaskRCNNPredictor(C, C, n_classes + 1), **kw)
    return FasterRCNN(pyramid, **kw)


def param_groups(model, wd, layer_decay, depth):
    """AdamW groups with layer-wise lr decay (ViTDet, BEiT): lr scale layer_decay^(depth + 1 - layer), layer 0
    = patch embedding, CLS token and position embedding, i = block i-1, depth + 1 = the final norm, pyramid
    and heads; no weight decay on 1-d tensors (norms, biases), the CLS token and the position embedding.
    Frozen parameters are left out."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        sub = name[len("backbone.body."):] if name.startswith("backbone.body.") else None
        layer = depth + 1
        if sub is not None and sub.startswith(("patch_embed.", "cls_token", "pos_embed")):
            layer = 0
        elif sub is not None and sub.startswith("blocks."):
            layer = int(sub.split(".")[1]) + 1
        no_wd = p.ndim <= 1 or name.endswith(("cls_token", "pos_embed"))
        group = groups.setdefault((layer, no_wd), {"params": [], "weight_decay": 0.0 if no_wd else wd,
                                                   "lr_scale": layer_decay ** (depth + 1 - layer)})
        group["params"].append(p)
    return list(groups.values())


def lr_factor(it, warmup, steps):
    """Step schedule with linear warm-up (detectron2's): 0.001 -> 1 over `warmup` iterations, then x0.1 at
    each iteration of `steps` passed."""
    warm = 1.0 if it >= warmup else 0.001 + 0.999 * it / warmup
    return warm * 0.1 ** sum(it >= s for s in steps)


# ------------------------------------------------------------------------------------------------------------
# training, evaluation, scores, pictures

def optimizer(model, args):
    """AdamW over param_groups (layer decay args.layer_decay, 1 when unset), at args.lr before the schedule."""
    depth = len(model.backbone.body.blocks)
    return torch.optim.AdamW(param_groups(model, args.wd, args.layer_decay or 1.0, depth), lr=args.lr)


def train_step(model, opt, images, targets, dev):
    """One iteration: the detector's summed losses (bf16 autocast on CUDA), backward and an AdamW step, skipped
    when the loss is not finite. Returns the loss."""
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
        losses = model(images, targets)
    loss = sum(losses.values())
    if torch.isfinite(loss):
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return loss


def train(model, dataset, args, bad):
    """args.iters AdamW steps over shuffled batches (reshuffled at each pass; the order and the workers' flip
    seeds drawn from a generator seeded with args.seed; the training size of each batch from torchvision's
    transform, on the torch RNG seeded by main), lr of each group = args.lr * its lr_scale * lr_factor; bf16
    autocast on CUDA. Unreadable images join `bad` and leave their
    batch smaller; a step with a non-finite loss is skipped and counted. Returns the skipped-step count."""
    opt = optimizer(model, args)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                        collate_fn=list, drop_last=len(dataset) >= args.batch_size,
                        persistent_workers=args.workers > 0,
                        generator=torch.Generator().manual_seed(args.seed))
    steps = [round(f * args.iters) for f in args.lr_steps]
    bar, it, skipped = probing.Progress("training", args.iters, unit="it"), 0, 0
    dev = torch.device(args.device)
    model.train()
    while it < args.iters:
        for batch in loader:
            bad.update(dataset.recs[i]["path"] for i, x, _ in batch if x is None)
            batch = [(x.to(dev), {k: v.to(dev) for k, v in t.items()}) for _, x, t in batch if x is not None]
            for g in opt.param_groups:
                g["lr"] = args.lr * g["lr_scale"] * lr_factor(it, args.warmup, steps)
            if batch:
                loss = train_step(model, opt, [x for x, _ in batch], [t for _, t in batch], dev)
                skipped += not torch.isfinite(loss)
            it += 1
            bar.update(1, f"loss {loss.item():.3f}" if batch else "")
            if it == args.iters:
                break
    return skipped


def detect(model, dataset, cat_ids, names, masks, args, bad):
    """Detections of every readable val image in the COCO results format ({image_id, category_id (the data
    set's own ids), bbox [x, y, w, h], score, segmentation (RLE, masks > 0.5) with masks}) and the ids of the
    images evaluated; writes the --vis pictures of the first N_VIS."""
    from pycocotools import mask as mask_utils
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers, collate_fn=list)
    results, done, bar, dev = [], [], probing.Progress("evaluating", len(dataset)), torch.device(args.device)
    model.eval()
    model.transform.min_size = (args.test_size,)
    for batch in loader:
        bar.update(len(batch))
        bad.update(dataset.recs[i]["path"] for i, x, _ in batch if x is None)
        batch = [(i, x) for i, x, _ in batch if x is not None]
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            outs = model([x.to(dev) for _, x in batch]) if batch else []
        for (i, x), out in zip(batch, outs):
            rec, out = dataset.recs[i], {k: v.float().cpu() if v.is_floating_point() else v.cpu()
                                         for k, v in out.items()}
            done.append(rec["id"])
            for k, (box, label, score) in enumerate(zip(out["boxes"].tolist(), out["labels"].tolist(),
                                                        out["scores"].tolist())):
                res = dict(image_id=rec["id"], category_id=cat_ids[label - 1], score=round(score, 5),
                           bbox=[round(box[0], 2), round(box[1], 2), round(box[2] - box[0], 2),
                                 round(box[3] - box[1], 2)])
                if masks:
                    rle = mask_utils.encode(np.asfortranarray((out["masks"][k, 0] > 0.5).numpy(), np.uint8))
                    res["segmentation"] = dict(size=rle["size"], counts=rle["counts"].decode("ascii"))
                results.append(res)
            if args.vis and len(done) <= N_VIS:
                save_vis(os.path.join(args.vis, f"det_{len(done) - 1:03d}.png"), x, out,
                         dataset.coco.imgToAnns.get(rec["id"], []), names)
    return results, done


def coco_scores(gt, results, img_ids, iou_type):
    """{AP, AP50, AP75} in percent of `results` against the pycocotools index `gt` on the images `img_ids`:
    COCOeval's stats[0:3] (AP averaged over IoU 0.50:0.05:0.95, at 0.5, at 0.75; 101-point interpolated
    precision; crowd truths ignored). No detections at all scores 0 (loadRes refuses an empty list)."""
    from pycocotools.cocoeval import COCOeval
    if not results:
        return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    with open(os.devnull, "w") as null, redirect_stdout(null):
        evaluator = COCOeval(gt, gt.loadRes(results), iou_type)
        evaluator.params.imgIds = sorted(img_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {k: 100 * max(0.0, float(v)) for k, v in zip(("AP", "AP50", "AP75"), evaluator.stats[:3])}


def save_vis(path, x, out, anns, names):
    """The image (scaled to at least 160 px high) with the truth boxes in green (crowd / difficult in grey)
    and the detections with score >= 0.5 in red, labelled with class name and score."""
    img = TF.to_pil_image(x.cpu())
    k = max(1, -(-160 // img.size[1]))
    img = img.resize((img.size[0] * k, img.size[1] * k))
    draw = ImageDraw.Draw(img)
    for a in anns:
        bx, by, bw, bh = a["bbox"]
        draw.rectangle([k * bx, k * by, k * (bx + bw), k * (by + bh)], outline="grey" if a.get("iscrowd")
                       else "lime")
    for box, label, score in zip(out["boxes"].tolist(), out["labels"].tolist(), out["scores"].tolist()):
        if score >= 0.5:
            draw.rectangle([k * v for v in box], outline="red", width=2)
            draw.text((k * box[0] + 2, k * box[1] + 1), f"{names[label - 1]} {score:.2f}",
                      fill="red")
    img.save(path)


# ------------------------------------------------------------------------------------------------------------

def resolve_flags(args, demo):
    """Fill the flags left unset from PROTOCOLS[demo, voc or coco] and check them all; returns that name."""
    name = "demo" if demo else "voc" if args.voc_root else "coco"
    for flag, value in PROTOCOLS[name].items():
        if getattr(args, flag) is None:
            setattr(args, flag, value)
    if args.masks and args.voc_root:
        raise ValueError("--masks: VOC detection has boxes only")
    if args.layer_decay is not None and not args.finetune:
        raise ValueError("--layer-decay needs --finetune (a frozen backbone has no layers to decay)")
    args.layer_decay = args.layer_decay if args.layer_decay is not None else 0.8 if args.finetune else None
    probing.check_flags(args, counts=("iters", "batch_size", "test_size", "max_size", "rois", "channels"))
    if min(args.img_size) < 1 or args.warmup < 0 or not all(0 < f <= 1 for f in args.lr_steps):
        raise ValueError(f"--img-size {args.img_size}, --warmup {args.warmup}, --lr-steps {args.lr_steps}: "
                         f"expected positive sizes, warm-up >= 0 and fractions in (0, 1]")
    for flag in ("vis", "save_detections"):
        probing.check_output_path(getattr(args, flag), "--" + flag.replace("_", "-"), folder=flag == "vis")
    return name


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    t0, counts, bad = time.time(), {k: 0 for k in ("missing images", "boxes clipped", "empty boxes dropped",
                                                    "crowd regions ignored",
                                                    "training images without objects dropped")}, set()
    try:
        coco_flags = [args.train_json, args.train_images, args.val_json, args.val_images]
        if any(coco_flags) and not all(coco_flags):
            raise ValueError("give all four of --train-json --train-images --val-json --val-images, or none "
                             "for the demo set")
        if args.voc_root and any(coco_flags):
            raise ValueError("give either the COCO files (--train-json ...) or --voc-root, not both")
        if (args.voc_test_root or args.voc_train_split != "trainval"
                or args.voc_test_split != "test") and not args.voc_root:
            raise ValueError("--voc-test-root / --voc-train-split / --voc-test-split need --voc-root")
        demo = not (args.voc_root or any(coco_flags))
        protocol = resolve_flags(args, demo)
        if args.random_init and not args.model:
            args.model = "vit_demo" if demo else "vit_small"
        vit, _ = probing.probe_backbone(args.ckpt, args.random_init, args.model, args.seed, args.device)
        if demo:
            demo_set.make_demo()
        train_coco, train_recs, val_coco, val_recs, cat_ids, names = detect_data.datasets(
            args, demo, args.masks, counts)
        torch.manual_seed(args.seed)
        model = build_detector(vit, len(cat_ids), args.masks, args).to(args.device)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    mode = "fine-tuned" if args.finetune else "frozen"
    print(f"backbone {args.ckpt or 'random-init ' + args.model} ({mode}), "
          f"{'Mask' if args.masks else 'Faster'} R-CNN, {protocol} protocol: {len(train_recs)} train / "
          f"{len(val_recs)} val images, {len(names)} classes, {args.iters} iterations of batch "
          f"{args.batch_size}, lr {args.lr:g}, width {args.channels}, train sizes {args.img_size}, test size "
          f"{args.test_size}, max {args.max_size}")
    print("input: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    if args.vis:
        os.makedirs(args.vis, exist_ok=True)
    skipped = train(model, detect_data.DetData(train_recs, train_coco, args.masks, True), args, bad)
    results, done = detect(model, detect_data.DetData(val_recs, val_coco, False, False), cat_ids, names,
                           args.masks, args, bad)
    scores = {f"box_{k}": v for k, v in coco_scores(val_coco, results, done, "bbox").items()}
    if args.masks:
        scores.update({f"mask_{k}": v for k, v in coco_scores(val_coco, results, done, "segm").items()})
    counts.update({"unreadable images skipped": len(bad), "non-finite training steps skipped": skipped})
    wall = time.time() - t0
    print("\n" + " ".join(f"{k:>9}" for k in scores) + "\n" + " ".join(f"{v:9.2f}" for v in scores.values()))
    print(f"{len(results)} detections on {len(done)} val images; "
          + ", ".join(f"{v} {k}" for k, v in counts.items() if v) + f"; {wall / 60:.1f} min")
    if args.save_detections:
        with open(args.save_detections, "w") as f:
            json.dump(results, f)
        print(f"wrote {args.save_detections}")
    if args.out:
        context = dict(backbone=args.ckpt or f"random-init {args.model} seed {args.seed}", protocol=mode,
                       dataset=protocol, detector="Mask R-CNN" if args.masks else "Faster R-CNN",
                       img_size=args.img_size, test_size=args.test_size, max_size=args.max_size,
                       iters=args.iters, lr_steps=args.lr_steps, warmup=args.warmup, lr=args.lr, wd=args.wd,
                       layer_decay=args.layer_decay, batch_size=args.batch_size, rois=args.rois,
                       channels=args.channels, seed=args.seed, n_train=len(train_recs), n_val=len(done),
                       n_detections=len(results), input=counts, wall_s=round(wall, 1))
        probing.write_result(args.out, scores, context)
    return 0


if __name__ == "__main__":
    sys.exit(main())
