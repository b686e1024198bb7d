"""
The data of the detection probe (probe_detect.py, METHOD.md 14): COCO instances files and VOC XMLs, both read
into pycocotools COCO indexes (`datasets`), the cleaned records of their images (`records`) and the torch
Dataset over them (`DetData`).

Layouts read:
- COCO: an instances json (images, annotations, categories; checked by probing.load_coco) and the folder its
  file_names are relative to, one pair for training and one for evaluation, with the same category ids.
- VOC: <root>/ImageSets/Main/<split>.txt (one image id a line), <root>/Annotations/<id>.xml and
  <root>/JPEGImages/<the XML's filename, else <id>.jpg>. The training split of several roots is joined into
  one index (VOC2007 + VOC2012; image ids 1..N in list order); the evaluation split comes from one root
  (--voc-test-root, else the first --voc-root). Boxes only; VOC's 1-based corners become (xmin - 1,
  ymin - 1, xmax, ymax). 'difficult' objects are ordinary objects in training and iscrowd=1 at evaluation
  (COCOeval ignores the detections that match them).
- the demo set (demo.py): the COCO pair of probing.DEMO.

Labels: torchvision's detectors take contiguous labels 1..K (0 = background); label = 1 + the position of
the category id in `cat_ids`, and back, category id = cat_ids[label - 1] (results keep the data set's ids).
COCO: cat_ids = the sorted ids of the files (non-contiguous on COCO itself). VOC: ids 1..K = the 20 VOC
classes in VOC order, or the sorted names found when one is not a VOC class; evaluation takes the training
names.

Bad input: image files missing (skipped), crowd regions (left out of training), boxes reaching outside the
image (clipped), boxes empty after clipping (dropped) and training images left without a box (dropped) are
counted in `counts`; evaluation keeps every image whose file exists, scored against the index's truth. An
image that cannot be read or is not of its annotated size comes out of DetData as (index, None, None), and
the caller skips and counts it. A missing VOC list or XML, an unparsable XML, evaluation classes not among
the training classes, an entry without a needed field, a box without a segmentation for Mask R-CNN, no
training image left or no object to score raise ValueError / FileNotFoundError.
"""
import os
import xml.etree.ElementTree as ET
from contextlib import redirect_stdout

import numpy as np
import torch
import torchvision.transforms.functional as TF
from torch.utils.data import Dataset

import data
import probe_segment
import probing


