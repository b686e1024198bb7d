"""Tests of the --decode gpu path (data.TwoViews(device_decode=True), data.crop_views, augment.decode_views):
the worker leaves baseline JPEGs to the training device, which decodes and crops them with the worker's draws.
python -m pytest -q test_decode.py"""
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
from data import TwoViews, two_view_batch
from test_data import noise_image

pytestmark = pytest.mark.filterwarnings('ignore:__array__ implementation:DeprecationWarning')  # pycocotools



def decode_set(tmp_path):
    """Every kind of file a device-decode batch meets: baseline RGB and grayscale JPEGs (left to the device),
    a PNG, CMYK and progressive JPEGs (decoded by the worker), a truncated JPEG (skipped by the worker). Small
    images and img_size 40: no crop reaches 2 x 40 px, so the worker decodes at full size too."""
    rgb = noise_image(tmp_path / 'rgb.jpg', 90, 70, seed=1, quality=90)
    Image.open(rgb).convert('L').save(tmp_path / 'gray.jpg')
    Image.open(rgb).convert('CMYK').save(tmp_path / 'cmyk.jpg')
    Image.open(rgb).save(tmp_path / 'prog.jpg', progressive=True)
    (tmp_path / 'trunc.jpg').write_bytes((tmp_path / 'rgb.jpg').read_bytes()[:1500])
    names = ['rgb.jpg', 'gray.jpg', 'trunc.jpg', 'cmyk.jpg', 'prog.jpg']
    return [str(tmp_path / n) for n in names] + [noise_image(tmp_path / 'a.png', 77, 60, seed=2),
                                                 noise_image(tmp_path / 'b.jpg', 60, 95, seed=3, quality=80)]


def test_device_decode_same_draws_and_views_as_the_worker(tmp_path):
    """TwoViews(device_decode=True) + augment.decode_views on the CPU (the same libjpeg-turbo decoder as the
    worker) gives exactly the worker's views, boxes, flips, photometric parameters, indices and skipped files;
    only the baseline JPEGs are left to the device."""
    import augment
    files = decode_set(tmp_path)
    cpu, dev = TwoViews(files, img_size=40, seed=7), TwoViews(files, img_size=40, seed=7, device_decode=True)
    for epoch in range(3):
        keys = [(epoch, i) for i in range(len(files))]
        a, b = two_view_batch([cpu[k] for k in keys]), two_view_batch([dev[k] for k in keys])
        left = [p for p, n in zip(b['path'], b['jpeg_sizes']) if n]
        assert left == [files[0], files[1], files[6]] and b['path'][2] == files[3]  # trunc.jpg: cmyk.jpg instead
        assert b['view1'].shape == (4, 3, 40, 40) and a['skipped'] == b['skipped'] == [files[2]]
        for k in ('box1', 'box2', 'flip1', 'flip2', 'photo1', 'photo2', 'index', 'size'):
            assert torch.equal(a[k], b[k]), k
        views, skipped = augment.decode_views(b, 40, torch.device('cpu'))
        assert skipped == [files[2]]
        assert torch.equal(views[0], a['view1']) and torch.equal(views[1], a['view2']), epoch


def test_device_decode_fallbacks(tmp_path, monkeypatch):
    """A JPEG the device decoder rejects is decoded by PIL (same pixels); one PIL rejects too has grey views
    and is counted as skipped; a batch that fails is decoded image by image."""
    import augment
    files = decode_set(tmp_path)
    ds = TwoViews(files, img_size=40, seed=1, device_decode=True)
    batch = two_view_batch([ds[i] for i in (0, 1, 6)])
    want, _ = augment.decode_views(batch, 40, torch.device('cpu'))
    bad = batch['jpeg'].split(batch['jpeg_sizes'].tolist())[1]
    decode_jpeg, load_rgb = data.decode_jpeg, data.load_rgb
    calls = []

    def picky(x, **kw):
        calls.append(len(x))
        if any(len(t) == len(bad) and torch.equal(t, bad) for t in x):
            raise RuntimeError('nvjpeg says no')
        return decode_jpeg(x, **kw)
    monkeypatch.setattr(data, 'decode_jpeg', picky)
    views, skipped = augment.decode_views(batch, 40, torch.device('cpu'))
    assert calls == [3, 1, 1, 1] and skipped == []
    assert torch.equal(views[0], want[0]) and torch.equal(views[1], want[1])
    monkeypatch.setattr(data, 'load_rgb', lambda p: (_ for _ in ()).throw(OSError(p)) if p == files[1]
                        else load_rgb(p))
    views, skipped = augment.decode_views(batch, 40, torch.device('cpu'))
    assert skipped == [files[1]] and (views[0][1] == 128).all() and (views[1][1] == 128).all()
    assert torch.equal(views[0][[0, 2]], want[0][[0, 2]])
    monkeypatch.setattr(data, 'load_rgb', load_rgb)
    monkeypatch.setattr(data, 'decode_jpeg', lambda x, **kw: (_ for _ in ()).throw(RuntimeError('no nvjpeg')))
    with pytest.warns(UserWarning, match='rejected all 3 JPEGs.*--decode cpu'):  # a decoder that never works
        views, skipped = augment.decode_views(batch, 40, torch.device('cpu'))
    assert skipped == [] and torch.equal(views[1], want[1])


def test_crop_views_float_path_within_one_level():
    """crop_views on CUDA resizes in float32 (no uint8 kernel there) and rounds: the same formula on the CPU
    is within one level of the CPU's uint8 kernel."""
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (3, 97, 131), generator=g, dtype=torch.uint8)
    for box in ((3, 5, 60, 90), (0, 0, 97, 131), (40, 70, 20, 33)):
        top, left, h, w = box
        exact = data.crop_views(img, [box], [False], 32)[0]
        crop = img[None, :, top:top + h, left:left + w].float()
        approx = F.interpolate(crop, size=(32, 32), mode='bilinear', antialias=True)[0].round().clamp(0, 255)
        assert (approx - exact.float()).abs().max() <= 1, box


def test_decode_gpu_without_cuda_is_a_clear_error(tmp_path, capsys):
    import pretrain
    folder = tmp_path / 'imgs'
    folder.mkdir()
    for k in range(4):
        noise_image(folder / f'{k}.jpg', 40, 30, seed=k)
    argv = ['--data', str(folder), '--out-dir', str(tmp_path / 'out'), '--model', 'vit_test', '--img-size',
            '32',
            '--batch-size', '2', '--lam', '0', '--device', 'cpu', '--decode', 'gpu', '--workers', '0']
    assert pretrain.main(argv) == 2
    assert '--decode gpu needs a CUDA device' in capsys.readouterr().err
