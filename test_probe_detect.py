"""probe_detect.py: COCOeval on detections with known IoUs, the feature pyramid's shapes and strides, the
position-embedding interpolation against a hand loop, the frozen protocol, the optimiser groups and schedule,
and tiny end-to-end runs (COCO with masks, VOC07+12 layout). The data (detect_data.py): test_detect_data.py."""
import json
import math
import os
from argparse import Namespace
from collections import Counter
from contextlib import redirect_stdout

import pytest
import torch
from PIL import Image

import detect_data
import probe_detect
import probing
import vit
from conftest import VOC_XML, error_of, tiny_coco, write_voc
from detect_data import records
from probe_detect import coco_scores, lr_factor

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools")  # numpy-2 copy= notice



def gt_index(boxes):
    """A pycocotools index of boxes [(image id, category id, [x, y, w, h])] on 100x100 images 1..3."""
    from pycocotools.coco import COCO
    coco = COCO()
    coco.dataset = dict(images=[dict(id=i, width=100, height=100, file_name=f"{i}.jpg") for i in (1, 2, 3)],
                        categories=[dict(id=4, name="a"), dict(id=9, name="b")],
                        annotations=[dict(id=k + 1, image_id=i, category_id=c, bbox=b, area=b[2] * b[3],
                                          iscrowd=0) for k, (i, c, b) in enumerate(boxes)])
    with open(os.devnull, "w") as null, redirect_stdout(null):
        coco.createIndex()
    return coco


def test_coco_scores_on_boxes_with_known_ious():
    truth = [(1, 4, [10, 10, 52, 30]), (1, 9, [40, 50, 52, 40]), (2, 4, [0, 0, 52, 52])]  # image 3: none
    gt = gt_index(truth)
    perfect = [dict(image_id=i, category_id=c, bbox=b, score=0.9) for i, c, b in truth]
    assert coco_scores(gt, perfect, [1, 2, 3], "bbox") == {"AP": 100.0, "AP50": 100.0, "AP75": 100.0}
    # shifted right by 12 px: overlap 40 / union 64 = IoU 0.625, a hit at 0.50, 0.55, 0.60 of 10 thresholds
    shifted = [dict(r, bbox=[r["bbox"][0] + 12] + r["bbox"][1:]) for r in perfect]
    iou = (52 - 12) / (52 + 12)
    assert iou == 0.625
    s = coco_scores(gt, shifted, [1, 2, 3], "bbox")
    assert s["AP50"] == pytest.approx(100) and s["AP75"] == 0 and s["AP"] == pytest.approx(30)
    # the right box with the wrong category misses; scoring a subset of images sees only those
    swapped = [dict(r, category_id=9, score=0.5) if r["image_id"] == 2 else r for r in perfect]
    # class 4: recall 1/2 at precision 1 = 51 of the 101 recall points; class 9: its truth first, then a miss
    assert coco_scores(gt, swapped, [1, 2, 3], "bbox")["AP50"] == pytest.approx((100 * 51 / 101 + 100) / 2)
    assert coco_scores(gt, swapped, [1], "bbox")["AP"] == pytest.approx(100)
    # no detection at all: 0, not a crash in loadRes
    assert coco_scores(gt, [], [1, 2, 3], "bbox") == {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}


