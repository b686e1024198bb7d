"""Tests of the two evaluation probes: metrics against brute-force definitions, the COCO/VOC readers, tiny end-to-end
runs on the demo set, and the error paths (one `error: ...` line, exit code 2, nothing executed)."""
import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import data
import probe_multilabel
import probe_segment
import vit
from probe_multilabel import f1_scores, load_coco, mean_average_precision, multi_hot
from probe_segment import coco_mask, confusion_matrix, miou

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools")  # numpy-2 copy= notice

# ----------------------------------------------------------------------------------------------------------------------
# metrics

def brute_ap(s, t):
    """AP by its definition: walk the distinct thresholds from high to low, sum (R_k - R_{k-1}) * P_k."""
    ap, prev_r = 0.0, 0.0
    for thr in sorted(set(s.tolist()), reverse=True):
        pred = s >= thr
        tp = sum(1 for p, y in zip(pred, t) if p and y)
        precision, recall = tp / pred.sum(), tp / t.sum()
        ap += (recall - prev_r) * precision
        prev_r = recall
    return ap


def test_map_hand_values():
    assert mean_average_precision([[0.9], [0.8], [0.7], [0.6]], [[1], [0], [1], [0]]) == pytest.approx(
        100 * (0.5 * 1 + 0.5 * 2 / 3))
    # tied scores form one threshold: (0.5, P=1/2), then (1.0, P=2/3)
    assert mean_average_precision([[0.5], [0.5], [0.1]], [[1], [0], [1]]) == pytest.approx(100 * (0.25 + 1 / 3))


def test_map_against_brute_force_with_ties_and_empty_class():
    rng = np.random.default_rng(0)
    scores = np.round(rng.random((60, 6)), 1)  # many ties
    targets = (rng.random((60, 6)) < 0.3).astype(int)
    targets[:, 4] = 0  # no positives: skipped
    want = 100 * np.mean([brute_ap(scores[:, c], targets[:, c]) for c in range(6) if c != 4])
    assert mean_average_precision(scores, targets) == pytest.approx(want, abs=1e-9)
    assert mean_average_precision(torch.tensor(scores), torch.tensor(targets)) == pytest.approx(want, abs=1e-9)


def test_map_against_sklearn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    scores, targets = np.round(rng.random((60, 6)), 1), (rng.random((60, 6)) < 0.3).astype(int)
    targets[:, 4] = 0
    sk = 100 * np.mean([sklearn_metrics.average_precision_score(targets[:, c], scores[:, c]) for c in range(6)
                        if c != 4])
    assert mean_average_precision(scores, targets) == pytest.approx(sk, abs=1e-9)


def test_f1_against_brute_force():
    rng = np.random.default_rng(1)
    scores, targets = rng.random((50, 5)), (rng.random((50, 5)) < 0.4).astype(int)
    scores[:, 2] = 0.1  # a class that is never predicted: its precision is 0/0 = 0
    got = f1_scores(scores, targets)
    tp, fp, fn = np.zeros(5), np.zeros(5), np.zeros(5)
    for i in range(50):
        for c in range(5):
            p, y = scores[i, c] >= 0.5, targets[i, c] == 1
            tp[c] += p and y
            fp[c] += p and not y
            fn[c] += (not p) and y
    assert tp[2] + fp[2] == 0
    prec = [tp[c] / (tp[c] + fp[c]) if tp[c] + fp[c] else 0 for c in range(5)]
    rec = [tp[c] / (tp[c] + fn[c]) if tp[c] + fn[c] else 0 for c in range(5)]
    cp, cr = np.mean(prec), np.mean(rec)
    op, orr = tp.sum() / (tp.sum() + fp.sum()), tp.sum() / (tp.sum() + fn.sum())
    want = dict(CP=cp, CR=cr, CF1=2 * cp * cr / (cp + cr), OP=op, OR=orr, OF1=2 * op * orr / (op + orr))
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(100 * want[k], abs=1e-9), k
    assert f1_scores(np.zeros((3, 2)), np.ones((3, 2))) == dict(CP=0, CR=0, CF1=0, OP=0, OR=0, OF1=0)


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


