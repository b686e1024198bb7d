"""Tests of data.py: python -m pytest -q test_data.py"""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image

import data
from data import EpochSampler, TwoViews, ccrop_params, list_images, load_rgb, rrc_params, two_view_batch

pytestmark = pytest.mark.filterwarnings('ignore:__array__ implementation:DeprecationWarning')  # pycocotools
SCALE, RATIO = (0.2, 1.0), (3 / 4, 4 / 3)


def noise_image(path, W, H, seed=0, smooth=False, **save_kw):
    """A random RGB image (smooth = upsampled 8x8 noise, so that resampling differences are small)."""
    g = torch.Generator().manual_seed(seed)
    if smooth:
        x = F.interpolate(torch.rand(1, 3, 8, 8, generator=g), size=(H, W), mode='bilinear',
                          align_corners=False)[0]
    else:
        x = torch.rand(3, H, W, generator=g)
    Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path, **save_kw)
    return str(path)


# ------------------------------------------------------------------------------------------------------------
# crop boxes


def test_rrc_params_matches_torchvision():
    g = torch.Generator().manual_seed(0)
    # these often hit the fallback
    extremes = [(1, 1), (1, 1000), (1000, 1), (3, 2000), (2000, 3), (2, 3), (10, 7)]
    for k in range(600):
        H, W = extremes[k % 7] if k % 2 else tuple(int(v) for v in torch.randint(1, 700, (2,), generator=g))
        torch.manual_seed(k)
        ref = T.RandomResizedCrop.get_params(Image.new('RGB', (W, H)), SCALE, RATIO)
        torch.manual_seed(k)
        assert rrc_params(H, W, SCALE, RATIO, torch.default_generator) == tuple(ref), (H, W, k)


def test_crop_boxes_inside_image():
    g = torch.Generator().manual_seed(1)
    sizes = [(1, 1), (1, 2), (2, 1), (1, 1000), (1000, 1), (3, 2000), (2000, 3), (7, 5)]
    sizes += [tuple(int(v) for v in torch.randint(1, 500, (2,), generator=g)) for _ in range(200)]
    for H, W in sizes:
        for _ in range(10):
            h0, h1 = sorted(torch.rand(2, generator=g).tolist())
            w0, w1 = sorted(torch.rand(2, generator=g).tolist())
            for top, left, h, w in (rrc_params(H, W, SCALE, RATIO, g),
                                    ccrop_params(H, W, (h0, w0, h1, w1), SCALE, RATIO, 0.6, g),
                                    ccrop_params(H, W, (0.0, 0.0, 1.0, 1.0), (0.08, 1.0), RATIO, 0.1, g)):
                assert 1 <= h and 1 <= w and 0 <= top and top + h <= H and 0 <= left and left + w <= W, \
                    (H, W, top, h)


