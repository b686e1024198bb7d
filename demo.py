"""
The data this project generates itself, so that everything runs without a download:

    make_demo    the built-in demo set: small synthetic scenes of 8 shape categories with COCO instance
                 annotations and VOC-style class masks (pretrain.py, both probes and the tests use it when no
                 data is given); make_demo(clutter=True) the clutter variant (data/demo_clutter): scenes of
                 more and larger objects over textured background regions labelled as stuff classes
    make_jpegs   COCO-sized synthetic JPEGs (640x480 and friends) for bench.py's loader and end-to-end rows

Randomness: torch.Generator / numpy Generator seeded from `seed`; the same call writes the same files.
"""
import io
import json
import math
import multiprocessing
import os
import shutil

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


DEMO_SIZE, DEMO_TRAIN, DEMO_VAL = 96, 400, 100
DEMO_CATEGORIES = [  # (COCO id, name, shape, hue, texture); non-contiguous ids like COCO; all 3 traits differ
    (1, 'red_disc', 'disc', 0.00, 'plain'),
    (3, 'orange_square', 'square', 0.08, 'stripes'),
    (7, 'yellow_triangle', 'triangle', 0.16, 'dots'),
    (8, 'green_star', 'star', 0.33, 'checker'),
    (13, 'cyan_ring', 'ring', 0.50, 'stripes'),
    (18, 'blue_cross', 'cross', 0.62, 'plain'),
    (22, 'purple_diamond', 'diamond', 0.75, 'dots'),
    (25, 'pink_hexagon', 'hexagon', 0.88, 'checker'),
]


def _regular(n, a0=0.0, r=1.0):
    """n polygon vertices (x, y) on the circle of radius r around 0, the first at angle a0."""
    return [(r * math.cos(a0 + 2 * math.pi * k / n), r * math.sin(a0 + 2 * math.pi * k / n))
            for k in range(n)]


# polygon shapes: vertices (x, y) around 0 with radius <= 1; disc and ring are drawn from distances
DEMO_OUTLINES = {
    'square': _regular(4, math.pi / 4),
    'triangle': _regular(3, -math.pi / 2),
    'star': [p for pair in zip(_regular(5, -math.pi / 2), _regular(5, -math.pi / 2 + math.pi / 5, 0.45))
             for p in pair],
    'cross': [(-.33, -1), (.33, -1), (.33, -.33), (1, -.33), (1, .33), (.33, .33), (.33, 1), (-.33, 1),
              (-.33, .33), (-1, .33), (-1, -.33), (-.33, -.33)],
    'diamond': [(0, -1), (.6, 0), (0, 1), (-.6, 0)],
    'hexagon': _regular(6),
}


# clutter=True: textured background kinds labelled as classes (like COCO-stuff); ids after the things'
# (COCO-stuff numbers its stuff 92-182 after the 80 things); (id, name, hue, saturation, texture)
STUFF_CATEGORIES = [
    (101, 'grass', 0.28, 0.55, 'blades'),
    (110, 'water', 0.58, 0.50, 'waves'),
    (119, 'brick', 0.03, 0.50, 'bricks'),
    (127, 'sand', 0.11, 0.35, 'grain'),
    (136, 'gravel', 0.10, 0.08, 'pebbles'),
]
CLUTTER_UNLABELLED = 0.08  # share of a clutter scene's background regions left plain and unlabelled


def _u(g, lo=0.0, hi=1.0):
    """One U(lo, hi) draw from g."""
    return lo + (hi - lo) * torch.rand((), generator=g, dtype=torch.float64).item()


def _hsv(h, s, v):
    """HSV in [0, 1] -> RGB array in [0, 255] (the channel formula of augment._shift_hue)."""
    k = (np.array([5.0, 3.0, 1.0]) + 6 * (h % 1)) % 6
    return 255 * (v - v * s * np.clip(np.minimum(k, 4 - k), 0, 1))