# ----------------------------------------------------------------------------------------------------------------------
# readers

def square(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def tiny_coco(folder, n_images=3, size=20):
    """A COCO instances file with non-contiguous category ids (3, 7, 12), a crowd annotation, overlapping instances
    listed large-after-small, and an image without annotations."""
    os.makedirs(folder / "img", exist_ok=True)
    images = []
    for i in range(1, n_images + 1):
        Image.new("RGB", (size, size), (40 * i, 80, 120)).save(folder / "img" / f"{i}.jpg")
        images.append(dict(id=i, file_name=f"{i}.jpg", width=size, height=size))
    anns = [dict(id=1, image_id=1, category_id=7, segmentation=square(5, 5, 9, 9), area=16, bbox=[5, 5, 4, 4],
                 iscrowd=0),
            dict(id=2, image_id=1, category_id=3, segmentation=square(2, 2, 12, 12), area=100, bbox=[2, 2, 10, 10],
                 iscrowd=0),
            dict(id=3, image_id=1, category_id=12, segmentation=square(14, 14, 19, 19), area=25,
                 bbox=[14, 14, 5, 5], iscrowd=1),
            dict(id=4, image_id=2, category_id=12, segmentation=square(0, 0, 10, 10), area=100, bbox=[0, 0, 10, 10],
                 iscrowd=1)]  # image 3: no annotations
    cats = [dict(id=c, name=n) for c, n in [(12, "cup"), (3, "cat"), (7, "dog")]]
    path = folder / "instances.json"
    path.write_text(json.dumps(dict(images=images, annotations=anns, categories=cats)))
    return path


def test_coco_multi_hot(tmp_path):
    coco = load_coco(str(tiny_coco(tmp_path)), str(tmp_path / "img"))
    labels = multi_hot(coco, sorted(coco.cats))  # columns: ids 3, 7, 12
    assert labels.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]


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


# ----------------------------------------------------------------------------------------------------------------------
# end to end on the demo set, with the 32 px test ViT

@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    top = tmp_path_factory.mktemp("work")
    data.make_demo(str(top / "data" / "demo"))
    return top