def ccrop_positions(alpha, n=4000):
    """Normalised top positions u = (top - ch0) / (ch1 - ch0) in [0, 1] of ccrop_params on a 1000x1000
    image."""
    H = W = 1000
    box = (0.2, 0.3, 0.7, 0.9)
    g = torch.Generator().manual_seed(2)
    us = []
    for _ in range(n):
        top, left, h, w = ccrop_params(H, W, box, SCALE, RATIO, alpha, g)
        ch0, ch1 = (min(max(int(H * v) - h // 2, 0), H - h) for v in (box[0], box[2]))
        assert ch0 <= top <= ch1
        if ch1 - ch0 >= 50:  # skip crops so big that the box range collapses
            us.append((top - ch0) / (ch1 - ch0))
    return np.array(us)


def test_ccrop_params_both_axes_with_asymmetric_boxes():
    """ContrastiveCrop's formula, written out per axis, against ccrop_params with the same draws: boxes whose
    vertical and horizontal extents differ clearly, on images whose height and width differ (an axis mix-up
    cannot pass)."""
    from data import _beta, _rrc_size
    for k, (H, W, box) in enumerate([(300, 800, (0.05, 0.55, 0.35, 0.95)), (900, 250, (0.6, 0.0, 0.9, 0.3)),
                                     (480, 640, (0.1, 0.7, 0.2, 0.8))]):
        g, ref = torch.Generator().manual_seed(k), torch.Generator().manual_seed(k)
        for _ in range(200):
            top, left, h, w = ccrop_params(H, W, box, SCALE, RATIO, 0.6, g)
            rh, rw, ok = _rrc_size(H, W, SCALE, RATIO, ref)
            assert (h, w) == (rh, rw)
            if not ok:
                assert (top, left) == ((H - h) // 2, (W - w) // 2)
                continue
            ch0, ch1 = (min(max(int(H * v) - h // 2, 0), H - h) for v in (box[0], box[2]))
            cw0, cw1 = (min(max(int(W * v) - w // 2, 0), W - w) for v in (box[1], box[3]))
            assert top == ch0 + math.floor((ch1 - ch0) * _beta(0.6, ref))
            assert left == cw0 + math.floor((cw1 - cw0) * _beta(0.6, ref))


def test_ccrop_alpha1_is_uniform_in_the_box_range():
    u = np.sort(ccrop_positions(1.0))
    assert len(u) > 2000
    ks = np.abs(u - np.arange(1, len(u) + 1) / len(u)).max()  # Kolmogorov-Smirnov distance to U(0, 1)
    assert ks < 0.04, ks  # 1% critical value at n >= 2000 is 0.036; floor() adds <= 1/50
    assert abs(u.var() - 1 / 12) < 0.006


def test_ccrop_alpha_below_1_pushes_centres_to_the_box_edges():
    u = ccrop_positions(0.6)
    # Beta(a, a) variance 1/(4(2a+1)) = 0.114 vs 1/12 = 0.083
    assert abs(u.var() - 1 / (4 * (2 * 0.6 + 1))) < 0.008
    assert np.mean(np.abs(u - 0.5) > 0.4) > 0.25  # uniform: 0.2
    assert np.mean(np.abs(ccrop_positions(0.1) - 0.5) > 0.4) > 0.6

# ------------------------------------------------------------------------------------------------------------
# TwoViews


def test_two_views_shapes_boxes_and_flips(tmp_path):
    files = [noise_image(tmp_path / f'{k}.png', 120 + 13 * k, 90 + 7 * k, seed=k) for k in range(6)]
    ds = TwoViews(files, img_size=32, seed=3)
    flips = set()
    for i in range(len(ds)):
        out = ds[i]
        assert out['index'].item() == i and out['skipped'] == []
        ref = load_rgb(files[i])
        assert out['size'].tolist() == [ref.height, ref.width]
        for k in (1, 2):
            v = out[f'view{k}']
            assert v.dtype == torch.uint8 and v.shape == (3, 32, 32)
            top, left, h, w = map(int, out[f'box{k}'].tolist())
            assert 0 <= top and top + h <= ref.height and 0 <= left and left + w <= ref.width
            crop = torch.from_numpy(np.array(ref)).permute(2, 0, 1)[None, :, top:top + h, left:left + w]
            expected = F.interpolate(crop, size=(32, 32), mode='bilinear', antialias=True)[0]
            flip = out[f'flip{k}'].item()
            flips.add(flip)
            assert torch.equal(v, expected.flip(-1) if flip else expected)
            assert not torch.equal(v, expected if flip else expected.flip(-1))
            box = (left, top, left + w, top + h)
            pil = torch.from_numpy(np.array(ref.resize((32, 32), Image.BILINEAR, box=box)))
            # the same antialiased bilinear filter as PIL's, up to uint8 rounding
            pil = pil.permute(2, 0, 1).float()
            # PIL's filter reads past the box
            diff = (v.float() - (pil.flip(-1) if flip else pil)).abs()[:, 1:-1, 1:-1]
            assert diff.mean() < 0.5, diff.mean()
            assert out[f'photo{k}'].shape == (6,)
    assert flips == {True, False}


def test_two_views_draft_decode_keeps_original_coordinates(tmp_path):
    path = noise_image(tmp_path / 'big.jpg', 800, 600, smooth=True, quality=95)
    ds = TwoViews([path], img_size=32, scale=(0.5, 1.0), seed=0)
    ref, drafted = load_rgb(path), 0
    for epoch in range(6):
        ds.set_epoch(epoch)
        out = ds[0]
        assert out['size'].tolist() == [600, 800]
        top, left, h, w = out['box1'].tolist()
        drafted += min(h, w) >= 64
        crop = ref.resize((32, 32), Image.BILINEAR, box=(left, top, left + w, top + h))
        expected = torch.from_numpy(np.array(crop)).permute(2, 0, 1)
        expected = expected.flip(-1) if out['flip1'] else expected
        # same content from the 1/8 decode
        assert (out['view1'].float() - expected.float()).abs().mean() < 3, epoch
    assert drafted > 0
    small = load_rgb(path, draft_size=(100, 75))
    assert small.size == (100, 75) and small.mode == 'RGB'


def test_two_views_jpeg_fast_decode_equals_pil(tmp_path, monkeypatch):
    """torchvision's decode_jpeg (the fast path) and PIL give the same pixels: RGB, grayscale and CMYK
    JPEGs."""
    rgb = noise_image(tmp_path / 'rgb.jpg', 90, 70, seed=1, quality=90)
    Image.open(rgb).convert('L').save(tmp_path / 'gray.jpg')
    Image.open(rgb).convert('CMYK').save(tmp_path / 'cmyk.jpg')
    files = [rgb, str(tmp_path / 'gray.jpg'), str(tmp_path / 'cmyk.jpg')]
    calls, decode_jpeg = [], data.decode_jpeg
    monkeypatch.setattr(data, 'decode_jpeg', lambda *a, **k: calls.append(1) or decode_jpeg(*a, **k))
    fast = [TwoViews(files, img_size=40, seed=5)[i] for i in range(3)]
    assert len(calls) == 3
    monkeypatch.setattr(data, 'decode_jpeg', None)
    slow = [TwoViews(files, img_size=40, seed=5)[i] for i in range(3)]
    for a, b in zip(fast, slow):
        assert torch.equal(a['view1'], b['view1']) and torch.equal(a['view2'], b['view2'])
    assert torch.equal(fast[1]['view1'][0], fast[1]['view1'][2])  # grayscale stays grey


def test_two_views_determinism(tmp_path):
    files = [noise_image(tmp_path / f'{k}.png', 64, 48, seed=k) for k in range(4)]
    a, b = TwoViews(files, img_size=16, seed=5), TwoViews(files, img_size=16, seed=5)
    a.set_epoch(2), b.set_epoch(2)
    for i in range(4):
        x, y = a[i], b[i]
        for k in ('view1', 'view2', 'box1', 'box2', 'flip1', 'flip2', 'photo1', 'photo2'):
            assert torch.equal(x[k], y[k]), k
    b.set_epoch(3)
    assert not torch.equal(a[0]['photo1'], b[0]['photo1']) and not torch.equal(a[0]['box1'], b[0]['box1'])
    c = TwoViews(files, img_size=16, seed=6)
    c.set_epoch(2)
    assert not torch.equal(a[0]['photo1'], c[0]['photo1'])


def test_two_views_loader_workers_and_epochs(tmp_path):
    """2 persistent workers give the same batches as direct indexing, and see set_epoch (shared-memory
    epoch)."""
    files = [noise_image(tmp_path / f'{k}.png', 40, 30, seed=k) for k in range(8)]
    ds = TwoViews(files, img_size=8, seed=1)
    sampler = EpochSampler(len(ds), 4, seed=1)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, sampler=sampler, num_workers=2,
                                         persistent_workers=True, collate_fn=two_view_batch)
    for epoch in (0, 1):
        ds.set_epoch(epoch), sampler.set_epoch(epoch)
        batches = list(loader)
        ref = TwoViews(files, img_size=8, seed=1)
        ref.set_epoch(epoch)
        direct = [two_view_batch([ref[i] for i in idx])
                  for idx in torch.tensor(list(sampler)).view(-1, 4).tolist()]
        assert len(batches) == 2
        for x, y in zip(batches, direct):
            assert x['view1'].shape == (4, 3, 8, 8) and x['photo2'].shape == (4, 6) and x['skipped'] == []
            for k in ('view1', 'view2', 'box1', 'photo1', 'photo2', 'index', 'flip1', 'size'):
                assert torch.equal(x[k], y[k]), (epoch, k)


def test_two_views_contrastive_crop_boxes(tmp_path):
    path = noise_image(tmp_path / 'a.png', 200, 100)
    boxes = torch.tensor([[0.0, 0.0, 0.1, 0.1]]).share_memory_()
    ds = TwoViews([path], img_size=16, boxes=boxes, ccrop_alpha=0.6)
    for epoch in range(30):
        ds.set_epoch(epoch)
        top, left, h, w = ds[0]['box1'].tolist()
        assert top <= max(0, 10 - h // 2) and left <= max(0, 20 - w // 2)  # centre near the top-left box
    boxes[0] = torch.tensor([0.9, 0.9, 1.0, 1.0])  # updated in place, as the trainer does
    top, left, h, w = ds[0]['box2'].tolist()
    assert top >= min(90 - h // 2, 100 - h) and left >= min(180 - w // 2, 200 - w)
    with pytest.raises(ValueError, match='boxes'):
        TwoViews([path], boxes=torch.zeros(2, 4))

def test_draw_photo_statistics():
    g = torch.Generator().manual_seed(0)
    p = torch.stack([data.draw_photo(g) for _ in range(4000)])
    jitter = p[:, 3] != 0
    assert abs(jitter.float().mean() - 0.8) < 0.03 and abs(p[:, 4].mean() - 0.2) < 0.03
    assert abs((p[:, 5] > 0).float().mean() - 0.5) < 0.03
    assert p[jitter, :3].min() >= 0.6 and p[jitter, :3].max() <= 1.4 and p[:, 3].abs().max() <= 0.1
    assert (p[~jitter, :3] == 1).all() and p[p[:, 5] > 0, 5].min() >= 0.1 and p[:, 5].max() <= 2.0

# ------------------------------------------------------------------------------------------------------------
# load_rgb and bad files


def test_load_rgb_modes(tmp_path):
    def roundtrip(im, name, **kw):
        im.save(tmp_path / name, **kw)
        out = load_rgb(tmp_path / name)
        assert out.mode == 'RGB' and out.size == im.size
        return np.array(out).astype(int)

    assert (roundtrip(Image.new('L', (5, 4), 77), 'l.png') == 77).all()
    assert (roundtrip(Image.new('1', (5, 4), 1), 'b.png') == 255).all()
    rgba = Image.new('RGBA', (4, 4), (200, 10, 30, 255))
    rgba.putpixel((0, 0), (200, 10, 30, 0))
    a = roundtrip(rgba, 'rgba.png')
    assert a[0, 0].tolist() == [128, 128, 128] and a[1, 1].tolist() == [200, 10, 30]
    assert (roundtrip(Image.new('LA', (3, 3), (250, 0)), 'la.png') == 128).all()
    cmyk = np.abs(roundtrip(Image.new('RGB', (16, 16), (10, 200, 30)).convert('CMYK'),
                            'cmyk.jpg', quality=95) -
                  [10, 200, 30])
    assert cmyk.max() <= 4
    p = Image.new('P', (4, 4), 1)
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p.putpixel((0, 0), 0)
    p.info['transparency'] = 0
    a = roundtrip(p, 'p.png', transparency=0)
    assert a[0, 0].tolist() == [128, 128, 128] and a[2, 2].tolist() == [255, 0, 0]
    p.info.pop('transparency')
    assert roundtrip(p, 'p_opaque.png')[0, 0].tolist() == [0, 0, 0]
    a16 = np.array([[0, 1000, 25700, 65535]], dtype=np.uint16)
    a = roundtrip(Image.fromarray(a16), 'i16.png')
    assert Image.open(tmp_path / 'i16.png').mode.startswith('I')
    assert a[0, :, 0].tolist() == [0, 4, 100, 255] and (a[..., 0] == a[..., 2]).all()
    assert roundtrip(Image.new('RGB', (1, 1), (1, 2, 3)), 'one.png')[0, 0].tolist() == [1, 2, 3]


def bad_files(tmp_path):
    good = noise_image(tmp_path / 'good.jpg', 50, 40)
    with open(good, 'rb') as f:
        jpeg = f.read()
    (tmp_path / 'trunc.jpg').write_bytes(jpeg[:len(jpeg) // 2])
    (tmp_path / 'zero.jpg').write_bytes(b'')
    (tmp_path / 'text.jpg').write_text('this is not an image\n')
    return [str(tmp_path / n) for n in ('trunc.jpg', 'zero.jpg', 'text.jpg')], good


def test_bad_files_raise_and_are_skipped(tmp_path):
    bad, good = bad_files(tmp_path)
    for path in bad:
        with pytest.raises(Exception):
            load_rgb(path)
    ds = TwoViews(bad + [good], img_size=16)
    out = ds[0]
    assert out['index'].item() == 3 and out['skipped'] == bad and out['view1'].shape == (3, 16, 16)
    assert ds[2]['skipped'] == bad[2:] and ds[3]['skipped'] == []
    with pytest.raises(RuntimeError, match='zero.jpg'):
        TwoViews(bad, img_size=16)[0]


def test_decompression_bomb_is_a_clear_error(tmp_path, monkeypatch):
    path = noise_image(tmp_path / 'bomb.png', 64, 64)
    for limit in (3000, 1000):  # over the limit (PIL warns) and over twice the limit (PIL raises)
        monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', limit)
        with pytest.raises(ValueError, match='MAX_IMAGE_PIXELS'):
            load_rgb(path)
    ds = TwoViews([path, noise_image(tmp_path / 'ok.png', 20, 20)], img_size=8)
    assert ds[0]['skipped'] == [path] and ds[0]['index'].item() == 1

# ------------------------------------------------------------------------------------------------------------
# list_images


def test_list_images_folder(tmp_path):
    for name in ('b/z.JPG', 'a.png', 'b/c/d.Jpeg', 'b/notes.txt', 'e.webp', 'f.BMP', 'g.gif'):
        os.makedirs(os.path.dirname(tmp_path / name), exist_ok=True)
        (tmp_path / name).write_bytes(b'')
    expected = sorted(str(tmp_path / n) for n in ('b/z.JPG', 'a.png', 'b/c/d.Jpeg', 'e.webp', 'f.BMP'))
    assert list_images(str(tmp_path)) == expected
    with pytest.raises(FileNotFoundError, match='nowhere'):
        list_images(str(tmp_path / 'nowhere'))
    os.makedirs(tmp_path / 'empty')
    with pytest.raises(ValueError, match='empty'):
        list_images(str(tmp_path / 'empty'))


def test_list_images_coco_json(tmp_path):
    os.makedirs(tmp_path / 'annotations')
    ann = tmp_path / 'annotations' / 'instances_train2017.json'
    ann.write_text(json.dumps({'images': [{'id': 1, 'file_name': 'b.jpg'}, {'id': 2, 'file_name': 'a.jpg'}]}))
    with pytest.raises(FileNotFoundError, match='train2017'):
        list_images(str(ann))
    os.makedirs(tmp_path / 'images' / 'train2017')  # the demo layout
    assert list_images(str(ann)) == [str(tmp_path / 'images' / 'train2017' / n) for n in ('b.jpg', 'a.jpg')]
    os.makedirs(tmp_path / 'train2017')  # the COCO layout wins
    assert list_images(str(ann)) == [str(tmp_path / 'train2017' / n) for n in ('b.jpg', 'a.jpg')]
    assert list_images(str(ann), image_root='/x') == ['/x/b.jpg', '/x/a.jpg']
    bad = tmp_path / 'annotations' / 'instances_val2017.json'
    bad.write_text(json.dumps({'annotations': []}))
    with pytest.raises(ValueError, match="instances_val2017.json.*'images'"):
        list_images(str(bad))

# ------------------------------------------------------------------------------------------------------------
# EpochSampler


def test_epoch_sampler():
    n, G = 103, 8
    one = list(EpochSampler(n, G, seed=4, epoch=2))
    assert len(one) == len(EpochSampler(n, G, seed=4, epoch=2)) == 12 * G and len(set(one)) == len(one)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(4 + 2)).tolist()
    assert one == perm[:12 * G]
    r0, r1 = (list(EpochSampler(n, G, rank=r, world=2, seed=4, epoch=2)) for r in (0, 1))
    assert len(r0) == len(r1) == 12 * G // 2
    for b in range(12):
        assert r0[b * 4:(b + 1) * 4] + r1[b * 4:(b + 1) * 4] == one[b * G:(b + 1) * G]
    s = EpochSampler(n, G, rank=1, world=2, seed=4, epoch=2, start_batch=5)
    assert list(s) == r1[5 * 4:] and len(s) == 7 * 4
    s.set_epoch(3)
    assert len(s) == 12 * 4 and list(s) != r1 and list(s) == list(EpochSampler(n, G, 1, 2, seed=4, epoch=3))
    with pytest.raises(ValueError, match='world=3'):
        EpochSampler(n, G, world=3)
    with pytest.raises(ValueError, match='n=5'):
        EpochSampler(5, G)
    with pytest.raises(ValueError, match='start_batch'):
        EpochSampler(n, G, start_batch=13)



def test_run_sampler_crosses_epochs_with_each_epochs_keys():
    """RunSampler over steps 9..30 (12 batches an epoch) yields, rank by rank, the EpochSampler batches of
    epochs 0, 1 and 2 in order, each index paired with its own epoch; TwoViews draws a (epoch, i) key with
    that epoch's seed."""
    n, G = 103, 8
    for rank in (0, 1):
        s = data.RunSampler(n, G, rank=rank, world=2, seed=4)
        s.set_steps(9, 31)
        want = [(e, i) for e, start, stop in ((0, 9, 12), (1, 0, 12), (2, 0, 7))
                for i in list(EpochSampler(n, G, rank, 2, seed=4, epoch=e,
                                           start_batch=start))[:(stop - start) * 4]]
        assert list(s) == want and len(s) == len(want) == 22 * 4
    with pytest.raises(ValueError, match='steps'):
        s.set_steps(5, 3)


def test_two_views_epoch_keys_equal_set_epoch(tmp_path):
    ds = TwoViews([noise_image(tmp_path / f'{k}.png', 64, 48, seed=k) for k in range(3)], 32, seed=1)
    ds.set_epoch(2)
    a = ds[1]
    ds.set_epoch(0)
    b = ds[(2, 1)]  # the key's epoch wins over set_epoch's
    assert torch.equal(a['view1'], b['view1']) and torch.equal(a['photo2'], b['photo2'])
    assert not torch.equal(ds[1]['view1'], b['view1'])
