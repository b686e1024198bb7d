"""probe_multilabel.py end to end on the demo set with the 32 px test ViT, our checkpoints and plain state
dicts, and its error paths (one `error: ...` line, exit code 2, nothing executed)."""
import json
import os
import pickle

import pytest
import torch

import probe_multilabel
import probe_segment
import vit
from conftest import RunsCode, error_of, labelled_images, save_demo_backbone, small_run, tiny_coco

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools")  # numpy-2 copy= notice

def test_multilabel_end_to_end(demo_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(demo_dir)
    argv = ["--random-init", "--model", "vit_test", "--epochs", "2", "--workers", "0", "--cache",
            str(tmp_path / "c"), "--out", str(tmp_path / "ml.json")]
    assert probe_multilabel.main(argv) == 0
    assert "cached" not in capsys.readouterr().out
    result = json.loads((tmp_path / "ml.json").read_text())
    for k in ("mAP", "CP", "CR", "CF1", "OP", "OR", "OF1"):
        assert 0 <= result[k] <= 100, k
    assert result["mAP"] > 0 and result["img_size"] == 32
    # features from the cache
    assert probe_multilabel.main(argv[:-2] + ["--agg", "cls", "--epochs", "1"]) == 0
    assert "cached features" in capsys.readouterr().out

def test_pretraining_checkpoint_sets_agg_and_size(demo_dir, tmp_path, monkeypatch):
    """Our checkpoint format: the probes take agg and img_size from its 'args' (2x img_size for
    segmentation)."""
    monkeypatch.chdir(demo_dir)
    torch.manual_seed(0)
    backbone = vit.create_vit("vit_test")
    torch.save({"model": backbone.state_dict(), "vit_config": backbone.config,
                "args": {"agg": "cls", "img_size": 16}},
               tmp_path / "ckpt.pt")
    common = [str(tmp_path / "ckpt.pt"), "--epochs", "1", "--workers", "0"]
    assert probe_multilabel.main(common + ["--cache", str(tmp_path / "c"),
                                           "--out", str(tmp_path / "ml.json")]) == 0
    result = json.loads((tmp_path / "ml.json").read_text())
    assert (result["agg"], result["img_size"]) == ("cls", 16)
    assert probe_segment.main(common + ["--out", str(tmp_path / "seg.json")]) == 0
    assert json.loads((tmp_path / "seg.json").read_text())["img_size"] == 32

def test_plain_state_dict_gives_the_numbers_of_its_checkpoint(demo_dir, tmp_path, monkeypatch):
    """Width 128 is vit_demo's (4 heads), not 128/64 = 2 heads: both probes give the checkpoint's numbers."""
    monkeypatch.chdir(demo_dir)
    save_demo_backbone(tmp_path)
    results = {}
    for name in ("ckpt", "plain"):
        common = [str(tmp_path / f"{name}.pt"), "--epochs", "1", "--workers", "0", "--img-size", "32"]
        assert probe_multilabel.main(common + ["--agg", "gap", "--cache", str(tmp_path / f"c_{name}"),
                                               "--out", str(tmp_path / f"ml_{name}.json")]) == 0
        assert probe_segment.main(common + ["--out", str(tmp_path / f"seg_{name}.json")]) == 0
        results[name] = [json.loads((tmp_path / f"{k}_{name}.json").read_text()) for k in ("ml", "seg")]
    for k in ("mAP", "CF1", "OF1"):
        assert results["plain"][0][k] == results["ckpt"][0][k], k
    assert results["plain"][1]["mIoU"] == results["ckpt"][1]["mIoU"]


@pytest.mark.parametrize("main", [probe_multilabel.main, probe_segment.main])
def test_checkpoint_errors(main, tmp_path, capsys):
    assert "no such file" in error_of(main, [str(tmp_path / "missing.pt")], capsys)
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"model": RunsCode(marker)}, f, protocol=2)
    assert "weights_only" in error_of(main, [str(tmp_path / "evil.pt")], capsys)
    assert not marker.exists()
    torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(10, 8)},
               tmp_path / "resnet.pt")
    assert "not a ViT" in error_of(main, [str(tmp_path / "resnet.pt")], capsys)
    deeper = vit.create_vit("vit_test", depth=3)  # a config that does not match the weights
    torch.save({"model": deeper.state_dict(), "vit_config": vit.CONFIGS["vit_test"], "args": {}},
               tmp_path / "d.pt")
    assert "unexpected keys ['blocks.2." in error_of(main, [str(tmp_path / "d.pt")], capsys)
    assert "either CKPT" in error_of(main, [str(tmp_path / "resnet.pt"), "--random-init"], capsys)

