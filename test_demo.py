"""Tests of demo.py: the demo set (layout, COCO annotations, masks) and the synthetic COCO-sized JPEGs."""
import os
import time

import numpy as np
import pytest
from PIL import Image

from data import list_images
from demo import make_demo

pytestmark = pytest.mark.filterwarnings('ignore:__array__ implementation:DeprecationWarning')  # pycocotools


def test_make_demo(tmp_path):
    from pycocotools.coco import COCO
    root = str(tmp_path / 'demo')
    t0 = time.time()
    assert make_demo(root) == root
    assert time.time() - t0 < 20
    assert sorted(os.listdir(tmp_path)) == ['demo']  # the temp folder was moved into place
    done = os.path.getmtime(os.path.join(root, 'DONE'))
    kinds, crowd, negatives = set(), 0, 0
    for split, n in (('train', 400), ('val', 100)):
        coco = COCO(os.path.join(root, 'annotations', f'instances_{split}.json'))
        ids = sorted(coco.getCatIds())
        assert ids == [1, 3, 7, 8, 13, 18, 22, 25]
        contiguous = {cid: k + 1 for k, cid in enumerate(ids)}
        assert len(coco.getImgIds()) == n
        stems = open(os.path.join(root, 'voc', 'ImageSets', 'Segmentation', f'{split}.txt')).read().split()
        assert len(stems) == n
        files = list_images(os.path.join(root, 'annotations', f'instances_{split}.json'))
        assert len(files) == n and all(os.path.exists(f) for f in files)
        for img_id in coco.getImgIds():
            info = coco.loadImgs(img_id)[0]
            stem = info['file_name'][:-4]
            assert stem in stems
            assert os.path.exists(os.path.join(root, 'voc', 'JPEGImages', info['file_name']))
            png = Image.open(os.path.join(root, 'voc', 'SegmentationClass', stem + '.png'))
            assert png.mode == 'P' and png.getpalette()[3:6] == [128, 0, 0]
            label = np.array(png)
            anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id, iscrowd=None))
            negatives += not anns
            union = np.zeros_like(label, dtype=bool)
            for a in anns:
                m = coco.annToMask(a).astype(bool)
                assert m.sum() == a['area'] > 0
                kinds.add(type(a['segmentation']).__name__)
                crowd += a['iscrowd']
                p = np.pad(m, 1, mode='edge')
                interior = np.logical_and.reduce([p[dy:dy + 96, dx:dx + 96] for dy in range(3)
                                                  for dx in range(3)])
                assert (label[interior] == contiguous[a['category_id']]).all()
                assert (label[m & ~interior] == 255).all()  # the void band on the object boundary
                assert (label[m] != 0).all() and np.isin(label[m], [contiguous[a['category_id']], 255]).all()
                union |= m
            assert (np.isin(label[~union], [0, 255])).all() and (label[~union] == 0).mean() > 0.5
    assert kinds == {'list', 'dict'} and crowd > 0 and 0 < negatives < 40
    assert make_demo(root) == root and os.path.getmtime(os.path.join(root, 'DONE')) == done
    os.makedirs(tmp_path / 'half')
    with pytest.raises(FileExistsError, match='half'):
        make_demo(str(tmp_path / 'half'))


def labels_and_masks(root, split):
    """Per image of a made demo set: its VOC label PNG, and the masks of its instance and stuff annotations
    (stuff_*.json when present) as [(category id, mask)]."""
    from pycocotools.coco import COCO
    cocos = [COCO(os.path.join(root, 'annotations', f'{name}_{split}.json')) for name in ('instances', 'stuff')
             if os.path.exists(os.path.join(root, 'annotations', f'{name}_{split}.json'))]
    for img_id in cocos[0].getImgIds():
        stem = cocos[0].loadImgs(img_id)[0]['file_name'][:-4]
        label = np.array(Image.open(os.path.join(root, 'voc', 'SegmentationClass', stem + '.png')))
        yield label, [[(a['category_id'], coco.annToMask(a).astype(bool), a['area'])
                       for a in coco.loadAnns(coco.getAnnIds(imgIds=img_id, iscrowd=None))] for coco in cocos]


def grow(mask):
    """mask dilated by one pixel (3x3)."""
    p = np.pad(mask, 1)
    return np.logical_or.reduce([p[dy:dy + mask.shape[0], dx:dx + mask.shape[1]] for dy in range(3)
                                 for dx in range(3)])


def test_make_demo_clutter(tmp_path):
    """The clutter variant: the demo's layout plus stuff_*.json; stuff classes 9..13 in the PNGs agree with
    the stuff annotations, things with the instance annotations; at most 10% of the pixels unlabelled (class
    0; the demo: 83%), over 60% of the pixels an object or stuff class; same seed, same bytes."""
    import hashlib
    from demo import DEMO_CATEGORIES, STUFF_CATEGORIES
    roots = [make_demo(str(tmp_path / name), seed=seed, n_train=20, n_val=6, clutter=True)
             for name, seed in (('a', 0), ('b', 0), ('c', 1))]
    digests = [{f: hashlib.md5(open(os.path.join(d, f), 'rb').read()).hexdigest()
                for d, _, fs in os.walk(r) for f in fs} for r in roots]
    assert digests[0] == digests[1]
    assert all(digests[0][f] != digests[2][f] for f in digests[0] if f.endswith(('.jpg', '.png')))
    things = {c[0]: k + 1 for k, c in enumerate(DEMO_CATEGORIES)}
    stuff = {c[0]: len(DEMO_CATEGORIES) + k + 1 for k, c in enumerate(STUFF_CATEGORIES)}
    counts, objects, kinds = np.zeros(256), [], set()
    for split, n in (('train', 20), ('val', 6)):
        assert len(list_images(os.path.join(roots[0], 'annotations', f'instances_{split}.json'))) == n
        for label, (thing_anns, stuff_anns) in labels_and_masks(roots[0], split):
            counts += np.bincount(label.ravel(), minlength=256)
            objects.append(len(thing_anns))
            union = np.zeros(label.shape, bool)
            for cid, m, area in thing_anns:
                assert cid in things and m.sum() == area > 0 and np.isin(label[m], [things[cid], 255]).all()
                union |= m
            near_thing = grow(union)
            assert len({cid for cid, _, _ in stuff_anns}) == len(stuff_anns)  # one annotation a kind
            for cid, m, area in stuff_anns:
                kinds.add(cid)
                assert cid in stuff and m.sum() == area > 0 and not (m & union).any()
                assert (label[m & ~near_thing] == stuff[cid]).all() and np.isin(label[m], [stuff[cid], 255]).all()
                union |= m
            assert (np.isin(label[~union], [0, 255])).all()
    share = counts / counts.sum()
    assert share[0] < 0.10 and share[1:14].sum() > 0.6 and share[14:255].sum() == 0
    assert kinds == set(stuff) and np.mean(objects) > 4  # the demo: 2.8 objects an image
