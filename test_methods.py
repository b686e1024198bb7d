"""
Tests of methods.py and the two options of pretrain.py: ContrastiveCrop (--crop ccrop, METHOD.md 9) and the
MCL montage loss (--montage, METHOD.md 8). Naive loops as references; end-to-end runs in 1 process and under
torchrun with 2 (with resume).
"""
import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
import methods
import vit
from conftest import GUIDED, TINY, make_images, run_pretrain

# ------------------------------------------------------------------------------------------------------------
# ContrastiveCrop


def test_ccrop_schedule():
    def due(W, L):
        return [e for e in range(12) if methods.ccrop_due(e, W, L)]
    assert due(2, 3) == [2, 5, 8, 11] and due(1, 1) == list(range(1, 12)) and due(20, 20) == []
    # W = 0: ContrastiveCrop on the initial full boxes from the start, first update at L
    assert due(0, 4) == [4, 8]
    with pytest.raises(ValueError, match="--ccrop-every"):
        methods.ccrop_due(3, 1, 0)


def naive_box(heat, k, H, W):
    """Min-max normalise, bilinear upsampling written out (align_corners=False: src = max((dst + .5) * in/out
    - .5, 0)), then a scan for the first and last row / column holding a pixel > k."""
    h = np.asarray(heat, np.float64)
    if h.max() == h.min():
        return (0.0, 0.0, 1.0, 1.0)
    h = (h - h.min()) / (h.max() - h.min())

    def taps(d, out, n):
        s = max((d + 0.5) * n / out - 0.5, 0.0)
        i0 = int(math.floor(s))
        return i0, min(i0 + 1, n - 1), s - i0

    gh, gw = h.shape
    up = np.empty((H, W))
    for y in range(H):
        y0, y1, ly = taps(y, H, gh)
        for x in range(W):
            x0, x1, lx = taps(x, W, gw)
            up[y, x] = ((1 - ly) * ((1 - lx) * h[y0, x0] + lx * h[y0, x1]) +
                        ly * ((1 - lx) * h[y1, x0] + lx * h[y1, x1]))
    rows = [y for y in range(H) if up[y].max() > k]
    cols = [x for x in range(W) if up[:, x].max() > k]
    if not rows or not cols:
        return (0.0, 0.0, 1.0, 1.0)
    return rows[0] / H, cols[0] / W, (rows[-1] + 1) / H, (cols[-1] + 1) / W


def test_heat_to_box_matches_naive_scan():
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(6.0), torch.arange(5.0), indexing="ij")
    maps = [torch.rand(4, 4, generator=g), torch.rand(6, 5, generator=g) ** 4, torch.full((4, 4), 3.0),
            -((yy - 4.2) ** 2 + (xx - 1.0) ** 2) / 2,
            torch.zeros(6, 5).index_fill_(0, torch.tensor([2]), 1.0)]
    maps += [torch.exp(-((yy - c) ** 2 + (xx - d) ** 2) / s) for c, d,
             s in ((0, 0, 0.5), (5, 4, 2), (2, 3, 9))]
    seen = set()
    for heat in maps:
        for k in (0.0, 0.1, 0.5, 0.9):
            for out_hw in ((32, 32), (24, 36)):
                box = methods.heat_to_box(heat, k, out_hw)
                assert box == pytest.approx(naive_box(heat, k, *out_hw), abs=1e-7), (heat, k, out_hw)
                assert 0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1
                seen.add(box == (0.0, 0.0, 1.0, 1.0))
    assert seen == {True, False}
    batch = torch.stack([m for m in maps if m.shape == (6, 5)])
    assert torch.equal(methods.heat_to_boxes(batch, 0.1, (24, 36)),
                       torch.tensor([methods.heat_to_box(m, 0.1, (24, 36)) for m in batch]))
    with pytest.raises(ValueError, match="--ccrop-k"):
        methods.heat_to_box(maps[0], 1.0, (8, 8))


def identity_backbone():
    """vit_test whose blocks are identities, no position embedding, and whose patch embedding gives every
    channel the mean normalised pixel value + 1.986 (about 0 on black): the token_norm heat map is
    bright-patch indicator."""
    torch.manual_seed(0)
    b = vit.create_vit("vit_test")
    with torch.no_grad():
        for name, p in b.named_parameters():
            if name.endswith(("attn.proj.weight", "attn.proj.bias", "mlp.fc2.weight",
                              "mlp.fc2.bias", "pos_embed")):
                p.zero_()
        b.patch_embed.proj.weight.fill_(1 / (3 * 8 * 8))
        ratio = np.array(data.IMAGENET_MEAN) / np.array(data.IMAGENET_STD)
        b.patch_embed.proj.bias.fill_(float(np.mean(ratio)))
    return b.train()


