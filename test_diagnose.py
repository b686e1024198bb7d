"""diagnose.py: the true correspondence of two crops against hand computations (flips included) and against
the pixels of real data.TwoViews views, matching accuracy 1 for features that encode the image position,
hubness, DINO's thresholded attention and the Jaccard on hand examples, and a run end to end against a naive
loop."""
import json
import math

import numpy as np
import pytest
import torch

import data
import demo
import diagnose
import probing
import vit
from conftest import error_of, save_demo_backbone

pytestmark = pytest.mark.filterwarnings('ignore:__array__ implementation:DeprecationWarning')  # pycocotools


def corr(box1, flip1, box2, flip2, grid):
    return diagnose.token_correspondence(torch.tensor([box1], dtype=torch.float32), torch.tensor([flip1]),
                                         torch.tensor([box2], dtype=torch.float32), torch.tensor([flip2]),
                                         grid)[0].tolist()


def test_token_correspondence_by_hand():
    # view 1 = image [0, 64)^2, view 2 = [16, 48)^2, 4x4 tokens: view-1 token centres at 8, 24, 40, 56 px; in
    # view 2 at u2 = (x - 16) / 32 = -0.25, 0.25, 0.75, 1.25: columns -, 1, 3, - (rows alike)
    box1, box2 = (0, 0, 64, 64), (16, 16, 32, 32)
    want = [-1] * 16
    want[5], want[6], want[9], want[10] = 5, 7, 13, 15
    assert corr(box1, False, box2, False, 4) == want
    # view 2 mirrored: column c of the unflipped view 2 is column 3 - c
    want[5], want[6], want[9], want[10] = 6, 4, 14, 12
    assert corr(box1, False, box2, True, 4) == want
    # view 1 mirrored: its token (1, 1) sits at u = 1 - 0.375 (x = 40 px) -> column 3 of view 2
    want[5], want[6], want[9], want[10] = 7, 5, 15, 13
    assert corr(box1, True, box2, False, 4) == want
    want[5], want[6], want[9], want[10] = 4, 6, 12, 14
    assert corr(box1, True, box2, True, 4) == want
    # a wide view 1 (top 10, left 20, h 40, w 80) into a wide view 2 (top 0, left 30, h 30, w 60), 2x2 tokens:
    # centres x = 40, 80 -> u2 = 1/6, 5/6 (columns 0, 1); y = 20, 40 -> v2 = 2/3, 4/3 (row 1, outside)
    assert corr((10, 20, 40, 80), False, (0, 30, 30, 60), False, 2) == [2, 3, -1, -1]
    # the reverse direction: view-2 centres x = 45, 75 -> u1 = 0.3125, 0.6875; y = 7.5, 22.5 -> v1 < 0, 0.3125
    assert corr((0, 30, 30, 60), False, (10, 20, 40, 80), False, 2) == [-1, -1, 0, 1]


