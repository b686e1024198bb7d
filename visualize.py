"""
Pictures of what a pretrained backbone learned, and of a run's log (PIL only; nothing else to install):

    python visualize.py out/ckpt.pt img1.jpg img2.jpg --out vis/    # per image: CLS attention, matches
    python visualize.py --log out/log.jsonl --out vis/              # loss terms and probe_mAP over the steps

    attn_<image>.png    the image and the last block's CLS attention over the patches, one panel per head and
                        their mean (what DINO's visualize_attention.py shows; ContrastiveCrop's heat map is
                        the mean)
    match_<image>.png   two augmented views of the image (pretraining's own augmentation) side by side, and a
                        line from each anchor token of a grid in view 1 to the token of view 2 that
                        losses.match pairs it with (METHOD.md 3: argmax cosine of the backbone's patch
                        tokens), the positives DenseCL trains
    curves.png          every logged term (loss, global, dense, ..., lam, grad_norm), the online probe's mAP

and the pictures of reproduce.py's results (results_picture, sweep_picture): axes with ticks and units, every
seed, mean ± std, the poster's number, a legend.
"""
import argparse
import json
import math
import os
import statistics
import sys

import torch
from PIL import Image, ImageDraw, ImageFont

import augment
import data
import losses
import probing
import vit

# dark -> bright (inferno-like)
HEAT = [(0, 0, 4), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164)]


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    add = parser.add_argument
    add("ckpt", nargs="?", metavar="CKPT", help="our pretraining checkpoint or a timm-layout ViT state dict")
    add("images", nargs="*", metavar="IMAGE", help="image files to draw")
    add("--log", default=None, help="a run's log.jsonl: draw its curves instead")
    add("--out", default="vis", help="folder of the PNGs (made if missing)")
    add("--img-size", type=int, default=None, help="input size (default: the pretraining --img-size)")
    add("--model", default=None, choices=sorted(vit.CONFIGS),
        help="config of a plain state dict (its head count)")
    add("--anchors", type=int, default=6,
        help="anchor grid of the correspondence picture: this many per side")
    add("--seed", type=int, default=0, help="seed of the two augmented views")
    add("--scale", type=int, default=4, help="display size = this x the input size, for small demo images")
    return parser


def colour(v):
    """A colour of the HEAT map for v in [0, 1]."""
    v = min(max(float(v), 0.0), 1.0) * (len(HEAT) - 1)
    i = min(int(v), len(HEAT) - 2)
    return tuple(round(a + (b - a) * (v - i)) for a, b in zip(HEAT[i], HEAT[i + 1]))


def heat_image(heat, size):
    """A [gh, gw] map, min-max normalised, as an RGB image of `size` (nearest: one square per token)."""
    h = (heat - heat.min()) / (heat.max() - heat.min() + 1e-12)
    img = Image.new("RGB", (heat.shape[1], heat.shape[0]))
    img.putdata([colour(v) for v in h.flatten().tolist()])
    return img.resize(size, Image.NEAREST)


def to_pil(x):
    """A normalised view [3, S, S] back to an RGB image."""
    mean, std = torch.tensor(data.IMAGENET_MEAN).view(3, 1, 1), torch.tensor(data.IMAGENET_STD).view(3, 1, 1)
    pixels = (x.float().cpu() * std + mean).clamp(0, 1).mul(255).byte()
    return Image.fromarray(pixels.permute(1, 2, 0).numpy())


def labelled(panels, labels, pad=4, text_h=14):
    """Panels (same height) side by side with a caption above each."""
    W = sum(p.width for p in panels) + pad * (len(panels) + 1)
    H = max(p.height for p in panels) + text_h + 2 * pad
    canvas = Image.new("RGB", (W, H), "white")
    draw, x = ImageDraw.Draw(canvas), pad
    for p, label in zip(panels, labels):
        text(draw, (x, pad), label, font(11))
        canvas.paste(p, (x, pad + text_h))
        x += p.width + pad
    return canvas


