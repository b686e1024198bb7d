"""probe_segment.py: the confusion-matrix mIoU against brute force, COCO semantic masks and VOC palette masks,
end to end on the demo set (VOC and COCO layouts), and its error paths."""
import json
import os

import numpy as np
import pytest
from PIL import Image

import probe_segment
from conftest import error_of, tiny_coco
from probe_segment import confusion_matrix, miou
from probing import coco_mask, load_coco

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools")  # numpy-2 copy= notice

def test_confusion_and_miou_against_brute_force():
    rng = np.random.default_rng(2)
    C = 5
    target = rng.integers(0, 3, (2, 7, 9))  # classes 3, 4 absent from the truth
    target[rng.random(target.shape) < 0.2] = 255
    pred = rng.integers(0, 4, (2, 7, 9))  # class 4 absent from both: skipped
    conf = confusion_matrix(pred, target, C)
    want = np.zeros((C, C), dtype=np.int64)
    for t, p in zip(target.ravel(), pred.ravel()):
        if t != 255:
            want[t, p] += 1
    assert conf.dtype == np.int64 and (conf == want).all()
    assert conf.sum() == (target != 255).sum()
    score, ious = miou(conf)
    brute = []
    for c in range(C):
        tp = sum(1 for t, p in zip(target.ravel(), pred.ravel()) if t == c and p == c)
        fp = sum(1 for t, p in zip(target.ravel(), pred.ravel()) if t != c and t != 255 and p == c)
        fn = sum(1 for t, p in zip(target.ravel(), pred.ravel()) if t == c and p != c)
        brute.append(100 * tp / (tp + fp + fn) if tp + fp + fn else None)
    assert ious[4] is None and ious[3] == 0.0
    assert ious[:4] == pytest.approx(brute[:4])
    assert score == pytest.approx(np.mean(brute[:4]))
    with pytest.raises(ValueError, match="label 7"):
        confusion_matrix(pred, np.full_like(target, 7), C)

def test_coco_semantic_mask(tmp_path):
    coco = load_coco(str(tiny_coco(tmp_path)), str(tmp_path / "img"))
    mask = coco_mask(coco, 1, {3: 1, 7: 2, 12: 3})
    assert mask.shape == (20, 20) and mask.dtype == np.uint8
    assert mask[7, 7] == 2  # the small dog is drawn over the large cat
    assert mask[3, 3] == 1 and mask[10, 4] == 1
    assert mask[16, 16] == 255  # crowd
    assert mask[0, 0] == 0 and mask[0, 19] == 0
    assert set(np.unique(mask)) == {0, 1, 2, 255}
    assert (coco_mask(coco, 3, {3: 1, 7: 2, 12: 3}) == 0).all()

def test_voc_mask_reads_palette_indices(tmp_path):
    m = Image.fromarray(np.array([[0, 1, 255], [2, 2, 0]], dtype=np.uint8), mode="P")
    m.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * 759)
    m.save(tmp_path / "m.png")
    assert probe_segment.voc_mask(str(tmp_path / "m.png")).tolist() == [[0, 1, 255], [2, 2, 0]]
    Image.new("RGB", (2, 2)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match="expected a palette"):
        probe_segment.voc_mask(str(tmp_path / "rgb.png"))

@pytest.mark.parametrize("dataset", ["voc", "coco"])
def test_segment_end_to_end(demo_dir, tmp_path, monkeypatch, dataset):
    monkeypatch.chdir(demo_dir)
    argv = ["--random-init", "--model", "vit_test", "--epochs", "1", "--workers", "0", "--batch-size", "32",
            "--dataset", dataset, "--out", str(tmp_path / "seg.json"), "--vis", str(tmp_path / "vis")]
    assert probe_segment.main(argv) == 0
    result = json.loads((tmp_path / "seg.json").read_text())
    assert 0 <= result["mIoU"] <= 100 and result["img_size"] == 64
    assert result["IoU"]["background"] is not None
    assert all(v is None or 0 <= v <= 100 for v in result["IoU"].values())
    pics = sorted(os.listdir(tmp_path / "vis"))
    assert pics[0] == "vis_000.png" and len(pics) == min(8, result["n_val"])
    with Image.open(tmp_path / "vis" / pics[0]) as pic:
        assert pic.mode == "RGB" and pic.width > 3 * 64

def test_voc_errors(tmp_path, capsys):
    root = tmp_path / "voc"
    argv = ["--random-init", "--model", "vit_test", "--root", str(root)]
    os.makedirs(root)
    assert "train.txt: no such file" in error_of(probe_segment.main, argv, capsys)
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        os.makedirs(root / d)
    for split, ids in (("train", ["a", "b"]), ("val", ["c"])):
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
        for i in ids:
            Image.new("RGB", (20, 16)).save(root / "JPEGImages" / f"{i}.jpg")
            Image.new("P", (20, 16)).save(root / "SegmentationClass" / f"{i}.png")
    os.remove(root / "SegmentationClass" / "b.png")
    err = error_of(probe_segment.main, argv, capsys)
    assert "masks of" in err and "1 of 2 files missing" in err and "b.png" in err
    Image.new("P", (16, 20)).save(root / "SegmentationClass" / "b.png")  # transposed: b is skipped, a runs
    out = tmp_path / "seg.json"
    assert probe_segment.main(argv + ["--epochs", "1", "--workers", "0", "--img-size", "16", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "skipped 1 of 3 image/mask pairs" in err and "b.jpg is 20x16 px but" in err
    assert json.loads(out.read_text())["n_train"] == 1
    Image.new("P", (16, 20)).save(root / "SegmentationClass" / "a.png")  # no training pair left
    assert probe_segment.main(argv) == 2
    assert "no usable image/mask pair in the train split" in capsys.readouterr().err.splitlines()[-1]


def test_unreadable_images_are_skipped_and_counted(demo_dir, tmp_path, capsys):
    """COCO segmentation with a cut training image and a non-image val file: the probe goes on, counts both,
    and scores the other val images (SegData gives the bad ones as a blank image with every pixel ignored)."""
    path = tiny_coco(tmp_path, n_images=4, size=32)
    (tmp_path / "img" / "2.jpg").write_bytes((tmp_path / "img" / "2.jpg").read_bytes()[:100])
    (tmp_path / "img" / "3.jpg").write_text("not an image")
    out = tmp_path / "seg.json"
    argv = ["--random-init", "--model", "vit_test", "--dataset", "coco", "--epochs", "2", "--workers", "0",
            "--img-size", "16", "--out", str(out)]
    for split in ("train", "val"):
        argv += [f"--{split}-json", str(path), f"--{split}-images", str(tmp_path / "img")]
    assert probe_segment.main(argv) == 0
    assert "2 of 4 train, 2 of 4 val" in capsys.readouterr().err
    result = json.loads(out.read_text())
    assert result["skipped_val"] == [str(tmp_path / "img" / n) for n in ("2.jpg", "3.jpg")]
    assert (result["skipped_train"], result["n_train"], result["n_val"]) == (2, 2, 2)
    coco = load_coco(str(path), str(tmp_path / "img"))
    x, y, size, ok = probe_segment.SegData([(str(tmp_path / "img" / "3.jpg"), 3)], 16, 8, False, coco, {})[0]
    assert not ok and x.abs().sum() == 0 and (y == 255).all()