def test_localise_finds_bright_squares(tmp_path):
    """One box per file in file order, each the heat_to_box of the bright tokens; an unreadable file keeps the
    full box; the backbone goes back to train mode."""
    files, expected = [], []
    for i, (t0, t1, l0, l1) in enumerate([(1, 3, 1, 3), (0, 1, 2, 4), (2, 4, 0, 1),
                                          (3, 4, 3, 4), (0, 4, 1, 2)]):
        img = np.zeros((32, 32, 3), np.uint8)
        img[8 * t0:8 * t1, 8 * l0:8 * l1] = 255
        files.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(img).save(files[-1])
        heat = torch.zeros(4, 4)
        heat[t0:t1, l0:l1] = 1
        expected.append(methods.heat_to_box(heat, 0.1, (32, 32)))
    files.append(str(tmp_path / "broken.png"))
    open(files[-1], "wb").write(b"not an image")
    expected.append((0.0, 0.0, 1.0, 1.0))
    b = identity_backbone()
    boxes = methods.localise(b, files, 32, "token_norm", 0.1, 4, 0, torch.device("cpu"))
    assert boxes.shape == (6, 4) and b.training
    assert torch.allclose(boxes, torch.tensor(expected)), (boxes, expected)
    # the bilinear ramp reaches k = 0.1 5 px before the square
    assert expected[0] == (5 / 32, 5 / 32, 27 / 32, 27 / 32)
    for kind in methods.HEATS:  # every heat map gives valid boxes on a real (random) model
        h = methods.heat_maps(vit.create_vit("vit_test"), torch.randn(3, 3, 32, 32), kind)
        assert h.shape == (3, 4, 4) and torch.isfinite(h).all()


def test_ccrop_warmup_switch_reaches_persistent_workers(tmp_path):
    """TwoViews(ccrop_warmup=W): plain RRC (the same draws as boxes=None) before epoch W, ContrastiveCrop from
    W on; an in-place update of the shared boxes reaches persistent loader workers, as in pretrain.py."""
    make_images(tmp_path, n=4, size=100)
    files = sorted(str(p) for p in tmp_path.iterdir())
    boxes = torch.tensor([[0.0, 0.0, 0.05, 0.05]]).repeat(4, 1).share_memory_()
    ds = data.TwoViews(files, img_size=8, scale=(0.02, 0.05), boxes=boxes, ccrop_warmup=2)
    rrc = data.TwoViews(files, img_size=8, scale=(0.02, 0.05))
    sampler = data.EpochSampler(4, 4)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, sampler=sampler, num_workers=2,
                                         persistent_workers=True, collate_fn=data.two_view_batch)
    for epoch in range(4):
        ds.set_epoch(epoch), rrc.set_epoch(epoch), sampler.set_epoch(epoch)
        if epoch == 3:
            boxes[:] = torch.tensor([0.95, 0.95, 1.0, 1.0])
        batch = next(iter(loader))
        ref = torch.stack([rrc[i]["box1"] for i in batch["index"].tolist()])
        top, left, h, w = batch["box1"].T
        H, W = batch["size"].T
        assert ((top >= 0) & (left >= 0) & (top + h <= H) & (left + w <= W)).all()
        if epoch < 2:
            assert torch.equal(batch["box1"], ref), epoch
        elif epoch == 2:
            assert not torch.equal(batch["box1"], ref) and (top <= 5).all() and (left <= 5).all()
        else:
            assert (top + h >= H - 1).all() and (left + w >= W - 1).all()