def test_pyramid_shapes_and_strides():
    for patch in (8, 16):
        torch.manual_seed(0)
        backbone = vit.create_vit("vit_test", patch_size=patch, img_size=2 * patch)
        pyramid = probe_detect.SimplePyramid(backbone, frozen=True, channels=24)
        assert pyramid.strides == [patch // 4, patch // 2, patch, 2 * patch, 4 * patch]
        H, W = 4 * patch, 8 * patch  # a non-square padded input: 4 x 8 tokens
        out = pyramid(torch.randn(2, 3, H, W))
        assert list(out) == ["0", "1", "2", "3", "pool"]
        for (name, level), stride in zip(out.items(), pyramid.strides):
            assert level.shape == (2, 24, H // stride, W // stride), name
        assert torch.equal(out["pool"], out["3"][..., ::2, ::2])  # P6: stride-2 subsampling of P5


def bicubic_by_hand(grid, out_h, out_w, A=-0.75):
    """Bicubic interpolation of grid [h, w, D] as F.interpolate(align_corners=False): source coordinate
    (i + 0.5) * in / out - 0.5, Keys' cubic kernel with A = -0.75, indices clamped at the border."""
    h, w, _ = grid.shape

    def kernel(t):
        t = abs(t)
        if t <= 1:
            return (A + 2) * t ** 3 - (A + 3) * t ** 2 + 1
        return A * t ** 3 - 5 * A * t ** 2 + 8 * A * t - 4 * A if t < 2 else 0.0

    out = torch.zeros(out_h, out_w, grid.shape[2], dtype=torch.float64)
    for i in range(out_h):
        for j in range(out_w):
            y, x = (i + 0.5) * h / out_h - 0.5, (j + 0.5) * w / out_w - 0.5
            for m in range(math.floor(y) - 1, math.floor(y) + 3):
                for n in range(math.floor(x) - 1, math.floor(x) + 3):
                    out[i, j] += (kernel(y - m) * kernel(x - n)
                                  * grid[min(max(m, 0), h - 1), min(max(n, 0), w - 1)].double())
    return out


def test_position_embedding_interpolated_to_each_padded_grid():
    torch.manual_seed(1)
    backbone = vit.create_vit("vit_test")  # 4 x 4 grid
    with torch.no_grad():
        backbone.pos_embed.normal_()
    for gh, gw in ((3, 7), (6, 2), (4, 4)):
        pos = backbone.pos_embed_for(gh, gw)[0]
        assert torch.equal(pos[0], backbone.pos_embed[0, 0])  # CLS slot as it is
        want = bicubic_by_hand(backbone.pos_embed[0, 1:].reshape(4, 4, -1), gh, gw).reshape(gh * gw, -1)
        assert torch.allclose(pos[1:].double(), want, atol=1e-5)
        x = torch.randn(1, 3, 8 * gh, 8 * gw)
        with torch.no_grad():
            plain = torch.cat([backbone.cls_token, backbone.patch_embed(x)], 1)
            assert torch.allclose(backbone.tokens_in(x) - plain, pos[None], atol=1e-6)


def tiny_args(**kw):
    base = dict(iters=2, batch_size=2, workers=0, seed=0, lr=1e-3, wd=0.1, layer_decay=None, lr_steps=[0.5],
                warmup=1, device="cpu", finetune=False, channels=16, rois=16, img_size=[32], max_size=64)
    return Namespace(**{**base, **kw})


def tiny_detector(tmp_path, args, masks=True):
    """A vit_test detector and the DetData of tiny_coco (3 images of 20 px, 1 trainable)."""
    coco = probing.load_coco(str(tiny_coco(tmp_path)), str(tmp_path / "img"))
    recs = records(coco, str(tmp_path / "img"), [3, 7, 12], True, masks, Counter())
    torch.manual_seed(0)
    model = probe_detect.build_detector(vit.create_vit("vit_test"), 3, masks, args)
    return model, detect_data.DetData(recs, coco, masks, True)


@pytest.mark.parametrize("finetune", [False, True])
def test_frozen_protocol_leaves_the_backbone_bit_identical(tmp_path, finetune):
    args = tiny_args(finetune=finetune, layer_decay=0.8 if finetune else None)
    model, data = tiny_detector(tmp_path, args)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert probe_detect.train(model, data, args, set()) == 0
    after = model.state_dict()
    body = [k for k in before if k.startswith("backbone.body.")]
    heads = [k for k in before if k.startswith(("backbone.convs", "rpn.", "roi_heads."))]
    assert len(body) == len(vit.create_vit("vit_test").state_dict())
    assert all(torch.equal(before[k], after[k]) for k in body) != finetune
    assert sum(not torch.equal(before[k], after[k]) for k in heads) > 0.9 * len(heads)


def test_param_groups_layer_decay_and_no_weight_decay(tmp_path):
    args = tiny_args(finetune=True)
    model, _ = tiny_detector(tmp_path, args)
    groups = probe_detect.param_groups(model, 0.1, 0.5, depth=2)
    where = {id(p): (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert len(where) == len(named)
    want = {"backbone.body.pos_embed": (0.125, 0.0), "backbone.body.cls_token": (0.125, 0.0),
            "backbone.body.patch_embed.proj.weight": (0.125, 0.1),
            "backbone.body.patch_embed.proj.bias": (0.125, 0.0),
            "backbone.body.blocks.0.attn.qkv.weight": (0.25, 0.1),
            "backbone.body.blocks.1.norm1.weight": (0.5, 0.0),
            "backbone.body.blocks.1.mlp.fc2.bias": (0.5, 0.0), "backbone.body.norm.weight": (1.0, 0.0),
            "backbone.convs.0.0.weight": (1.0, 0.1), "backbone.convs.0.1.weight": (1.0, 0.0),
            "roi_heads.box_head.fc6.weight": (1.0, 0.1), "rpn.head.conv.0.0.bias": (1.0, 0.0)}
    for name, scale_wd in want.items():
        assert where[id(named[name])] == scale_wd, name
    frozen, _ = tiny_detector(tmp_path, tiny_args())
    kept = {id(p) for g in probe_detect.param_groups(frozen, 0.1, 1.0, 2) for p in g["params"]}
    assert kept == {id(p) for n, p in frozen.named_parameters() if not n.startswith("backbone.body.")}


def test_lr_schedule():
    assert lr_factor(0, 10, [50, 80]) == pytest.approx(0.001)
    assert lr_factor(5, 10, [50, 80]) == pytest.approx(0.001 + 0.999 * 0.5)
    assert [lr_factor(i, 10, [50, 80]) for i in (10, 49, 50, 79, 80, 99)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01])
    assert lr_factor(0, 0, [5]) == 1


class Oracle(torch.nn.Module):
    """A stand-in detector answering each image with its truth (xyxy boxes, labels, masks), in call order."""

    def __init__(self, answers):
        super().__init__()
        self.answers, self.transform = list(answers), Namespace(min_size=None)

    def forward(self, images):
        return [self.answers.pop(0) for _ in images]


def test_perfect_detections_score_100_through_the_label_and_box_conversions(tmp_path):
    coco = probing.load_coco(str(tiny_coco(tmp_path)), str(tmp_path / "img"))  # ids 3, 7, 12 -> labels 1..3
    cat_ids = [3, 7, 12]
    recs = records(coco, str(tmp_path / "img"), cat_ids, False, True, Counter())
    answers = []
    for r in recs:
        anns = [a for a in coco.imgToAnns.get(r["id"], []) if not a["iscrowd"]]
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                               a["bbox"][1] + a["bbox"][3]] for a in anns]).reshape(-1, 4)
        masks = torch.stack([torch.from_numpy(coco.annToMask(a)).float() for a in anns])[:, None] if anns \
            else torch.zeros(0, 1, 20, 20)
        labels = torch.tensor([cat_ids.index(a["category_id"]) + 1 for a in anns], dtype=torch.int64)
        answers.append(dict(boxes=boxes, labels=labels, scores=torch.ones(len(anns)), masks=masks))
    args = tiny_args(batch_size=1, test_size=20, vis=None)
    results, done = probe_detect.detect(Oracle(answers), detect_data.DetData(recs, coco, False, False),
                                        cat_ids, ["cat", "dog", "cup"], True, args, set())
    assert done == [1, 2, 3] and len(results) == 2
    assert sorted((r["category_id"], r["bbox"]) for r in results) == [(3, [2, 2, 10, 10]), (7, [5, 5, 4, 4])]
    for iou_type in ("bbox", "segm"):
        scores = coco_scores(coco, results, done, iou_type)
        assert scores == pytest.approx({"AP": 100, "AP50": 100, "AP75": 100})


