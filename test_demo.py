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