def test_multilabel_end_to_end(demo_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(demo_dir)
    argv = ["--random-init", "--model", "vit_test", "--epochs", "2", "--workers", "0", "--cache", str(tmp_path / "c"),
            "--out", str(tmp_path / "ml.json")]
    assert probe_multilabel.main(argv) == 0
    assert "cached" not in capsys.readouterr().out
    result = json.loads((tmp_path / "ml.json").read_text())
    for k in ("mAP", "CP", "CR", "CF1", "OP", "OR", "OF1"):
        assert 0 <= result[k] <= 100, k
    assert result["mAP"] > 0 and result["img_size"] == 32
    assert probe_multilabel.main(argv[:-2] + ["--agg", "cls", "--epochs", "1"]) == 0  # features from the cache
    assert "cached features" in capsys.readouterr().out


def test_pretraining_checkpoint_sets_agg_and_size(demo_dir, tmp_path, monkeypatch):
    """Our checkpoint format: the probes take agg and img_size from its 'args' (2x img_size for segmentation)."""
    monkeypatch.chdir(demo_dir)
    torch.manual_seed(0)
    backbone = vit.create_vit("vit_test")
    torch.save({"model": backbone.state_dict(), "vit_config": backbone.config, "args": {"agg": "cls", "img_size": 16}},
               tmp_path / "ckpt.pt")
    common = [str(tmp_path / "ckpt.pt"), "--epochs", "1", "--workers", "0"]
    assert probe_multilabel.main(common + ["--cache", str(tmp_path / "c"), "--out", str(tmp_path / "ml.json")]) == 0
    result = json.loads((tmp_path / "ml.json").read_text())
    assert (result["agg"], result["img_size"]) == ("cls", 16)
    assert probe_segment.main(common + ["--out", str(tmp_path / "seg.json")]) == 0
    assert json.loads((tmp_path / "seg.json").read_text())["img_size"] == 32


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


# ----------------------------------------------------------------------------------------------------------------------
# errors: one line, exit code 2, before any long work

class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def error_of(main, argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


@pytest.mark.parametrize("main", [probe_multilabel.main, probe_segment.main])
def test_checkpoint_errors(main, tmp_path, capsys):
    assert "no such file" in error_of(main, [str(tmp_path / "missing.pt")], capsys)
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"model": RunsCode(marker)}, f, protocol=2)
    assert "weights_only" in error_of(main, [str(tmp_path / "evil.pt")], capsys)
    assert not marker.exists()
    torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(10, 8)}, tmp_path / "resnet.pt")
    assert "not a ViT" in error_of(main, [str(tmp_path / "resnet.pt")], capsys)
    deeper = vit.create_vit("vit_test", depth=3)  # a config that does not match the weights
    torch.save({"model": deeper.state_dict(), "vit_config": vit.CONFIGS["vit_test"], "args": {}}, tmp_path / "d.pt")
    assert "unexpected keys ['blocks.2." in error_of(main, [str(tmp_path / "d.pt")], capsys)
    assert "either CKPT" in error_of(main, [str(tmp_path / "resnet.pt"), "--random-init"], capsys)


def coco_flags(tmp_path, json_path):
    return ["--random-init", "--model", "vit_test", "--train-json", str(json_path), "--train-images",
            str(tmp_path / "img"), "--val-json", str(json_path), "--val-images", str(tmp_path / "img")]


@pytest.mark.parametrize("main, extra", [(probe_multilabel.main, []), (probe_segment.main, ["--dataset", "coco"])])
def test_coco_file_errors(main, extra, tmp_path, capsys):
    good = json.loads(tiny_coco(tmp_path).read_text())
    bad = tmp_path / "no_images.json"
    bad.write_text(json.dumps({k: v for k, v in good.items() if k != "images"}))
    assert "'images'" in error_of(main, coco_flags(tmp_path, bad) + extra, capsys)
    (tmp_path / "not.json").write_text("images: [1, 2]")
    assert "not JSON" in error_of(main, coco_flags(tmp_path, tmp_path / "not.json") + extra, capsys)
    os.remove(tmp_path / "img" / "2.jpg")
    err = error_of(main, coco_flags(tmp_path, tmp_path / "instances.json") + extra, capsys)
    assert "1 of 3 files missing" in err and "2.jpg" in err
    err = error_of(main, coco_flags(tmp_path, tmp_path / "gone.json") + extra, capsys)
    assert "gone.json" in err and "no such file" in err


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
    Image.new("P", (16, 20)).save(root / "SegmentationClass" / "b.png")  # transposed
    assert "b.jpg is 20x16 px but" in error_of(probe_segment.main, argv, capsys)


# ----------------------------------------------------------------------------------------------------------------------
# backbones from plain state dicts (timm / DINO layout) and the other way round

def save_demo_backbone(tmp_path):
    """A seeded vit_demo (width 128, 4 heads) saved as our checkpoint and as a plain state dict."""
    torch.manual_seed(3)
    backbone = vit.create_vit("vit_demo")
    torch.save({"model": backbone.state_dict(), "vit_config": backbone.config, "args": {"agg": "gap", "img_size": 64}},
               tmp_path / "ckpt.pt")
    torch.save(backbone.state_dict(), tmp_path / "plain.pt")
    return backbone