def test_token_correspondence_on_twoviews_pixels(tmp_path):
    """On real data.TwoViews samples of an image whose colour encodes the pixel position (R = x, G = y), the
    token of view 2 named by token_correspondence shows (within a token) the image point of view 1's token."""
    from PIL import Image
    yy, xx = np.mgrid[0:200, 0:240]
    img = np.stack([xx * 255 / 239, yy * 255 / 199, np.full_like(xx, 128.0)], -1).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / 'pos.png')
    views, grid, S, flips = data.TwoViews([str(tmp_path / 'pos.png')] * 24, 32, seed=3), 4, 32, set()
    for i in range(24):
        s = views[i]
        truth = diagnose.token_correspondence(s['box1'][None], s['flip1'][None], s['box2'][None],
                                              s['flip2'][None], grid)[0]
        flips.add((bool(s['flip1']), bool(s['flip2'])))
        # each token's colour -> image position (x, y) of its pixels' mean
        pos = [v.float().view(3, grid, S // grid, grid, S // grid).mean((2, 4))[:2].flatten(1).T
               * torch.tensor([239 / 255, 199 / 255]) for v in (s['view1'], s['view2'])]
        cell = torch.stack([s['box2'][3] / grid, s['box2'][2] / grid])  # a view-2 token in image pixels
        for t in torch.nonzero(truth >= 0).flatten().tolist():
            assert ((pos[0][t] - pos[1][truth[t]]).abs() <= cell / 2 + 1.5).all()
    assert len(flips) == 4


def position_features(box, flip, grid, scale=0.02):
    """Token features that encode the image position (x, y) of each token's centre: (cos ax, sin ax, cos ay,
    sin ay), whose cosine (cos a dx + cos a dy) / 2 falls with |dx| and |dy| separately (a |d| < pi)."""
    c = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid
    u, v = c.repeat(grid), c.repeat_interleave(grid)
    u = 1 - u if flip else u
    x, y = box[1] + box[3] * u, box[0] + box[2] * v
    return torch.stack([torch.cos(scale * x), torch.sin(scale * x), torch.cos(scale * y),
                        torch.sin(scale * y)], -1)


def test_match_accuracy_one_for_position_features():
    g, grid = torch.Generator().manual_seed(0), 6
    boxes, flips = [], []
    for _ in range(16):  # RRC boxes on a 120 x 150 image and flips, as data.TwoViews draws them
        boxes.append([data.rrc_params(120, 150, (0.2, 1.0), (3 / 4, 4 / 3), g) for _ in range(2)])
        flips.append([bool(torch.rand((), generator=g) < 0.5) for _ in range(2)])
    box1, box2 = (torch.tensor([b[k] for b in boxes], dtype=torch.float32) for k in (0, 1))
    flip1, flip2 = (torch.tensor([f[k] for f in flips]) for k in (0, 1))
    f1 = torch.stack([position_features(b, f, grid) for b, f in zip(box1.double(), flip1)])
    f2 = torch.stack([position_features(b, f, grid) for b, f in zip(box2.double(), flip2)])
    s = diagnose.match_stats(f1, f2, box1, flip1, box2, flip2, grid)  # float64: exact argmax
    assert s['anchors'] == 2 * 16 * 36 and 0 < s['valid'] < s['anchors']
    # exact but for ties: 7 anchors' centres (4 + 3 in the two directions) fall on a border of two cells
    assert s['hits'] == s['valid'] and s['exact'] == s['valid'] - 7
    # views of view 1's size; view-2 features that encode the position one token lower-right (two tokens): in
    # both directions every match within one token (Chebyshev, not L1: diagonal), exact only at the borders;
    # two tokens off: not within one any more
    same = torch.cat([box2[:, :2], box1[:, 2:]], 1)
    for shift, within in ((1, True), (2, False)):
        moved = same.double() + shift * torch.cat([same[:, 2:], 0 * same[:, 2:]], 1).double() / grid
        f2_moved = torch.stack([position_features(b, f, grid) for b, f in zip(moved, flip2)])
        s1 = diagnose.match_stats(f1, f2_moved, box1, flip1, same, flip2, grid)
        assert s1['valid'] > 0 and (s1['hits'] == s1['valid']) == within and s1['exact'] < s1['valid'] / 2
    # a feature that ignores the flip of view 2 gets the mirrored columns: not all right any more
    f2_noflip = torch.stack([position_features(b, False, grid) for b in box2.double()])
    s = diagnose.match_stats(f1, f2_noflip, box1, flip1, box2, flip2, grid)
    assert s['hits'] < s['valid']
    # chance: the 3 x 3 neighbourhood (clipped at the border) over T, for the valid anchors, both directions
    def near(t):
        return (min(t // grid + 1, grid - 1) - max(t // grid - 1, 0) + 1) * (min(t % grid + 1, grid - 1)
                                                                           - max(t % grid - 1, 0) + 1)
    pairs = ((box1, flip1, box2, flip2), (box2, flip2, box1, flip1))
    want = sum(near(t) / 36 for p in pairs for t in diagnose.token_correspondence(*p, grid).flatten().tolist()
               if t >= 0)
    assert s['chance'] == pytest.approx(want)


def test_hub_share_by_hand():
    # 20 tokens: k = ceil(0.05 * 20) = 1; row 0: token 3 takes 6 of 20 matches; row 1: one-to-one
    j = torch.tensor([[3] * 6 + list(range(4, 18)), list(range(20))])
    assert diagnose.hub_share(j, 20).tolist() == pytest.approx([6 / 20, 1 / 20])
    # 64 tokens: k = 4; the four most-matched get 10 + 8 + 8 + 5 of 64; -1 (no truth) is not counted
    j = torch.tensor([[0] * 10 + [1] * 8 + [2] * 8 + [3] * 5 + [4] * 4 + list(range(5, 34)) + [-1] * 0])
    assert j.shape == (1, 64) and diagnose.hub_share(j, 64).item() == pytest.approx(31 / 64)
    j = torch.tensor([[5, 5, 5, -1, -1, 7, 8, 9] + [-1] * 12])
    assert diagnose.hub_share(j, 20).item() == pytest.approx(3 / 6)


def test_attention_threshold_and_jaccard_by_hand():
    # head 0: sorted ascending 0 x 3, .05, .05, .1, .1, .3, .4 -> cumulative .. .3, .6, 1.0: > 0.4 keeps the
    # .3 and the .4 (tokens 1 and 0; they hold 70% >= 60%); head 1 keeps .5 and .25 (tokens 1 and 5)
    attn = torch.tensor([[[0.4, 0.3, 0.1, 0.1, 0.05, 0.05, 0, 0, 0],
                          [0.05, 0.5, 0.2, 0, 0, 0.25, 0, 0, 0]]])
    keep = diagnose.attention_masks(attn * 0.5)  # the CLS share removed: rows sum to 0.5, normalised first
    assert [keep[0, h].nonzero().flatten().tolist() for h in (0, 1)] == [[0, 1], [1, 5]]
    objects = torch.zeros(9, dtype=torch.bool)
    objects[[1, 2, 5]] = True
    # head 0: {0, 1} & {1, 2, 5} = 1 of 4; head 1: {1, 5} = 2 of 3
    assert diagnose.jaccard(keep[0], objects[None]).tolist() == pytest.approx([1 / 4, 2 / 3])
    assert diagnose.jaccard(torch.zeros(2, dtype=torch.bool), torch.zeros(2, dtype=torch.bool)).item() == 0


def test_object_tokens_by_hand():
    mask = np.zeros((8, 8), bool)
    mask[0:2, 0:4] = True  # token 0 (4x4 px): 8 of 16 -> object
    mask[4:8, 4:7] = True  # token 3: 12 of 16 -> object
    mask[0:7, 4:5] = True  # token 1: 4 of 16 (+ 3 in token 3); not an object
    assert diagnose.object_tokens(mask, 2).tolist() == [True, False, False, True]
    mask[0, 0] = False  # token 0: 7 of 16
    assert diagnose.object_tokens(mask, 2).tolist() == [False, False, False, True]


def test_main_end_to_end(tmp_path, capsys):
    save_demo_backbone(tmp_path)
    root = demo.make_demo(str(tmp_path / 'set'), n_train=1, n_val=8)
    flags = ['--val-json', f'{root}/annotations/instances_val.json', '--val-images', f'{root}/images/val',
             '--workers', '0', '--batch-size', '3']
    out = tmp_path / 'diag.json'
    assert diagnose.main([str(tmp_path / 'ckpt.pt'), '--out', str(out)] + flags) == 0
    line = capsys.readouterr().out
    assert 'match_acc' in line and 'attn_jaccard' in line
    r = json.loads(out.read_text())
    assert r['img_size'] == 64 and r['grid'] == 8 and r['n_images'] == 8 and r['n_anchors'] == 2 * 8 * 64
    assert r['hub_share_one_to_one'] == 4 / 64 and len(r['attn_jaccard_per_head']) == 4
    for k in ('match_acc', 'match_exact', 'match_chance', 'outside', 'hub_share', 'attn_jaccard'):
        assert 0 <= r[k] <= 1
    assert r['match_exact'] <= r['match_acc'] and r['hub_share'] >= 4 / 64
    assert r['attn_jaccard'] == pytest.approx(float(np.mean(r['attn_jaccard_per_head'])))
    # attn_jaccard by a naive loop: per image with an object token, per head, the tokens in descending
    # attention while the ones before them hold < 60%; Jaccard with the tokens >= half covered by an
    # annotation
    from pycocotools.coco import COCO
    coco = COCO(f'{root}/annotations/instances_val.json')
    model = vit.load_backbone(str(tmp_path / 'ckpt.pt'))[0]
    per_head, covered, kept_share = [], [], []
    for img_id in sorted(coco.imgs):
        union = np.zeros((96, 96), bool)
        for a in coco.loadAnns(coco.getAnnIds(imgIds=img_id, iscrowd=None)):
            union |= coco.annToMask(a).astype(bool)
        objects = {r * 8 + c for r in range(8) for c in range(8)
                   if union[12 * r:12 * r + 12, 12 * c:12 * c + 12].sum() >= 72}  # 12 x 12 px a token
        covered.append(len(objects) / 64)
        image = probing.Images([f"{root}/images/val/{coco.imgs[img_id]['file_name']}"], 64)[0][0]
        row = []
        for attn in model.last_cls_attention(image[None])[0].double():
            attn, kept, before = attn / attn.sum(), set(), 0.0
            for t in attn.argsort(descending=True).tolist():
                if before < 0.6:
                    kept.add(t)
                before += attn[t].item()
            row.append(len(kept & objects) / len(kept | objects))
            kept_share.append(len(kept) / 64)
        if objects:
            per_head.append(row)
    assert r['n_jaccard_images'] == len(per_head) == 6  # of 8: one empty image, one without an object token
    assert r['object_token_share'] == pytest.approx(np.mean(covered))
    assert r['attn_token_share'] == pytest.approx(np.mean(kept_share))
    assert r['attn_jaccard_per_head'] == pytest.approx(np.mean(per_head, 0).tolist())
    # the same seed gives the same numbers
    assert diagnose.main([str(tmp_path / 'ckpt.pt'), '--out', str(tmp_path / 'again.json')] + flags) == 0
    again = json.loads((tmp_path / 'again.json').read_text())
    assert all(again[k] == r[k] for k in r if k != 'backbone')
    assert 'both --val-json' in error_of(diagnose.main, [str(tmp_path / 'ckpt.pt'), '--val-json', 'x.json'],
                                         capsys)
    assert '--img-size 60' in error_of(diagnose.main, [str(tmp_path / 'ckpt.pt'), '--img-size', '60'] + flags,
                                       capsys)
    assert math.isfinite(r['hub_share_truth'])