def _demo_shape(shape, cx, cy, r, angle):
    """Boolean [S, S] mask of a shape of radius r centred at (cx, cy), and its COCO polygon (None for disc and
    ring).
    Polygons are rasterised by pycocotools itself, so a json polygon decodes to exactly the drawn pixels."""
    from pycocotools import mask as mask_utils
    S = DEMO_SIZE
    if shape in ('disc', 'ring'):
        yy, xx = np.mgrid[0:S, 0:S] + 0.5
        d = np.hypot(xx - cx, yy - cy)
        return (d <= r) & (d >= (0.55 * r if shape == 'ring' else 0)), None
    c, s = math.cos(angle), math.sin(angle)
    poly = [round(v, 2) for x, y in DEMO_OUTLINES[shape]
            for v in (cx + r * (c * x - s * y), cy + r * (s * x + c * y))]
    return mask_utils.decode(mask_utils.frPyObjects([poly], S, S))[:, :, 0] > 0, poly


def _demo_texture(texture, g):
    """Brightness multiplier [S, S] of a texture (stripes, checker, dots, plain), random period 4-8 px and
    angle."""
    S, p, phi = DEMO_SIZE, _u(g, 4, 8), _u(g, 0, math.pi)
    yy, xx = np.mgrid[0:S, 0:S] + 0.5
    u, v = xx * math.cos(phi) + yy * math.sin(phi), -xx * math.sin(phi) + yy * math.cos(phi)
    if texture == 'stripes':
        return np.where(np.floor(u / (p / 2)) % 2 == 0, 1.0, 0.5)
    if texture == 'checker':
        return np.where((np.floor(u / (p / 2)) + np.floor(v / (p / 2))) % 2 == 0, 1.0, 0.5)
    if texture == 'dots':
        return np.where((u % p - p / 2) ** 2 + (v % p - p / 2) ** 2 < (0.3 * p) ** 2, 0.4, 1.0)
    return np.ones((S, S))


def _smooth(g, h, w):
    """A smooth random field [S, S]: an [h, w] standard-normal grid from g, bicubically upsampled."""
    return F.interpolate(torch.randn(1, 1, h, w, generator=g), size=(DEMO_SIZE, DEMO_SIZE), mode='bicubic',
                         align_corners=False)[0, 0].numpy()


def _stuff_texture(texture, g):
    """Brightness multiplier [S, S] of a stuff texture along a random direction: blades (fine streaks of
    random brightness), waves (wavy bands), bricks (a wall of bricks of random brightness with dark joints),
    grain (strong pixel speckle over dunes), pebbles (bright blobs with dark gaps). None repeats an object
    texture."""
    S = DEMO_SIZE
    yy, xx = np.mgrid[0:S, 0:S] + 0.5
    phi = _u(g, 0, math.pi)
    u, v = xx * math.cos(phi) + yy * math.sin(phi), -xx * math.sin(phi) + yy * math.cos(phi)
    if texture == 'blades':
        pos = np.arange(-2 * S, 2 * S, 1.5)
        streak = np.interp(u, pos, torch.randn(len(pos), generator=g).numpy())
        return 0.8 + 0.15 * np.clip(streak, -2, 2) + 0.1 * _smooth(g, 3, 3)
    if texture == 'waves':
        p, q, a = _u(g, 6, 10), _u(g, 16, 30), _u(g, 1.5, 3)
        return 0.8 + 0.25 * np.sin(2 * math.pi * u / p + a * np.sin(2 * math.pi * v / q))
    if texture == 'bricks':
        hb = _u(g, 6, 9)
        row = np.floor(v / hb)
        col = np.floor(u / (2 * hb) + 0.5 * (row % 2))
        shade = 0.85 + 0.15 * torch.rand(64, 64, generator=g).numpy()[row.astype(int) % 64, col.astype(int) % 64]
        joint = (v % hb < 1.2) | ((u / (2 * hb) + 0.5 * (row % 2)) % 1 < 1.2 / (2 * hb))
        return np.where(joint, 0.45, shade)
    if texture == 'grain':
        return 0.85 + 0.12 * np.clip(torch.randn(S, S, generator=g).numpy(), -2, 2) + 0.1 * _smooth(g, 4, 4)
    if texture == 'pebbles':
        blobs = _smooth(g, 14, 14)
        return np.where(blobs > -0.2, 0.9 + 0.15 * np.clip(blobs, 0, 1.5), 0.45)
    raise ValueError(f'_stuff_texture: unknown texture {texture!r}')