def test_plain_state_dict_gives_the_numbers_of_its_checkpoint(demo_dir, tmp_path, monkeypatch):
    """Width 128 is vit_demo's (4 heads), not 128/64 = 2 heads: both probes give the checkpoint's numbers."""
    monkeypatch.chdir(demo_dir)
    save_demo_backbone(tmp_path)
    results = {}
    for name in ("ckpt", "plain"):
        common = [str(tmp_path / f"{name}.pt"), "--epochs", "2", "--workers", "0", "--img-size", "64"]
        assert probe_multilabel.main(common + ["--agg", "gap", "--cache", str(tmp_path / f"c_{name}"),
                                               "--out", str(tmp_path / f"ml_{name}.json")]) == 0
        assert probe_segment.main(common[:-1] + ["128", "--out", str(tmp_path / f"seg_{name}.json")]) == 0
        results[name] = [json.loads((tmp_path / f"{k}_{name}.json").read_text()) for k in ("ml", "seg")]
    for k in ("mAP", "CF1", "OF1"):
        assert results["plain"][0][k] == results["ckpt"][0][k], k
    assert results["plain"][1]["mIoU"] == results["ckpt"][1]["mIoU"]


def test_head_count_of_a_plain_state_dict(tmp_path, monkeypatch):
    backbone = save_demo_backbone(tmp_path)
    model, _ = vit.load_backbone(str(tmp_path / "plain.pt"))
    assert model.num_heads == 4
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.forward_features(x), backbone.eval().forward_features(x))
    monkeypatch.setitem(vit.CONFIGS, "vit_demo_2h", dict(vit.CONFIGS["vit_demo"], num_heads=2))  # width now ambiguous
    with pytest.raises(ValueError, match="pass --model"):
        vit.load_backbone(str(tmp_path / "plain.pt"))
    assert vit.load_backbone(str(tmp_path / "plain.pt"), name="vit_demo")[0].num_heads == 4  # --model honoured
    assert vit.load_backbone(str(tmp_path / "plain.pt"), name="vit_demo_2h")[0].num_heads == 2
    with pytest.raises(ValueError, match="width 32"):
        vit.load_backbone(str(tmp_path / "plain.pt"), name="vit_test")
    with pytest.raises(ValueError, match="heads"):  # our checkpoint carries its config: a contradicting --model
        vit.load_backbone(str(tmp_path / "ckpt.pt"), name="vit_demo_2h")
    torch.save(vit.create_vit("vit_demo", embed_dim=96, num_heads=3).state_dict(), tmp_path / "w96.pt")
    with pytest.raises(ValueError, match="width 96.*pass --model"):
        vit.load_backbone(str(tmp_path / "w96.pt"))
    torch.save(vit.create_vit("vit_demo", embed_dim=192, num_heads=3).state_dict(), tmp_path / "tiny.pt")
    assert vit.load_backbone(str(tmp_path / "tiny.pt"))[0].num_heads == 3  # timm's ViT-Ti width: 64 channels a head


def test_timm_loads_our_checkpoint_as_documented(tmp_path):
    """The README's call: timm.create_model('vit_small_patch16_224', num_classes=0, checkpoint_path=ckpt) takes our
    pretraining checkpoint as it is ('model' holds the backbone in timm's layout) and gives our features."""
    timm = pytest.importorskip("timm", reason="timm is not installed (an optional peer, not a requirement)")
    torch.manual_seed(0)
    ours = vit.vit_small().eval()
    state = {"model": ours.state_dict(), "vit_config": ours.config, "heads": {}, "optimizer": {}, "step": 1,
             "epoch": 0, "args": {"model": "vit_small", "montage_r": [2, 7]}, "skipped": [],
             "rng": {"torch": torch.get_rng_state()}}
    torch.save(state, tmp_path / "ckpt.pt")
    theirs = timm.create_model("vit_small_patch16_224", num_classes=0, checkpoint_path=str(tmp_path / "ckpt.pt"))
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(theirs.eval().forward_features(x), ours.forward_features(x), atol=1e-5)
