"""
Tests of the oracle's token classes (methods.py, --oracle-negatives, METHOD.md 4.8): token_labels by hand, the
class masks of a demo-layout set and of a COCO json (against the demo's PNGs), the shuffled control replayable, and pretrain.py end to end with the oracle, its control and
--oracle-stuff.
"""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import data
import methods
import pretrain
from conftest import TINY, error_of, losses_by_step, make_images


def test_token_labels_hand_computed():
    """Image 1 (6x8, pixel value 10*row + col, one void pixel), view 1 box (top 1, left 2, h 4, w 6), grid 2:
    token centres at rows 1 + (1, 3)*4 // 4 = 2, 4 and columns 2 + (1, 3)*6 // 4 = 3, 6; view 2 the whole
    image, flipped: rows (1, 3)*6 // 4 = 1, 4, columns (1, 3)*8 // 4 = 2, 6, mirrored. Image 0 (5x5) in
    between, in the batch order view 1 of every image, then view 2."""
    big = (torch.arange(6)[:, None] * 10 + torch.arange(8)).to(torch.uint8)
    big[4, 6] = 255
    small = torch.full((5, 5), 3, dtype=torch.uint8)
    small[3, 1], small[4, 1] = 5, 4
    batch = {"index": torch.tensor([1, 0]), "size": torch.tensor([[6, 8], [5, 5]]),
             "box1": torch.tensor([[1., 2., 4., 6.], [0., 0., 5., 5.]]), "flip1": torch.tensor([False, False]),
             "box2": torch.tensor([[0., 0., 6., 8.], [1., 0., 4., 4.]]), "flip2": torch.tensor([True, True])}
    got = methods.token_labels([small, big], batch, 2)
    # image 0 (3 but 5 at (3, 1) and 4 at (4, 1)), view 1: rows and columns (1, 3)*5 // 4 = 1, 3; view 2:
    # rows 1 + (1, 3)*4 // 4 = 2, 4, columns (1, 3)*4 // 4 = 1, 3 -> [[3, 3], [4, 3]], mirrored
    want = torch.tensor([[23, 26, 43, -1], [3, 3, 5, 3], [16, 12, -1, 42], [3, 3, 3, 4]])
    assert torch.equal(got, want)
    # masks kept at every 2nd pixel: pixel (y, x) reads the full mask at (2 (y // 2), 2 (x // 2)); image 1,
    # view 1: rows 2, 4 and columns 2, 6 (void); view 2: rows 0, 4 and columns 2, 6, mirrored; image 0: 3
    want2 = torch.tensor([[22, 26, 42, -1], [3, 3, 3, 3], [6, 2, -1, 42], [3, 3, 3, 3]])
    assert torch.equal(methods.token_labels([small[::2, ::2], big[::2, ::2]], batch, 2, stride=2), want2)
    batch["size"][0] = torch.tensor([8, 6])
    with pytest.raises(ValueError, match="oracle-negatives"):
        methods.token_labels([small, big], batch, 2)


def test_oracle_labels_of_a_demo_set(tmp_path):
    """class_masks reads each image's palette PNG of a demo-layout set; OracleLabels pairs every batch with
    its own labels however far ahead the loader is read; an image without a mask is an error naming the
    flag."""
    import demo
    root = demo.make_demo(str(tmp_path / "demo"), n_train=4, n_val=1)
    files = data.list_images(f"{root}/images/train")
    masks = methods.class_masks(files)
    png = np.array(Image.open(f"{root}/voc/SegmentationClass/000002.png"))
    assert len(masks) == 4 and masks[1].shape == (96, 96) and np.array_equal(masks[1].numpy(), png)
    assert set(np.unique(png)) - {0, 255} and 255 in png
    views = data.TwoViews(files, img_size=32, seed=0)
    batches = [data.two_view_batch([views[i], views[(i + 1) % 4]]) for i in (0, 2)]
    oracle = methods.OracleLabels(files, 4)
    tapped = list(oracle.tap(batches))  # the loader read to the end first
    assert tapped == batches
    for batch in batches:
        labels = oracle.next()
        assert labels.shape == (4, 16) and torch.equal(labels, methods.token_labels(masks, batch, 4))
    with pytest.raises(ValueError, match="--oracle-negatives"):
        methods.class_masks(data.list_images(make_images(tmp_path / "plain", n=2)))


