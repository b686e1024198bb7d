"""detect_data.py: the VOC XML reader and difficult objects, the cleaning of bad input (boxes clipped or
dropped, crowds, images without objects or files, unreadable images), the flips of DetData."""
import json
import os
from collections import Counter

import pytest
import torch
from PIL import Image

import detect_data
import probing
from conftest import tiny_coco, write_voc
from detect_data import read_voc_xml, records

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools")  # numpy-2 copy= notice

def test_voc_xml_reader_and_difficult_objects(tmp_path):
    root = write_voc(tmp_path / "VOC2007", ["000005"])
    name, w, h, objects = read_voc_xml(os.path.join(root, "Annotations", "000005.xml"))
    assert (name, w, h) == ("000005.jpg", 64, 56)
    assert objects == [("dog", [10.0, 20.0, 40.0, 50.0], 0), ("cat", [0.0, 0.0, 10.0, 12.0], 1)]
    train, names = detect_data.voc_coco([root], "trainval", difficult_as_crowd=False)
    test, _ = detect_data.voc_coco([root], "trainval", True, names)
    assert names == detect_data.probe_segment.VOC_NAMES[1:]
    cat, dog = names.index("cat") + 1, names.index("dog") + 1
    assert [(a["category_id"], a["bbox"], a["area"], a["iscrowd"]) for a in train.dataset["annotations"]] == [
        (dog, [10.0, 20.0, 30.0, 30.0], 900.0, 0), (cat, [0.0, 0.0, 10.0, 12.0], 120.0, 0)]
    assert [a["iscrowd"] for a in test.dataset["annotations"]] == [0, 1]  # difficult: ignored by COCOeval
    assert train.imgs[1]["file_name"] == os.path.join(root, "JPEGImages", "000005.jpg")
    (tmp_path / "bad.xml").write_text("<annotation><size><width>4</width></size>")
    with pytest.raises(ValueError, match="bad.xml: not XML"):
        read_voc_xml(str(tmp_path / "bad.xml"))
    (tmp_path / "bad.xml").write_text("<annotation><object><name>x</name></object></annotation>")
    with pytest.raises(ValueError, match="bad.xml: expected <size>"):
        read_voc_xml(str(tmp_path / "bad.xml"))


def test_records_clean_bad_boxes_crowds_empty_and_missing_images(tmp_path):
    path = tiny_coco(tmp_path, n_images=4)  # 20 px images; image 1: cat, dog and a crowd; 2: crowd only
    d = json.loads(path.read_text())
    d["annotations"] += [dict(id=5, image_id=3, category_id=3, bbox=[15, -5, 10, 10], area=1, iscrowd=0,
                              segmentation=[[15, 0, 20, 0, 20, 5]]),  # clipped to [15, 0, 20, 5]
                         dict(id=6, image_id=3, category_id=7, bbox=[25, 5, 4, 4], area=1, iscrowd=0,
                              segmentation=[[5, 5, 6, 5, 6, 6]]),  # outside: dropped
                         dict(id=7, image_id=3, category_id=7, bbox=[5, 5, 0, 4], area=0, iscrowd=0,
                              segmentation=[[5, 5, 6, 5, 6, 6]])]  # zero width: dropped
    path.write_text(json.dumps(d))
    os.remove(tmp_path / "img" / "4.jpg")
    coco = probing.load_coco(str(path), str(tmp_path / "img"), check_images=False)
    counts = Counter()
    recs = records(coco, str(tmp_path / "img"), [3, 7, 12], True, True, counts)
    assert [r["id"] for r in recs] == [1, 3]  # 2: crowd only, 4: missing file
    assert recs[0]["boxes"].tolist() == [[5, 5, 9, 9], [2, 2, 12, 12]]
    assert recs[0]["labels"].tolist() == [2, 1]
    assert recs[1]["boxes"].tolist() == [[15, 0, 20, 5]] and recs[1]["labels"].tolist() == [1]
    assert counts == {"missing images": 1, "crowd regions ignored": 2, "boxes clipped": 1,
                      "empty boxes dropped": 2, "training images without objects dropped": 1}
    val = records(coco, str(tmp_path / "img"), [3, 7, 12], False, True, Counter())
    assert [r["id"] for r in val] == [1, 2, 3] and all(len(r["boxes"]) == 0 for r in val)
    data = detect_data.DetData(recs, coco, True, False)
    _, x, target = data[0]
    assert x.shape == (3, 20, 20) and target["masks"].shape == (2, 20, 20)
    assert target["masks"][1].sum() == 100 and target["masks"][0, 7, 7] == 1
    flips = detect_data.DetData(recs, coco, True, True)
    torch.manual_seed(0)
    seen = set()
    for _ in range(20):
        _, xf, tf = flips[0]
        flipped = not torch.equal(tf["boxes"], target["boxes"])
        seen.add(flipped)
        if flipped:  # the image, its boxes (x -> 20 - x) and its masks mirrored together
            assert tf["boxes"].tolist() == [[11, 5, 15, 9], [8, 2, 18, 12]]
        assert torch.equal(xf, x.flip(-1) if flipped else x)
        assert torch.equal(tf["masks"], target["masks"].flip(-1) if flipped else target["masks"])
    assert seen == {True, False}
    (tmp_path / "img" / "1.jpg").write_bytes(b"not a jpeg")
    Image.new("RGB", (24, 20)).save(tmp_path / "img" / "3.jpg")  # not the annotated 20 x 20
    assert data[0] == (0, None, None) and data[1] == (1, None, None)