def attention_picture(model, x, display):
    """The image and its CLS attention per head and averaged, as heat maps over the token grid."""
    grid = x.shape[-1] // model.patch_size
    attn = model.last_cls_attention(x[None])[0].view(-1, grid, grid)  # [heads, g, g]
    size = (display, display)
    panels = [to_pil(x).resize(size, Image.BICUBIC), heat_image(attn.mean(0), size)]
    panels += [heat_image(a, size) for a in attn]
    return labelled(panels, ["image", "mean of heads"] + [f"head {h}" for h in range(len(attn))])


def views_of(path, S, seed):
    """Two augmented views [2, 3, S, S] of one image, with pretraining's augmentation (data.TwoViews +
    photometric)."""
    sample = data.TwoViews([path], S, seed=seed)[0]
    return torch.cat([augment.photometric(sample[f"view{i}"][None], sample[f"photo{i}"][None])
                      for i in (1, 2)])


def match_picture(model, views, anchors, display):
    """View 1 and view 2 side by side; from a grid of anchor tokens of view 1, a line to the matched token of
    view 2."""
    with torch.no_grad():
        tokens = model.forward_features(views)[:, 1:]
    j = losses.match(tokens[:1], tokens[1:])[0]  # [T]: for each token of view 1 its partner in view 2
    grid, gap = views.shape[-1] // model.patch_size, 16
    cell = display / grid
    canvas = Image.new("RGB", (2 * display + gap, display), "white")
    canvas.paste(to_pil(views[0]).resize((display, display), Image.BICUBIC), (0, 0))
    canvas.paste(to_pil(views[1]).resize((display, display), Image.BICUBIC), (display + gap, 0))
    draw = ImageDraw.Draw(canvas)
    picks = sorted({min(grid - 1, round((k + 0.5) * grid / anchors - 0.5)) for k in range(anchors)})
    for n, (r, c) in enumerate((r, c) for r in picks for c in picks):
        t = r * grid + c
        r2, c2 = divmod(int(j[t]), grid)
        a = ((c + 0.5) * cell, (r + 0.5) * cell)
        b = (display + gap + (c2 + 0.5) * cell, (r2 + 0.5) * cell)
        hue = colour(0.15 + 0.85 * n / max(1, len(picks) ** 2 - 1))
        draw.line([a, b], fill=hue, width=2)
        for x, y in (a, b):
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], outline="white", fill=hue)
    return labelled([canvas],
                    ["view 1 -> view 2: each anchor token's match (argmax cosine of the backbone tokens)"])


def curve_panel(points, title, w=420, h=220):
    """One line plot of (step, value) points with its title, axis extremes and the last value."""
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 56, w - 12, 24, h - 28
    draw.rectangle([left, top, right, bottom], outline=(160, 160, 160))
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
    xy = [(left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top))
          for x, y in points]
    if len(xy) > 1:
        draw.line(xy, fill=(40, 90, 170), width=2)
    for x, y in xy if len(xy) < 40 else xy[-1:]:
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(40, 90, 170))
    draw.text((left, 6), f"{title}  (last {ys[-1]:.4g})", fill="black")
    draw.text((4, top - 4), f"{y1:.3g}", fill="black")
    draw.text((4, bottom - 8), f"{y0:.3g}", fill="black")
    draw.text((left, bottom + 6), f"step {x0:g}", fill="black")
    draw.text((right - 70, bottom + 6), f"step {x1:g}", fill="black")
    return img