def _stuff_background(g, plain):
    """The background of a clutter scene: 2-4 regions (the nearest of random centres, each distance plus 10x
    a smooth random field, so the borders meander), each a stuff kind drawn uniformly from STUFF_CATEGORIES,
    or with probability CLUTTER_UNLABELLED left as the plain background `plain` [S, S, 3]. A stuff region: its
    kind's hue +-0.03, saturation +-0.1, value 0.45-0.85, times its texture, plus pixel noise. Returns the
    image [S, S, 3] (float) and the stuff map [S, S] uint8 (0 unlabelled, k + 1 = STUFF_CATEGORIES[k])."""
    S = DEMO_SIZE
    yy, xx = np.mgrid[0:S, 0:S] + 0.5
    k = int(torch.randint(2, 5, (1,), generator=g))
    region = np.stack([np.hypot(xx - _u(g, 0, S), yy - _u(g, 0, S)) + 10 * _smooth(g, 3, 3)
                       for _ in range(k)]).argmin(0)
    img, stuff = plain.copy(), np.zeros((S, S), np.uint8)
    for r in range(k):
        if _u(g) < CLUTTER_UNLABELLED:
            continue
        si = int(torch.randint(len(STUFF_CATEGORIES), (1,), generator=g))
        _, _, hue, sat, texture = STUFF_CATEGORIES[si]
        colour = _hsv(hue + _u(g, -0.03, 0.03), max(0.0, sat + _u(g, -0.1, 0.1)), _u(g, 0.45, 0.85))
        layer = colour * _stuff_texture(texture, g)[..., None] + 6 * torch.randn(S, S, 3, generator=g).numpy()
        inside = region == r
        img[inside], stuff[inside] = layer[inside], si + 1
    return img, stuff