def coco_flags(tmp_path, json_path):
    return ["--random-init", "--model", "vit_test", "--train-json", str(json_path), "--train-images",
            str(tmp_path / "img"), "--val-json", str(json_path), "--val-images", str(tmp_path / "img")]

@pytest.mark.parametrize("main, extra", [(probe_multilabel.main, []),
                                         (probe_segment.main, ["--dataset", "coco"])])
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


def test_probes_refuse_bad_inputs(tmp_path, capsys):
    _, out = small_run(tmp_path)
    good = torch.load(out / "ckpt.pt", weights_only=True)
    good["model"]["norm.weight"][0] = float("inf")
    torch.save(good, tmp_path / "inf.pt")
    assert probe_multilabel.main([str(tmp_path / "inf.pt")]) == 2
    assert "non-finite" in capsys.readouterr().err
    coco = {"annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 4, 4], "area": 16,
                             "iscrowd": 0, "segmentation": [[0, 0, 4, 0, 4, 4]]}],
            "categories": [{"id": 1, "name": "thing"}]}  # a COCO file without its "images" list
    (tmp_path / "no_images.json").write_text(json.dumps(coco))
    args = [str(out / "ckpt.pt"), "--train-json", str(tmp_path / "no_images.json"),
            "--train-images", str(tmp_path),
            "--val-json", str(tmp_path / "no_images.json"), "--val-images", str(tmp_path), "--out",
            str(tmp_path / "res.json")]
    assert probe_multilabel.main(args) == 2
    err = capsys.readouterr().err
    assert "images" in err and "Traceback" not in err
    assert not (tmp_path / "res.json").exists()


def break_images(folder, names):
    """Two kinds of unreadable file in place of real images: a header cut after 100 bytes, and text."""
    (folder / names[0]).write_bytes((folder / names[0]).read_bytes()[:100])
    (folder / names[1]).write_text("not an image")
    return [str(folder / n) for n in names]


def test_unreadable_images_are_skipped_as_if_absent(tmp_path, capsys):
    """A cut and a non-image file in a COCO set: the multi-label probe names them, goes on, and scores what a
    run on the same file without those two images scores (same mAP, same counts)."""
    path = labelled_images(tmp_path / "coco", n=12, size=32)
    spec = json.loads(open(path).read())
    bad = break_images(tmp_path / "coco" / "train", [spec["images"][2]["file_name"], spec["images"][6]["file_name"]])
    gone = {spec["images"][2]["id"], spec["images"][6]["id"]}
    kept = dict(spec, images=[i for i in spec["images"] if i["id"] not in gone],
                annotations=[a for a in spec["annotations"] if a["image_id"] not in gone])
    (tmp_path / "kept.json").write_text(json.dumps(kept))
    results = []
    for k, js in enumerate([path, str(tmp_path / "kept.json")]):
        argv = ["--random-init", "--model", "vit_test", "--epochs", "30", "--workers", "0", "--cache",
                str(tmp_path / f"c{k}"), "--out", str(tmp_path / f"ml{k}.json")]
        for split in ("train", "val"):
            argv += [f"--{split}-json", js, f"--{split}-images", str(tmp_path / "coco" / "train")]
        assert probe_multilabel.main(argv) == 0
        results.append(json.loads((tmp_path / f"ml{k}.json").read_text()))
    assert "skipped 2 of 12 images" in capsys.readouterr().err
    assert results[0]["skipped"] == bad + bad and results[1]["skipped"] == []
    assert (results[0]["n_train"], results[0]["n_val"]) == (results[1]["n_train"], results[1]["n_val"]) == (10, 10)
    assert results[0]["mAP"] == results[1]["mAP"] and results[0]["OF1"] == results[1]["OF1"]