def test_oracle_labels_of_a_coco_json_match_the_demo_masks(tmp_path, capsys):
    """--data a COCO instances .json: CocoClassMasks makes each image's class mask from its annotations
    (probing.coco_mask, the categories numbered in id order as the demo's PNGs number them). At stride 1 every
    token has the PNG's class wherever both know one (the PNG's void band and the json's crowd regions are -1 on
    one side only); at stride 4 the label of the pixel at the start of its 4x4 cell; OracleLabels reads them."""
    import demo
    root = demo.make_demo(str(tmp_path / "demo"), n_train=8, n_val=1)
    json_path = f"{root}/annotations/instances_train.json"
    files = data.list_images(json_path)
    assert files == data.list_images(f"{root}/images/train")
    views = data.TwoViews(files, img_size=32, seed=0)
    batch = data.two_view_batch([views[i] for i in range(8)])
    png = methods.token_labels(methods.class_masks(files), batch, 4)
    full = methods.CocoClassMasks(json_path, files, stride=1)
    coco = methods.token_labels(full, batch, 4)
    both = (png >= 0) & (coco >= 0)
    assert both.float().mean() > 0.8 and len(png[both].unique()) > 2
    assert torch.equal(coco[both], png[both])
    quarter = methods.CocoClassMasks(json_path, files)
    assert quarter.stride == 4 and torch.equal(quarter[3], full[3][::4, ::4]) and quarter[3].shape == (24, 24)
    oracle = methods.OracleLabels(files, 4, coco_json=json_path)
    list(oracle.tap([batch]))
    assert torch.equal(oracle.next(), methods.token_labels(quarter, batch, 4, stride=4))
    with pytest.raises(ValueError, match="names 8 images, --data 7"):
        methods.CocoClassMasks(json_path, files[:7])
    # the clutter set: its stuff (stuff_train.json) are classes 9..13 of the PNGs, after the 8 things
    clutter = demo.make_demo(str(tmp_path / "clutter"), n_train=8, n_val=1, clutter=True)
    cfiles = data.list_images(f"{clutter}/annotations/instances_train.json")
    cviews = data.TwoViews(cfiles, img_size=32, seed=0)
    cbatch = data.two_view_batch([cviews[i] for i in range(8)])
    png = methods.token_labels(methods.class_masks(cfiles), cbatch, 4)
    coco = methods.token_labels(methods.CocoClassMasks(f"{clutter}/annotations/instances_train.json", cfiles,
                                                       stride=1, stuff_json=f"{clutter}/annotations/stuff_train.json"),
                                cbatch, 4)
    both = (png >= 0) & (coco >= 0)
    assert both.float().mean() > 0.8 and (png[both] > 8).sum() > 20 and torch.equal(coco[both], png[both])
    with pytest.raises(ValueError, match="no id in both"):
        methods.CocoClassMasks(json_path, files, stuff_json=json_path)
    # a wrong size in the json: that image's tokens unknown (both views), the others as before, the file named
    with open(json_path) as f:
        d = json.load(f)
    d["images"][2]["width"] = 95
    with open(json_path, "w") as f:
        json.dump(d, f)
    oracle = methods.OracleLabels(files, 4, coco_json=json_path)
    list(oracle.tap([batch]))
    want = methods.token_labels(quarter, batch, 4, stride=4)
    want[[2, 10]] = -1
    assert torch.equal(oracle.next(), want) and oracle.unfit == {2}
    assert "000003.jpg cannot be made or is not the size of the image" in capsys.readouterr().err


def test_oracle_shuffle_permutes_each_steps_labels_replayably(tmp_path):
    """--oracle-shuffle: next(step) is the oracle's labels of the batch permuted across its tokens (the same
    multiset of labels, other positions), the same permutation for the same (seed, step), as after a resume,
    another one for another step."""
    import demo
    root = demo.make_demo(str(tmp_path / "demo"), n_train=4, n_val=1)
    files = data.list_images(f"{root}/images/train")
    views = data.TwoViews(files, img_size=32, seed=0)
    batch = data.two_view_batch([views[i] for i in range(4)])
    plain, shuffled, again = (methods.OracleLabels(files, 4, seed) for seed in (None, 7, 7))
    out = {}
    for name, oracle in (("plain", plain), ("shuffled", shuffled), ("again", again)):
        list(oracle.tap([batch, batch]))
        out[name] = [oracle.next(step) for step in (5, 6)]
    truth = methods.token_labels(methods.class_masks(files), batch, 4)
    assert torch.equal(out["plain"][0], truth) and len(truth.unique()) > 2
    for k in (0, 1):
        assert torch.equal(out["shuffled"][k], out["again"][k]) and out["shuffled"][k].shape == truth.shape
        assert torch.equal(out["shuffled"][k].flatten().sort().values, truth.flatten().sort().values)
        assert not torch.equal(out["shuffled"][k], truth)
    assert not torch.equal(out["shuffled"][0], out["shuffled"][1])
    g = torch.Generator().manual_seed(7 * 1_000_003 + 6)
    assert torch.equal(out["shuffled"][1], truth.flatten()[torch.randperm(truth.numel(), generator=g)].view(8, 16))


def test_oracle_and_its_shuffled_control_end_to_end(tmp_path, capsys):
    """--oracle-negatives on a demo-layout set reaches the loss from pretrain.py (the first step's loss differs
    from the same run without it), and --oracle-shuffle, its control, gives a third first-step loss. The same
    images given as their COCO json: the same plain run, and the oracle reads the json's annotations."""
    import demo
    root = demo.make_demo(str(tmp_path / "demo"), n_train=8, n_val=1)
    first, folder, json_path = {}, f"{root}/images/train", f"{root}/annotations/instances_train.json"
    for name, images, flags in (("plain", folder, []), ("oracle", folder, ["--oracle-negatives"]),
                                ("shuffled", folder, ["--oracle-negatives", "--oracle-shuffle"]),
                                ("coco plain", json_path, []), ("coco oracle", json_path, ["--oracle-negatives"])):
        out = tmp_path / name
        assert pretrain.main(TINY + ["--data", images, "--batch-size", "4", "--max-steps", "1",
                                     "--neg", "random", "--N", "0", "--out-dir", str(out)] + flags) == 0
        first[name] = losses_by_step(out)[1]
    assert "oracle_negatives=True oracle_shuffle=True" in capsys.readouterr().out
    assert len({first["plain"], first["oracle"], first["shuffled"]}) == 3, first
    assert first["coco plain"] == first["plain"] and first["coco oracle"] != first["plain"], first
    base = TINY + ["--batch-size", "4", "--max-steps", "1", "--neg", "random", "--N", "0"]
    stuff = ["--oracle-stuff", json_path]  # (the flag's checks; its classes: test_oracle.py)
    assert "--oracle-negatives" in error_of(pretrain.main, base + ["--data", json_path, "--out-dir",
                                                                   str(tmp_path / "e1")] + stuff, capsys)
    assert "not to a folder" in error_of(pretrain.main, base + ["--data", folder, "--out-dir", str(tmp_path / "e2"),
                                                                "--oracle-negatives"] + stuff, capsys)