def _demo_scene(g, n_objects, crowd, clutter=False):
    """One image: a smooth random two-colour gradient + low-frequency colour noise + pixel noise, then
    n_objects objects (radius 6-24 px, i.e. 12-48 px wide, random position/rotation, category colour with
    jitter and category texture) painted in order, later on top. If crowd, the first object is a cluster of
    3-5 small same-category objects (one iscrowd=1 annotation). Objects left with < 30% of their area visible
    are not drawn. clutter: the background is _stuff_background's regions and the objects are larger (radius
    12-32 px). Returns uint8 [S, S, 3], a list of (category index, full mask, visible mask, polygon or None,
    iscrowd) in drawing order, and the stuff map [S, S] (all 0 unless clutter; objects drawn over it)."""
    S = DEMO_SIZE
    yy, xx = np.mgrid[0:S, 0:S] + 0.5
    c0, c1 = (_hsv(_u(g), _u(g, 0.1, 0.45), _u(g, 0.3, 0.9)) for _ in range(2))
    a = _u(g, 0, 2 * math.pi)
    t = np.clip(((xx - S / 2) * math.cos(a) + (yy - S / 2) * math.sin(a)) / S + 0.5, 0, 1)[..., None]
    low = F.interpolate(torch.randn(1, 3, 4, 4, generator=g), size=(S, S), mode='bicubic',
                        align_corners=False)
    noise = torch.randn(S, S, 3, generator=g).numpy()
    img = c0 * (1 - t) + c1 * t + 20 * low[0].permute(1, 2, 0).numpy() + 8 * noise
    img, stuff = _stuff_background(g, img) if clutter else (img, np.zeros((S, S), np.uint8))
    objects = []
    for k in range(n_objects):
        ci = int(torch.randint(len(DEMO_CATEGORIES), (1,), generator=g))
        shape = DEMO_CATEGORIES[ci][2]
        if crowd and k == 0:
            cx, cy = _u(g, 20, S - 20), _u(g, 20, S - 20)
            parts = [_demo_shape(shape, cx + _u(g, -14, 14), cy + _u(g, -14, 14), _u(g, 4, 7),
                                 _u(g, 0, 2 * math.pi))[0]
                     for _ in range(int(torch.randint(3, 6, (1,), generator=g)))]
            mask, poly = np.logical_or.reduce(parts), None
        else:
            r = _u(g, 12, 32) if clutter else _u(g, 6, 24)
            mask, poly = _demo_shape(shape, _u(g, r, S - r), _u(g, r, S - r), r, _u(g, 0, 2 * math.pi))
        objects.append([ci, mask, None, poly, int(crowd and k == 0)])
    covered, kept = np.zeros((S, S), bool), []
    for obj in reversed(objects):  # from the top: an object hidden by the ones drawn after it is dropped
        obj[2] = obj[1] & ~covered
        if obj[2].sum() >= 0.3 * obj[1].sum():
            kept.insert(0, tuple(obj))
            covered |= obj[1]
    for ci, mask, _, _, _ in kept:
        _, _, _, hue, texture = DEMO_CATEGORIES[ci]
        colour = _hsv(hue + 0.02 * torch.randn((), generator=g).item(), _u(g, 0.7, 1.0), _u(g, 0.75, 1.0))
        noise = torch.randn(S, S, 3, generator=g).numpy()
        obj_img = colour * _demo_texture(texture, g)[..., None] + 6 * noise
        img[mask] = obj_img[mask]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), kept, stuff


def voc_palette():
    """The PASCAL VOC colour map: bit 3j+ch of the class index i -> bit 7-j of channel ch (1 -> (128, 0,
    0), 255 -> (224, 224, 192)). A flat list of 768 values for Image.putpalette."""
    return [sum(((i >> (3 * j + ch)) & 1) << (7 - j) for j in range(8)) for i in range(256)
            for ch in range(3)]


def _annotation(ann_id, image_id, category_id, mask, iscrowd=0, poly=None):
    """The COCO annotation of a boolean [S, S] mask: the polygon `poly` when given (it rasterises to the
    mask), else RLE (counts as str); area and bbox from pycocotools."""
    from pycocotools import mask as mask_utils
    S = mask.shape[0]
    if poly is not None:
        segmentation, rle = [poly], mask_utils.merge(mask_utils.frPyObjects([poly], S, S))
    else:
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        segmentation = {'size': [S, S], 'counts': rle['counts'].decode('ascii')}
    return {'id': ann_id, 'image_id': image_id, 'category_id': category_id, 'segmentation': segmentation,
            'area': int(mask_utils.area(rle)), 'bbox': [float(v) for v in mask_utils.toBbox(rle)],
            'iscrowd': iscrowd}