def curves_picture(records):
    """One panel per logged value over the steps: the loss terms (and lam, grad_norm), then probe_mAP."""
    skip = {"step", "epoch", "lr", "img_per_s", "mfu", "skipped", "n_train", "n_heldout", "probe_s"}
    names = []
    for rec in records:
        names += [k for k, v in rec.items() if k not in skip and k not in names
                  and isinstance(v, (int, float))]
    names = sorted(names, key=lambda k: (k != "loss", k == "probe_mAP", k))
    series = {k: [(r["step"], r[k]) for r in records if k in r and math.isfinite(r[k])] for k in names}
    panels = [curve_panel(points, k) for k, points in series.items() if points]
    if not panels:
        raise ValueError("no logged values to draw")
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    canvas = Image.new("RGB", (cols * panels[0].width, rows * panels[0].height), "white")
    for i, p in enumerate(panels):
        canvas.paste(p, ((i % cols) * p.width, (i // cols) * p.height))
    return canvas


# ------------------------------------------------------------------------------------------------------------
# the pictures of reproduce.py's tables

BLUE, RED, GREEN = (70, 120, 190), (220, 30, 30), (60, 150, 80)


def font(size=13):
    """PIL's own font (FreeType) at `size`; without FreeType its bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def text(draw, xy, s, fnt, fill="black", anchor="la"):
    """draw.text, its words placed one by one with a space of a third of the font size: PIL's own font draws a
    space 2-3 px wide, so "SimCLR cls" read "SimCLRcls". anchor: l/m/r (x) and a/m (y), as PIL's."""
    words = s.split(" ")
    gap = max(draw.textlength(" ", font=fnt), getattr(fnt, "size", 10) / 3)
    width = sum(draw.textlength(w, font=fnt) for w in words) + gap * (len(words) - 1)
    x = xy[0] - {"l": 0, "m": width / 2, "r": width}[anchor[0]]
    for w in words:
        draw.text((x, xy[1]), w, fill=fill, font=fnt, anchor="l" + anchor[1])
        x += draw.textlength(w, font=fnt) + gap


def ticks(lo, hi):
    """Round tick values covering [lo, hi]."""
    span = max(hi - lo, 1e-9)
    step = next(s for s in (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 25, 50) if span / s <= 8)
    return [step * i for i in range(math.floor(lo / step), math.ceil(hi / step) + 1)]


def legend(draw, x, y, items):
    """Coloured boxes and their labels in one line from (x, y)."""
    for fill, label in items:
        draw.rectangle([x, y + 1, x + 12, y + 12], fill=fill)
        text(draw, (x + 18, y), label, font(11))
        x += 36 + draw.textlength(label, font=font(11))


def main_metrics(summary):
    """The metric of each probe the rows have (mAP, mIoU, AP) and the poster's metric drawn beside it."""
    return [(m, p) for m, p in (("mAP", "mAP"), ("mIoU", "VOC mIoU"), ("AP", None))
            if any((e.get(m) or (None,))[0] is not None for e in summary)]


def results_picture(summary, title):
    """A panel per probe (its metric, %): a bar per row (mean over seeds), a ±std whisker, each seed a dot,
    the poster's number as a red mark."""
    panels, f, small = main_metrics(summary), font(13), font(11)
    label_w, panel_w, row_h, top = 250, 330, 24, 70
    img = Image.new("RGB", (label_w + panel_w * max(1, len(panels)) + 20, top + row_h * len(summary) + 50), "white")
    draw = ImageDraw.Draw(img)
    text(draw, (10, 8), title, font(15))
    legend(draw, 10, 33, [(BLUE, "ours: mean over seeds, whisker ± std"), ("black", "one seed"),
                          (RED, "the poster (COCO / VOC, ViT-S/16, 300 epochs)")])
    for i, e in enumerate(summary):
        text(draw, (label_w - 8, top + i * row_h + row_h / 2), e["row"], f, anchor="rm")
    for k, (metric, poster) in enumerate(panels):
        x0, x1, y_axis = label_w + k * panel_w + 10, label_w + (k + 1) * panel_w - 10, top + row_h * len(summary) + 4
        hi = max([sum(e.get(metric) or (0, 0)) for e in summary] + [e["poster"].get(poster) or 0 for e in summary]
                 + [1.0]) * 1.08
        sx = lambda v: x0 + (x1 - x0) * v / hi  # noqa: E731 (the panel's x axis)
        draw.line([x0, top - 4, x0, y_axis], fill="black")
        draw.line([x0, y_axis, x1, y_axis], fill="black")
        for t in (t for t in ticks(0, hi) if t <= hi):
            draw.line([sx(t), top - 4, sx(t), y_axis], fill=(225, 225, 225))
            draw.line([sx(t), y_axis, sx(t), y_axis + 4], fill="black")
            text(draw, (sx(t), y_axis + 6), f"{t:g}", small, anchor="ma")
        text(draw, ((x0 + x1) / 2, y_axis + 22), f"{metric} (%)", f, anchor="ma")
        for i, e in enumerate(summary):
            y = top + i * row_h + row_h / 2
            m, s = e.get(metric) or (None, None)
            if m is not None:
                draw.rectangle([x0, y - 7, sx(m), y + 7], fill=BLUE)
                draw.line([sx(m - s), y, sx(m + s), y], fill="black", width=2)
                for v in e["values"].get(metric, []):
                    draw.ellipse([sx(v) - 2, y - 2, sx(v) + 2, y + 2], fill="black")
            if e["poster"].get(poster):
                draw.line([sx(e["poster"][poster]), y - 10, sx(e["poster"][poster]), y + 10], fill=RED, width=3)
    return img


def sweep_series(table, summary, metric):
    """{series: [(x, mean, std, per-seed values)]} of a swept table: lam per aggregation, gamma per decoder
    (gamma 0 shared), or (negatives) the mean over the grid points at each level of M, beta and N, with the
    std of those means."""
    series = {}
    for e in summary:
        ms = e.get(metric) or (None, None)
        if ms[0] is None:
            continue
        words = e["row"].split()
        if table == "negatives":
            for factor, value in zip(words[0::2], words[1::2]):
                series.setdefault(factor, {}).setdefault(float(value), []).append(ms[0])
            continue
        x = float(words[1])
        names = [words[2]] if len(words) > 2 else (["conv", "transformer"] if table == "recon" else [])
        for name in names:
            series.setdefault(name, {})[x] = (ms[0], ms[1], e["values"].get(metric, []))
    if table == "negatives":
        return {f: [(x, statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0, v)
                    for x, v in sorted(levels.items())] for f, levels in series.items()}
    return {name: [(x, *v) for x, v in sorted(points.items())] for name, points in series.items()}


def sweep_picture(table, summary, title):
    """The poster's ablation figures: the metric over lam (one line per aggregation), over gamma (per
    decoder), or over each factor of the M x beta x N grid (mean over the other factors), mean ± std, every
    seed (or grid point) a dot."""
    xlabel = {"lambda": "lam (weight of the dense loss)", "recon": "gamma (weight of the reconstruction)"}
    colours = [BLUE, GREEN, RED, (150, 90, 170)]
    panels = []
    for metric, _ in main_metrics(summary):
        series = sweep_series(table, summary, metric)
        groups = [(f, {f: series[f]}) for f in ("M", "beta", "N") if f in series] if table == "negatives" \
            else [(xlabel[table], series)]
        for label, group in groups:
            panels.append((metric, label, group))
    w, h, left, bottom_pad, cols = 380, 300, 60, 50, 3
    img = Image.new("RGB", (min(cols, max(1, len(panels))) * w + 20, math.ceil(len(panels) / cols) * h + 70), "white")
    draw, f, small = ImageDraw.Draw(img), font(13), font(11)
    text(draw, (10, 8), title, font(15))
    names = sorted({name for _, _, g in panels for name in g})
    legend(draw, 10, 33, [(colours[i % 4], name if table != "negatives" else f"mean over the grid at each {name}")
                          for i, name in enumerate(names)] + [("black", "one seed / grid point")])
    for k, (metric, label, group) in enumerate(panels):
        x0, x1 = 10 + (k % cols) * w + left, 10 + (k % cols + 1) * w - 20
        y0, y1 = 76 + (k // cols) * h, 76 + (k // cols + 1) * h - bottom_pad
        xs = [p[0] for pts in group.values() for p in pts]
        ys = [v for pts in group.values() for p in pts for v in [p[1] - p[2], p[1] + p[2], *p[3]]]
        xt, yt = ticks(min(xs), max(xs)) if table != "negatives" else sorted(set(xs)), ticks(min(ys), max(ys))
        lo, hi = (min(xt), max(xt)) if max(xt) > min(xt) else (min(xt) - 1, max(xt) + 1)
        lo, hi = lo - 0.06 * (hi - lo), hi + 0.06 * (hi - lo)  # no point on the frame
        sx = lambda v: x0 + (x1 - x0) * (v - lo) / (hi - lo)  # noqa: E731
        sy = lambda v: y1 - (y1 - y0) * (v - yt[0]) / max(yt[-1] - yt[0], 1e-9)  # noqa: E731
        draw.rectangle([x0, y0, x1, y1], outline=(160, 160, 160))
        for t in yt:
            draw.line([x0 - 4, sy(t), x1, sy(t)], fill=(225, 225, 225))
            text(draw, (x0 - 6, sy(t)), f"{t:g}", small, anchor="rm")
        for t in xt:
            draw.line([sx(t), y1, sx(t), y1 + 4], fill="black")
            text(draw, (sx(t), y1 + 6), f"{t:g}", small, anchor="ma")
        text(draw, ((x0 + x1) / 2, y1 + 22), label, f, anchor="ma")
        text(draw, (x0, y0 - 16), f"{metric} (%)", f)
        for name, pts in group.items():
            fill = colours[names.index(name) % 4]
            if len(pts) > 1:
                draw.line([(sx(x), sy(m)) for x, m, _, _ in pts], fill=fill, width=2)
            for x, m, s, values in pts:
                draw.line([sx(x), sy(m - s), sx(x), sy(m + s)], fill=fill, width=2)
                draw.ellipse([sx(x) - 4, sy(m) - 4, sx(x) + 4, sy(m) + 4], fill=fill)
                for v in values:
                    draw.ellipse([sx(x) + 6 - 2, sy(v) - 2, sx(x) + 6 + 2, sy(v) + 2], fill="black")
    return img


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    try:
        os.makedirs(args.out, exist_ok=True)
        if args.log:
            if not os.path.isfile(args.log):
                raise FileNotFoundError(f"--log {args.log}: no such file")
            with open(args.log) as fh:
                records = [json.loads(line) for line in fh if line.strip()]
            if not records or not all(isinstance(r, dict) and "step" in r for r in records):
                raise ValueError(f"--log {args.log}: not a pretrain.py log.jsonl (one JSON object "
                                 f"with 'step' a line)")
            path = os.path.join(args.out, "curves.png")
            curves_picture(records).save(path)
            print(f"wrote {path}")
            return 0
        if not args.ckpt or not args.images:
            raise ValueError("give CKPT and at least one IMAGE, or --log LOG.jsonl")
        model, ckpt_args = vit.load_backbone(args.ckpt, "cpu", args.model)
        S = args.img_size or ckpt_args.get("img_size") or model.config["img_size"]
        if S % model.patch_size:
            raise ValueError(f"--img-size {S}: expected a multiple of the patch size {model.patch_size}")
        for path in args.images:
            try:
                views, image = views_of(path, S, args.seed), probing.Images([path], S)[0][0]
            except Exception as e:  # one unreadable image is reported, the others are still drawn
                print(f"skipped {path}: {type(e).__name__}: {e}", file=sys.stderr)
                continue
            stem = os.path.splitext(os.path.basename(path))[0]
            display = S * args.scale if S * args.scale <= 512 else S
            for name, picture in (("attn", attention_picture(model, image, display)),
                                  ("match", match_picture(model, views, args.anchors, display))):
                out = os.path.join(args.out, f"{name}_{stem}.png")
                picture.save(out)
                print(f"wrote {out}")
        return 0
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
