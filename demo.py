"""
The data this project generates itself, so that everything runs without a download:

    make_demo    the built-in demo set: small synthetic scenes of 8 shape categories with COCO instance
                 annotations and VOC-style class masks (pretrain.py, both probes and the tests use it when no
                 data is given)
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


def _demo_scene(g, n_objects, crowd):
    """One image: a smooth random two-colour gradient + low-frequency colour noise + pixel noise, then
    n_objects objects (radius 6-24 px, i.e. 12-48 px wide, random position/rotation, category colour with
    jitter and category texture) painted in order, later on top. If crowd, the first object is a cluster of
    3-5 small same-category objects (one iscrowd=1 annotation). Objects left with < 30% of their area visible
    are not drawn. Returns uint8 [S, S, 3] and a list of (category index, full mask, visible mask, polygon or
    None, iscrowd) in drawing order."""
    S = DEMO_SIZE
    yy, xx = np.mgrid[0:S, 0:S] + 0.5
    c0, c1 = (_hsv(_u(g), _u(g, 0.1, 0.45), _u(g, 0.3, 0.9)) for _ in range(2))
    a = _u(g, 0, 2 * math.pi)
    t = np.clip(((xx - S / 2) * math.cos(a) + (yy - S / 2) * math.sin(a)) / S + 0.5, 0, 1)[..., None]
    low = F.interpolate(torch.randn(1, 3, 4, 4, generator=g), size=(S, S), mode='bicubic',
                        align_corners=False)
    noise = torch.randn(S, S, 3, generator=g).numpy()
    img = c0 * (1 - t) + c1 * t + 20 * low[0].permute(1, 2, 0).numpy() + 8 * noise
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
            r = _u(g, 6, 24)
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
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), kept


def voc_palette():
    """The PASCAL VOC colour map: bit 3j+ch of the class index i -> bit 7-j of channel ch (1 -> (128, 0,
    0), 255 -> (224, 224, 192)). A flat list of 768 values for Image.putpalette."""
    return [sum(((i >> (3 * j + ch)) & 1) << (7 - j) for j in range(8)) for i in range(256)
            for ch in range(3)]


def make_demo(root='data/demo', seed=0, n_train=DEMO_TRAIN, n_val=DEMO_VAL):
    """Generate the built-in demo set deterministically on first use (idempotent: if root/DONE exists return
    at once).
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
    Random draws: torch.Generator seeded with `seed`."""
    from pycocotools import mask as mask_utils  # only the demo needs pycocotools
    root = os.fspath(root)
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
    ann_id = 1
    for split, n, first_id in (('train', n_train, 1), ('val', n_val, n_train + 1)):
        images, annotations, stems = [], [], []
        for k in range(n):
            image_id, stem = first_id + k, f'{first_id + k:06d}'
            n_objects = 0 if k % 33 == 5 else int(torch.randint(2, 5, (1,), generator=g))
            img, objects = _demo_scene(g, n_objects, crowd=n_objects > 0 and _u(g) < 0.06)
            inst, label = np.zeros((S, S), np.int64), np.zeros((S, S), np.uint8)
            for idx, (ci, mask, _, _, _) in enumerate(objects, 1):
                inst[mask], label[mask] = idx, ci + 1
            for idx, (ci, mask, visible, poly, iscrowd) in enumerate(objects, 1):
                if poly is not None and np.array_equal(mask, visible):
                    segmentation, rle = [poly], mask_utils.merge(mask_utils.frPyObjects([poly], S, S))
                else:
                    rle = mask_utils.encode(np.asfortranarray(visible.astype(np.uint8)))
                    segmentation = {'size': [S, S], 'counts': rle['counts'].decode('ascii')}
                annotations.append({'id': ann_id, 'image_id': image_id, 'category_id': DEMO_CATEGORIES[ci][0],
                                    'segmentation': segmentation, 'area': int(mask_utils.area(rle)),
                                    'bbox': [float(v) for v in mask_utils.toBbox(rle)], 'iscrowd': iscrowd})
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
        coco = {'info': {'description': f'demo.py make_demo(seed={seed})'}, 'images': images,
                'annotations': annotations, 'categories': categories}
        with open(os.path.join(tmp, f'annotations/instances_{split}.json'), 'w') as f:
            json.dump(coco, f)
        with open(os.path.join(tmp, f'voc/ImageSets/Segmentation/{split}.txt'), 'w') as f:
            f.write('\n'.join(stems) + '\n')
    with open(os.path.join(tmp, 'README.txt'), 'w') as f:
        names = ', '.join(c[1] for c in DEMO_CATEGORIES)
        f.write(f"Synthetic scenes from demo.py make_demo(seed={seed}), see its docstring: {n_train} train + "
                f"{n_val} val {S}x{S} images of 0-4 objects of 8 categories ({names}).\n"
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