def demo_subset(demo_dir, tmp_path, n_train=4, n_val=3):
    """The first images of the demo set's splits as a small COCO pair in tmp_path (the demo's own folders)."""
    flags = []
    for split, n in (("train", n_train), ("val", n_val)):
        d = json.loads((demo_dir / "data/demo/annotations" / f"instances_{split}.json").read_text())
        labelled = {a["image_id"] for a in d["annotations"]}
        d["images"] = [im for im in d["images"] if im["id"] in labelled][:n]
        keep = {im["id"] for im in d["images"]}
        d["annotations"] = [a for a in d["annotations"] if a["image_id"] in keep]
        (tmp_path / f"{split}.json").write_text(json.dumps(d))
        flags += [f"--{split}-json", str(tmp_path / f"{split}.json"), f"--{split}-images",
                  str(demo_dir / "data/demo/images" / split)]
    return flags


TINY = ["--random-init", "--model", "vit_test", "--iters", "2", "--batch-size", "2", "--workers", "0",
        "--channels", "16", "--rois", "16", "--img-size", "64", "--test-size", "64", "--max-size", "64"]


def test_end_to_end_coco_with_masks(demo_dir, tmp_path, capsys):
    argv = TINY + demo_subset(demo_dir, tmp_path) + ["--out", str(tmp_path / "det.json"), "--vis",
                                                     str(tmp_path / "vis"), "--save-detections",
                                                     str(tmp_path / "dets.json")]
    assert probe_detect.main(argv) == 0
    out = json.loads((tmp_path / "det.json").read_text())
    for k in ("box_AP", "box_AP50", "box_AP75", "mask_AP", "mask_AP50", "mask_AP75"):
        assert 0 <= out[k] <= 100
    assert out["detector"] == "Mask R-CNN" and out["n_train"] == 4 and out["n_val"] == 3
    dets = json.loads((tmp_path / "dets.json").read_text())
    assert dets and {d["category_id"] for d in dets} <= {c[0] for c in probe_detect.demo_set.DEMO_CATEGORIES}
    gt = probing.load_coco(str(tmp_path / "val.json"), str(demo_dir / "data/demo/images/val"))
    rescored = coco_scores(gt, dets, [im["id"] for im in gt.dataset["images"]], "bbox")
    assert rescored["AP"] == pytest.approx(out["box_AP"])
    assert sorted(os.listdir(tmp_path / "vis")) == ["det_000.png", "det_001.png", "det_002.png"]
    assert Image.open(tmp_path / "vis" / "det_000.png").size == (192, 192)  # 64 px shown at 3x