def make_demo(root=None, seed=0, n_train=DEMO_TRAIN, n_val=DEMO_VAL, clutter=False):
    """Generate the built-in demo set deterministically on first use (idempotent: if root/DONE exists return
    at once); root defaults to data/demo, or data/demo_clutter with clutter.
    Written into a temp folder next to root, then os.replace'd into place: an interrupted generation leaves no
    half set.

    root/images/{train,val}/<id:06d>.jpg        96x96 RGB JPEG q90; n_train (ids 1..n_train) + n_val images
    root/annotations/instances_{train,val}.json COCO instances: polygons for unoccluded polygon shapes, RLE
                                                (counts as str) for discs, rings, occluded objects and
                                                iscrowd=1 clusters; bbox/area of the visible mask; 8
                                                categories, ids 1,3,7,8,13,18,22,25
    root/voc/JPEGImages/<id>.jpg                the same images
    root/voc/SegmentationClass/<id>.png         'P' PNG, VOC palette: 0 background, 1..8 = category in
                                                DEMO_CATEGORIES order, 255 on the 2-px band where the instance
                                                id changes (like VOC)
    root/voc/ImageSets/Segmentation/{train,val}.txt Every 33rd image (k % 33 == 5) has no object; the others
    have 2-4 objects (see _demo_scene); the json masks are the visible masks, so they agree with the PNGs.

    clutter=True: scenes that are mostly objects and labelled stuff (_stuff_background): 6-9 larger objects
    drawn over 2-4 textured background regions of 5 stuff kinds. The things are as above (the same 8
    categories in instances_*.json, so the multi-label probe stays about objects, as COCO's 80 thing
    classes); the stuff is labelled in the PNGs as classes 9..13 (STUFF_CATEGORIES order; no void band between
    stuff regions) and in root/annotations/stuff_{train,val}.json (COCO-stuff style: one RLE annotation per
    stuff kind and image, its pixels not covered by an object; ids 101,110,119,127,136). Class 0 is the
    unlabelled rest: 5% of the pixels (the demo's: 83%).
    Random draws: torch.Generator seeded with `seed`."""
    root = os.fspath(root or ('data/demo_clutter' if clutter else 'data/demo'))
    if os.path.exists(os.path.join(root, 'DONE')):
        return root
    if os.path.exists(root):
        raise FileExistsError(f"make_demo: {root} exists but has no DONE file (not a finished demo "
                              f"set); delete it")
    tmp = f"{root.rstrip('/')}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    for d in ('images/train', 'images/val', 'annotations', 'voc/JPEGImages', 'voc/SegmentationClass',
              'voc/ImageSets/Segmentation'):
        os.makedirs(os.path.join(tmp, d))
    g, S, palette = torch.Generator().manual_seed(seed), DEMO_SIZE, voc_palette()
    categories = [{'id': cid, 'name': name, 'supercategory': 'shape'} for cid, name, _, _,
                  _ in DEMO_CATEGORIES]
    stuff_categories = [{'id': cid, 'name': name, 'supercategory': 'stuff'} for cid, name, _, _,
                        _ in STUFF_CATEGORIES]
    ann_id = 1
    for split, n, first_id in (('train', n_train, 1), ('val', n_val, n_train + 1)):
        images, annotations, stuff_annotations, stems = [], [], [], []
        for k in range(n):
            image_id, stem = first_id + k, f'{first_id + k:06d}'
            n_objects = 0 if k % 33 == 5 else int(torch.randint(*((6, 10) if clutter else (2, 5)), (1,),
                                                                generator=g))
            img, objects, stuff = _demo_scene(g, n_objects, crowd=n_objects > 0 and _u(g) < 0.06,
                                              clutter=clutter)
            inst = np.zeros((S, S), np.int64)
            label = np.where(stuff > 0, stuff + len(DEMO_CATEGORIES), 0).astype(np.uint8)
            for idx, (ci, mask, _, _, _) in enumerate(objects, 1):
                inst[mask], label[mask] = idx, ci + 1
            for idx, (ci, mask, visible, poly, iscrowd) in enumerate(objects, 1):
                unoccluded = poly is not None and np.array_equal(mask, visible)
                annotations.append(_annotation(ann_id, image_id, DEMO_CATEGORIES[ci][0], visible, iscrowd,
                                               poly if unoccluded else None))
                ann_id += 1
            for si in np.unique(stuff[(stuff > 0) & (inst == 0)]):
                stuff_annotations.append(_annotation(ann_id, image_id, STUFF_CATEGORIES[si - 1][0],
                                                     (stuff == si) & (inst == 0)))
                ann_id += 1
            # VOC-style void band: pixels with a differently-labelled 3x3 neighbour
            p = np.pad(inst, 1, mode='edge')
            band = np.logical_or.reduce([p[dy:dy + S, dx:dx + S] != inst for dy in range(3)
                                         for dx in range(3)])
            label[band] = 255
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, 'JPEG', quality=90)
            for path in (f'images/{split}/{stem}.jpg', f'voc/JPEGImages/{stem}.jpg'):
                with open(os.path.join(tmp, path), 'wb') as f:
                    f.write(buf.getvalue())
            png = Image.fromarray(label)
            png.putpalette(palette)
            png.save(os.path.join(tmp, f'voc/SegmentationClass/{stem}.png'))
            images.append({'id': image_id, 'file_name': f'{stem}.jpg', 'width': S, 'height': S})
            stems.append(stem)
        info = {'description': f'demo.py make_demo(seed={seed}{", clutter=True" if clutter else ""})'}
        files = [('instances', annotations, categories)] + [('stuff', stuff_annotations, stuff_categories)] * clutter
        for name, anns, cats in files:
            with open(os.path.join(tmp, f'annotations/{name}_{split}.json'), 'w') as f:
                json.dump({'info': info, 'images': images, 'annotations': anns, 'categories': cats}, f)
        with open(os.path.join(tmp, f'voc/ImageSets/Segmentation/{split}.txt'), 'w') as f:
            f.write('\n'.join(stems) + '\n')
    with open(os.path.join(tmp, 'README.txt'), 'w') as f:
        names = ', '.join(c[1] for c in DEMO_CATEGORIES)
        kind = (f"6-9 objects over labelled stuff ({', '.join(c[1] for c in STUFF_CATEGORIES)}; VOC classes 9-13, "
                f"annotations/stuff_*.json)" if clutter else "0-4 objects")
        f.write(f"Synthetic scenes from demo.py make_demo(seed={seed}{', clutter=True' if clutter else ''}), see "
                f"its docstring: {n_train} train + {n_val} val {S}x{S} images of {kind} of 8 categories "
                f"({names}).\n"
                "images/ + annotations/instances_*.json: COCO format. voc/: the same images with "
                "VOC class PNGs.\n")
    with open(os.path.join(tmp, 'DONE'), 'w') as f:
        f.write('done\n')
    try:
        os.replace(tmp, root)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.exists(os.path.join(root, 'DONE')):
            raise
    return root