def read_voc_xml(path):
    """(file name, width, height, [(class name, [x0, y0, x1, y1], difficult)]) of a VOC Annotations XML. VOC
    corners are 1-based pixel indices: box = (xmin - 1, ymin - 1, xmax, ymax) in continuous pixel coordinates,
    as detectron2 reads them."""
    try:
        root = ET.parse(path).getroot()
        size = root.find("size")
        w, h = int(size.findtext("width")), int(size.findtext("height"))
        objects = []
        for obj in root.iter("object"):
            b = obj.find("bndbox")
            x0, y0, x1, y1 = (float(b.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
            objects.append((obj.findtext("name").strip(), [x0 - 1, y0 - 1, x1, y1],
                            int(obj.findtext("difficult") or 0)))
        return root.findtext("filename") or os.path.basename(path)[:-4] + ".jpg", w, h, objects
    except ET.ParseError as e:
        raise ValueError(f"VOC annotation {path}: not XML ({e})") from None
    except (AttributeError, TypeError, ValueError):
        raise ValueError(f"VOC annotation {path}: expected <size> with <width>/<height> and objects with "
                         f"<name> and <bndbox> xmin/ymin/xmax/ymax numbers") from None


def voc_coco(roots, split, difficult_as_crowd, names=None):
    """A pycocotools COCO index of the images of ImageSets/Main/<split>.txt in every root (file_name = the
    full image path, ids 1..N in list order). Categories 1..K = `names`, else the 20 VOC classes when every
    name is one of them, else the sorted names found. difficult_as_crowd: difficult objects get iscrowd=1, so
    that COCOeval ignores what matches them (evaluation); else they are ordinary objects (training)."""
    from pycocotools.coco import COCO
    images, found = [], []
    for root in roots:
        list_file = os.path.join(root, "ImageSets", "Main", f"{split}.txt")
        if not os.path.isfile(list_file):
            raise FileNotFoundError(f"VOC list {list_file}: no such file (is {root} a VOC folder?)")
        with open(list_file) as f:
            ids = [line.split()[0] for line in f if line.strip()]
        probing.require_files([os.path.join(root, "Annotations", i + ".xml") for i in ids],
                              f"annotations of {list_file}")
        for i in ids:
            fname, w, h, objects = read_voc_xml(os.path.join(root, "Annotations", i + ".xml"))
            images.append(dict(id=len(images) + 1, file_name=os.path.join(root, "JPEGImages", fname), width=w,
                               height=h))
            found.append(objects)
    seen = sorted({o[0] for objects in found for o in objects})
    if names is None:
        names = probe_segment.VOC_NAMES[1:] if set(seen) <= set(probe_segment.VOC_NAMES) else seen
    unknown = sorted(set(seen) - set(names))
    if unknown:
        raise ValueError(f"VOC {split} of {roots}: classes {unknown[:5]} are not among the training classes")
    anns = []
    for img, objects in zip(images, found):
        for name, (x0, y0, x1, y1), difficult in objects:
            anns.append(dict(id=len(anns) + 1, image_id=img["id"], category_id=names.index(name) + 1,
                             bbox=[x0, y0, x1 - x0, y1 - y0], area=(x1 - x0) * (y1 - y0),
                             iscrowd=int(difficult and difficult_as_crowd)))
    coco = COCO()
    coco.dataset = dict(images=images, annotations=anns, categories=[dict(id=k + 1, name=n)
                                                                     for k, n in enumerate(names)])
    with open(os.devnull, "w") as null, redirect_stdout(null):
        coco.createIndex()
    return coco, names


def records(coco, images_dir, cat_ids, train, masks, counts):
    """[{path, id, width, height, boxes [n, 4] xyxy float32, labels [n] int64, anns}] of the images of `coco`
    whose file exists, in sorted-id order. Training: crowd regions left out (COCO ignores them), boxes clipped
    to the image and dropped when empty, images left without a box dropped (detectron2's default); each
    counted in `counts`."""
    index, out = {c: i + 1 for i, c in enumerate(cat_ids)}, []
    for img_id in sorted(coco.imgs):
        info = coco.imgs[img_id]
        path = os.path.join(images_dir, info["file_name"])
        if not os.path.isfile(path):
            counts["missing images"] += 1
            continue
        w, h, boxes, labels, anns = info["width"], info["height"], [], [], []
        for ann in coco.imgToAnns.get(img_id, []) if train else []:
            if ann.get("iscrowd"):
                counts["crowd regions ignored"] += 1
                continue
            x, y, bw, bh = ann["bbox"]
            box = [min(max(v, 0.0), lim) for v, lim in zip((x, y, x + bw, y + bh), (w, h, w, h))]
            if box[2] <= box[0] or box[3] <= box[1]:
                counts["empty boxes dropped"] += 1
                continue
            counts["boxes clipped"] += box != [x, y, x + bw, y + bh]
            if masks and not ann.get("segmentation"):
                raise ValueError(f"annotation {ann['id']} of image {img_id} has no segmentation; "
                                 f"pass --no-masks to train boxes only")
            boxes.append(box)
            labels.append(index[ann["category_id"]])
            anns.append(ann)
        if train and not boxes:
            counts["training images without objects dropped"] += 1
            continue
        out.append(dict(path=path, id=img_id, width=w, height=h, anns=anns,
                        boxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                        labels=torch.tensor(labels, dtype=torch.int64)))
    return out


class DetData(Dataset):
    """Items (index, image [3, H, W] in [0, 1], target {boxes, labels, masks [n, H, W] uint8 if masks}), or
    (index, None, None) for an image that cannot be read or whose size is not the annotated one. Training
    flips horizontally with p = 0.5 (the torch RNG, which DataLoader seeds per worker)."""

    def __init__(self, recs, coco, masks, train):
        self.recs, self.coco, self.masks, self.train = recs, coco, masks, train

    def __len__(self):
        return len(self.recs)

    def __getitem__(self, i):
        r = self.recs[i]
        try:
            img = data.load_rgb(r["path"])
        except Exception:  # unreadable, truncated, not an image: skipped and counted by the caller
            return i, None, None
        if img.size != (r["width"], r["height"]):
            return i, None, None
        x, target = TF.to_tensor(img), {"boxes": r["boxes"].clone(), "labels": r["labels"]}
        if self.masks:
            masks = [self.coco.annToMask(a) for a in r["anns"]]
            target["masks"] = torch.from_numpy(np.stack(masks) if masks
                                               else np.zeros((0, r["height"], r["width"]), np.uint8))
        if self.train and torch.rand(()).item() < 0.5:
            x = x.flip(-1)
            target["boxes"][:, [0, 2]] = r["width"] - target["boxes"][:, [2, 0]]
            if self.masks:
                target["masks"] = target["masks"].flip(-1)
        return i, x, target


def datasets(args, demo, masks, counts):
    """(train COCO index, its records, val COCO index, its records, category ids, class names)."""
    if args.voc_root:
        train, names = voc_coco(args.voc_root, args.voc_train_split, difficult_as_crowd=False)
        val, _ = voc_coco([args.voc_test_root or args.voc_root[0]], args.voc_test_split, True, names)
        folders, cat_ids = ("", ""), list(range(1, len(names) + 1))
    else:
        tj, ti, vj, vi = probing.DEMO if demo else (args.train_json, args.train_images, args.val_json,
                                                    args.val_images)
        train = probing.load_coco(tj, ti, check_images=False)
        val = probing.load_coco(vj, vi, check_images=False)
        cat_ids = probing.same_categories(train, val, tj, vj)
        names, folders = [train.cats[c]["name"] for c in cat_ids], (ti, vi)
    try:
        train_recs = records(train, folders[0], cat_ids, True, masks, counts)
        val_recs = records(val, folders[1], cat_ids, False, masks, counts)
    except (KeyError, TypeError) as e:
        raise ValueError(f"annotations: an image or annotation entry without a valid {e}") from None
    if not train_recs:
        raise ValueError("no training image with a readable file and a box")
    if not any(not a.get("iscrowd") for r in val_recs for a in val.imgToAnns.get(r["id"], [])):
        raise ValueError("the evaluation split has no object to score")
    return train, train_recs, val, val_recs, cat_ids, names