def test_ccrop_centres_through_two_views(tmp_path):
    """Crop centres of TwoViews with a box (0.25, 0.25, 0.75, 0.75) on a 100 x 100 image (small crops, so no
    clamping):
    u = (top - ch0) / 50 ~ floor(50 Beta(a, a)) / 50. alpha = 1: uniform (KS distance < 0.065 = 1% critical
    value 0.041 at n = 1600 + the 1/50 grid); alpha = 0.3: U-shaped, P(|u - 0.5| > 0.4) ~ 0.57 (uniform:
    0.18)."""
    make_images(tmp_path, n=1, size=100)
    path = str(next(tmp_path.iterdir()))
    box = torch.tensor([[0.25, 0.25, 0.75, 0.75]])
    us = {}
    for alpha in (1.0, 0.3):
        ds = data.TwoViews([path], img_size=4, scale=(0.02, 0.05), seed=1, boxes=box, ccrop_alpha=alpha)
        u = []
        for epoch in range(400):
            ds.set_epoch(epoch)
            out = ds[0]
            for k in (1, 2):
                top, left, h, w = out[f"box{k}"].tolist()
                assert 0 <= top and top + h <= 100 and 0 <= left and left + w <= 100
                u += [(top - (25 - h // 2)) / 50, (left - (25 - w // 2)) / 50]
        us[alpha] = np.sort(u)
        assert us[alpha].min() >= 0 and us[alpha].max() < 1
    u = us[1.0]
    assert np.abs(u - np.arange(1, len(u) + 1) / len(u)).max() < 0.065
    assert np.mean(np.abs(us[0.3] - 0.5) > 0.4) > 0.45 > 0.25 > np.mean(np.abs(u - 0.5) > 0.4)

# ------------------------------------------------------------------------------------------------------------
# MCL montage


@pytest.mark.parametrize("B,S,r", [(5, 16, 2), (3, 16, 4), (7, 12, 1), (9, 24, 3)])
def test_assemble_montage_matches_naive_loop(B, S, r):
    views = torch.randn(B, 3, S, S, generator=torch.Generator().manual_seed(B))
    canvases, labels = methods.assemble_montage(views, r, torch.Generator().manual_seed(7))
    n, c = max(1, math.ceil(B / r ** 2)), S // r
    assert canvases.shape == (n, 3, S, S) and labels.shape == (n, r * r) and labels.dtype == torch.int64
    g = torch.Generator().manual_seed(7)  # replay the documented draws
    src = torch.randperm(r * r * n, generator=g) % B
    u = torch.rand(4, r * r * n, generator=g, dtype=torch.float64).tolist()
    lo = max(c, math.ceil(S / 2))
    for q in range(r * r * n):
        s = min(S, lo + math.floor(u[0][q] * (S - lo + 1)))
        top, left = math.floor(u[1][q] * (S - s + 1)), math.floor(u[2][q] * (S - s + 1))
        crop = views[src[q], :, top:top + s, left:left + s]
        crop = crop.flip(-1) if u[3][q] < 0.5 else crop
        ref = F.interpolate(crop[None], size=(c, c), mode="bilinear", align_corners=False)[0]
        i, (row, col) = q // (r * r), divmod(q % (r * r), r)
        assert labels[i, q % (r * r)] == src[q]
        assert torch.allclose(canvases[i, :, row * c:(row + 1) * c, col * c:(col + 1) * c], ref, atol=1e-5), q
    counts = torch.bincount(labels.flatten(), minlength=B)
    assert counts.max() - counts.min() <= 1  # every source used about equally
    with pytest.raises(ValueError, match="--montage-r"):
        methods.assemble_montage(views, 5, g)


def test_block_attn_mask_isolates_cells():
    for grid, r in ((4, 2), (6, 3), (4, 1), (4, 4)):
        m = methods.block_attn_mask(grid, r)
        T, k = grid * grid, grid // r
        cell = [(t // grid // k) * r + (t % grid) // k for t in range(T)]
        ref = [[i == 0 or (j > 0 and cell[i - 1] == cell[j - 1]) for j in range(1 + T)] for i in range(1 + T)]
        assert m.dtype == torch.bool and torch.equal(m, torch.tensor(ref))
    with pytest.raises(ValueError, match="--montage-r"):
        methods.block_attn_mask(4, 3)
    torch.manual_seed(0)
    model = vit.create_vit("vit_test")  # 4 x 4 tokens of 8 px, r = 2: cells of 2 x 2 tokens = 16 x 16 px
    x = torch.randn(2, 3, 32, 32)
    y = x.clone()
    y[:, :, :16, 16:] = torch.randn(2, 3, 16, 16)  # new pixels in cell 1 (top right)
    mask = methods.block_attn_mask(4, 2)
    a, b = model.forward_features(x, attn_mask=mask), model.forward_features(y, attn_mask=mask)
    moved = (a - b).abs().amax((0, 2))  # per token, CLS first
    cell1 = [1 + t for t in range(16) if (t // 4) < 2 and (t % 4) >= 2]
    others = [1 + t for t in range(16) if 1 + t not in cell1]
    assert moved[others].max() == 0 and moved[cell1].min() > 1e-3 and moved[0] > 1e-3  # CLS sees every cell
    free = (model.forward_features(x) - model.forward_features(y)).abs().amax((0, 2))
    assert free[others].min() > 1e-4  # without the mask every token sees the change
    e_a, e_b = methods.cell_means(a[:, 1:], 4, 2), methods.cell_means(b[:, 1:], 4, 2)
    assert torch.equal(e_a.view(2, 4, -1)[:, [0, 2, 3]], e_b.view(2, 4, -1)[:, [0, 2, 3]])
    assert torch.allclose(e_a[0], a[0, [1, 2, 5, 6]].mean(0))


# ------------------------------------------------------------------------------------------------------------
# end to end


def read_log(out):
    return [json.loads(line) for line in open(out / "log.jsonl")]


def test_ccrop_run_one_process(tmp_path):
    images = make_images(tmp_path / "imgs")
    out = tmp_path / "run"
    r = run_pretrain(TINY + GUIDED + [
        "--data", images, "--batch-size", "8", "--max-steps", "4", "--out-dir",
        str(out), "--crop", "ccrop", "--ccrop-warmup", "1", "--ccrop-every", "1", "--ccrop-heat", "token_norm"
    ])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ccrop: new boxes at epoch 1" in r.stdout and "epoch 2" not in r.stdout  # 2 steps an epoch
    boxes = torch.load(out / "ckpt.pt", weights_only=True)["ccrop_boxes"]
    assert boxes.shape == (16, 4) and (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 1).all()
    assert (boxes[:, :2] < boxes[:, 2:]).all()


def test_montage_run_one_process(tmp_path):
    images = make_images(tmp_path / "imgs")
    out = tmp_path / "run"
    r = run_pretrain(TINY + GUIDED + ["--data", images, "--batch-size", "8", "--max-steps", "2",
                                      "--out-dir", str(out),
                             "--montage", "--montage-r", "2", "4", "--montage-block-attn"])
    assert r.returncode == 0, r.stdout + r.stderr
    log = read_log(out)
    assert [rec["step"] for rec in log] == [1, 2] and all(rec["montage"] > 0 for rec in log)
    heads = torch.load(out / "ckpt.pt", weights_only=True)["heads"]
    assert any(k.startswith("montage_heads.1.") for k in heads)


def test_both_options_two_processes_and_resume(tmp_path):
    """torchrun, 2 processes, 2 steps an epoch: run to step 2 (warm-up epoch 0, boxes untouched), resume to
    step 3 (the boxes are computed at the start of epoch 1 from the step-2 weights, rank-sharded and
    gathered), resume to step 4 (mid-epoch: the checkpoint's boxes are restored, not recomputed). The boxes
    equal a one-process localisation."""
    images = make_images(tmp_path / "imgs")
    out = tmp_path / "run"
    argv = TINY + GUIDED + [
        "--data", images, "--batch-size", "4", "--out-dir",
        str(out), "--crop", "ccrop", "--ccrop-warmup", "1", "--ccrop-every", "1", "--ccrop-k", "0.6",
        "--montage", "--montage-r", "2", "4", "--montage-block-attn"
    ]
    stdout, boxes = [], []
    for steps in (2, 3, 4):
        r = run_pretrain(argv + ["--max-steps", str(steps)] + (["--resume"] if steps > 2 else []), nproc=2)
        assert r.returncode == 0, r.stdout + r.stderr
        stdout.append(r.stdout)
        boxes.append(torch.load(out / "ckpt.pt", weights_only=True)["ccrop_boxes"])
        if steps == 2:
            shutil.copy(out / "ckpt.pt", tmp_path / "step2.pt")
    assert ["ccrop: new boxes" in s for s in stdout] == [False, True, False]
    assert torch.equal(boxes[0], torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(16, 1))
    backbone, _ = vit.load_backbone(str(tmp_path / "step2.pt"))
    ref = methods.localise(backbone, data.list_images(images), 32, "cls_attn", 0.6, 8, 0, torch.device("cpu"))
    assert (ref != torch.tensor([0.0, 0.0, 1.0, 1.0])).any(1).sum() >= 8  # boxes differ between images
    assert len({tuple(b) for b in ref.tolist()}) >= 4 and torch.allclose(boxes[1], ref)
    assert torch.equal(boxes[2], boxes[1])
    log = read_log(out)
    assert [rec["step"] for rec in log] == [1, 2, 3, 4] and all(rec["montage"] > 0 for rec in log)


def test_montage_loss_matches_naive_loop():
    g = torch.Generator().manual_seed(0)
    cells = torch.randn(11, 6, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randn(5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 5, (11,), generator=g)
    tau = 0.3
    loss = methods.montage_loss(cells, targets, labels, tau)
    ref = 0
    for c in range(11):
        p = cells[c] / cells[c].norm()
        logits = [torch.dot(p, targets[j] / targets[j].norm()) / tau for j in range(5)]
        ref = ref - torch.log(torch.exp(logits[labels[c]]) / sum(torch.exp(v) for v in logits)) / 11
    assert torch.allclose(loss, ref, rtol=1e-12)
    ga = torch.autograd.grad(loss, (cells, targets))
    gb = torch.autograd.grad(ref, (cells, targets))
    assert all(torch.allclose(a, b, rtol=1e-10, atol=1e-12) for a, b in zip(ga, gb))
    assert ga[1].abs().sum() > 0  # the targets carry gradient
    with pytest.raises(ValueError, match="labels"):
        methods.montage_loss(cells, targets, labels + 5, tau)
    with pytest.raises(ValueError, match="labels"):
        methods.montage_loss(cells, targets, labels.int(), tau)