def test_end_to_end_voc07_plus_12_and_bad_images(tmp_path, capsys):
    xml = VOC_XML.replace("<xmin>11</xmin>", "<xmin>-30</xmin>")  # a box reaching outside: clipped
    roots = [write_voc(tmp_path / "VOC2007", ["a1", "a2"], xml=xml), write_voc(tmp_path / "VOC2012", ["b1"])]
    write_voc(tmp_path / "VOC2007", ["t1", "t2"], split="test")
    (tmp_path / "VOC2012" / "JPEGImages" / "b1.jpg").write_bytes(b"broken")
    argv = TINY + ["--voc-root", roots[0], "--voc-root", roots[1], "--out", str(tmp_path / "det.json")]
    assert probe_detect.main(argv) == 0
    out = json.loads((tmp_path / "det.json").read_text())
    assert out["dataset"] == "voc" and out["detector"] == "Faster R-CNN" and "mask_AP" not in out
    assert out["n_train"] == 3 and out["n_val"] == 2
    assert out["input"]["unreadable images skipped"] == 1 and out["input"]["boxes clipped"] == 2
    assert "2 boxes clipped" in capsys.readouterr().out


def test_errors(demo_dir, tmp_path, capsys):
    flags = demo_subset(demo_dir, tmp_path)
    val = json.loads((tmp_path / "val.json").read_text())
    (tmp_path / "no_objects.json").write_text(json.dumps(dict(val, annotations=[])))
    (tmp_path / "other.json").write_text(json.dumps(dict(val, categories=val["categories"][:-1], annotations=[
        a for a in val["annotations"] if a["category_id"] != 25])))
    for argv, message in [
            (TINY + flags[:4], "give all four"),
            (TINY + flags + ["--voc-root", str(tmp_path)], "not both"),
            (TINY + ["--voc-test-split", "val"], "need --voc-root"),
            (TINY + ["--layer-decay", "0.7"], "--layer-decay needs --finetune"),
            (TINY + ["--voc-root", str(tmp_path), "--masks"], "--masks: VOC detection has boxes only"),
            (TINY + ["--voc-root", str(tmp_path)], "ImageSets/Main/trainval.txt: no such file"),
            (TINY + ["--iters", "0"], "--iters 0: expected a positive integer"),
            (TINY + ["--lr-steps", "1.5"], "fractions in (0, 1]"),
            (TINY + ["--vis", str(tmp_path / "val.json")], "--vis"),
            (TINY + flags[:5] + [str(tmp_path / "other.json")] + flags[6:], "category ids"),
            (TINY + flags[:5] + [str(tmp_path / "no_objects.json")] + flags[6:], "no object to score"),
            (["/no/such.pt"] + flags, "no such file")]:
        assert message in error_of(probe_detect.main, argv, capsys), argv