def _make_jpeg(job):
    path, seed, (W, H) = job
    rng = np.random.default_rng(seed)
    low = Image.fromarray((rng.random((6, 8, 3)) * 255).astype(np.uint8)).resize((W, H), Image.BICUBIC)
    yy, xx = np.mgrid[0:H, 0:W]
    a, period = rng.uniform(0, np.pi), rng.uniform(4, 24)
    stripes = 30 * np.sin((xx * np.cos(a) + yy * np.sin(a)) * 2 * np.pi / period)
    img = np.asarray(low,
                     np.float32) + (stripes * (xx < rng.integers(W)))[..., None] + rng.normal(0, 8, (H, W, 3))
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path + ".tmp.jpg", quality=90)
    os.replace(path + ".tmp.jpg", path)  # a killed run leaves no half-written JPEG to be reused


def make_jpegs(folder, n, seed=0):
    """n COCO-sized JPEGs (640x480, 480x640, 640x427, 427x640; q90): smooth colour fields, stripes, pixel
    noise. Files already there are reused; the others are written by one process per core (~20 ms each)."""
    os.makedirs(folder, exist_ok=True)
    files = [os.path.join(folder, f"bench_{i:04d}.jpg") for i in range(n)]
    sizes = [(640, 480), (480, 640), (640, 427), (427, 640)]
    jobs = [(path, seed + i, sizes[i % 4]) for i, path in enumerate(files) if not os.path.exists(path)]
    if len(jobs) > 64 and (os.cpu_count() or 1) > 1:
        with multiprocessing.get_context("fork").Pool(os.cpu_count()) as pool:
            pool.map(_make_jpeg, jobs, chunksize=16)
    else:
        for job in jobs:
            _make_jpeg(job)
    return files
