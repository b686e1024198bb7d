"""Tests of augment.py: python -m pytest -q test_augment.py"""
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

import augment
from augment import photometric
from data import IMAGENET_MEAN, IMAGENET_STD

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def views_and_params(n=6, S=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, S, S), generator=g, dtype=torch.uint8)
    p = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0, 0.0]]).repeat(n, 1)
    return x, p


def unnormalise(y):
    return y * STD + MEAN


def test_photometric_identity_is_exact():
    x, p = views_and_params()
    y = photometric(x, p)
    assert y.dtype == torch.float32 and torch.equal(y, (x.float() / 255 - MEAN) / STD)


@pytest.mark.parametrize('col, fn, values', [
    (0, TF.adjust_brightness, (0.6, 0.9, 1.4)),
    (1, TF.adjust_contrast, (0.6, 1.2, 1.4)),
    (2, TF.adjust_saturation, (0.6, 0.8, 1.4)),
    (3, TF.adjust_hue, (-0.1, 0.03, 0.1)),
])
def test_photometric_jitter_matches_torchvision(col, fn, values):
    x, p = views_and_params(n=len(values))
    p[:, col] = torch.tensor(values)
    y = unnormalise(photometric(x, p))
    for k, v in enumerate(values):
        ref = fn(x[k].float() / 255, v)
        assert (y[k] - ref).abs().max() < 2e-5, (fn.__name__, v)


def test_photometric_fixed_order_and_batching():
    """Per sample: jitter b, c, s, h in that order, then grayscale, then blur; a batch equals its samples one
    by one."""
    x, p = views_and_params(n=4)  # S = 20: blur kernel 3
    p[:, :4] = torch.tensor([[1.3, 0.7, 1.2, 0.05], [0.7, 1.3, 0.6, -0.08], [1.0, 1.0, 1.0, 0.0],
                             [1.1, 0.9, 1.4, 0.1]])
    p[1, 4], p[3, 5] = 1.0, 1.5
    y = unnormalise(photometric(x, p))
    for k in range(4):
        b, c, s, h = p[k, :4].tolist()
        ref = TF.adjust_contrast(TF.adjust_brightness(x[k] / 255, b), c)
        ref = TF.adjust_hue(TF.adjust_saturation(ref, s), h)
        if k == 1:
            ref = TF.rgb_to_grayscale(ref, 3)
        elif k == 3:
            ref = TF.gaussian_blur(ref, [3, 3], [1.5, 1.5])
        assert (y[k] - ref).abs().max() < 2e-5, k
        assert torch.allclose(unnormalise(photometric(x[k:k + 1], p[k:k + 1]))[0], y[k], atol=1e-6)


def test_photometric_grayscale_gives_equal_channels():
    x, p = views_and_params()
    p[::2, 4] = 1.0
    y = unnormalise(photometric(x, p))
    assert (y[::2] - y[::2, :1]).abs().max() < 1e-6
    assert (y[1::2, 0] - y[1::2, 1]).abs().max() > 0.1
    assert torch.allclose(y[0], TF.rgb_to_grayscale(x[0].float() / 255, 3), atol=2e-6)


def test_photometric_blur_matches_naive_conv():
    x, p = views_and_params(n=4, S=64)
    sigmas = [0.1, 0.7, 2.0, 0.0]
    p[:, 5] = torch.tensor(sigmas)
    y = unnormalise(photometric(x, p))
    for k, sigma in enumerate(sigmas):
        img = x[k:k + 1].float() / 255
        if sigma == 0:
            assert torch.allclose(y[k], img[0], atol=1e-6)
            continue
        t = torch.arange(-3.0, 4.0)  # K = 2*floor(0.05*64) + 1 = 7
        k1 = torch.exp(-t ** 2 / (2 * sigma ** 2))
        k2 = torch.outer(k1, k1) / k1.sum() ** 2
        ref = F.conv2d(F.pad(img, (3, 3, 3, 3), mode='reflect'), k2.expand(3, 1, 7, 7), groups=3)[0]
        assert (y[k] - ref).abs().max() < 1e-5, sigma
        assert (y[k] - TF.gaussian_blur(img[0], [7, 7], [sigma, sigma])).abs().max() < 1e-5


@pytest.mark.parametrize('S, K', [(96, 9), (224, 23)])  # kernel ~10% of the side, odd (SimCLR: 23 at 224)
def test_photometric_blur_kernel_size(S, K):
    x, p = views_and_params(n=2, S=S)
    p[0, 5] = 2.0
    y = unnormalise(photometric(x, p))
    assert (y[0] - TF.gaussian_blur(x[0] / 255, [K, K], [2.0, 2.0])).abs().max() < 1e-5


def test_photometric_bad_input():
    x, p = views_and_params()
    with pytest.raises(ValueError, match='uint8'):
        photometric(x.float(), p)
    with pytest.raises(ValueError, match='params'):
        photometric(x, p[:, :5])


def test_device_batches_are_the_views_of_each_batch():
    """augment.device_batches (the loop's feed) yields device_views of every batch in order, with its skipped
    files."""
    batches = []
    for k in range(2):
        views = [views_and_params(n=3, S=16, seed=2 * k + i) for i in (0, 1)]
        views[1][1][:, 0] = 0.7  # view 2 darker, view 1 with identity parameters
        batches.append({"view1": views[0][0], "photo1": views[0][1], "view2": views[1][0],
                        "photo2": views[1][1], "skipped": [f"bad{k}.jpg"]})
    fed = list(augment.device_batches(batches, torch.device('cpu')))
    assert len(fed) == 2
    for k, ((x, skipped), batch) in enumerate(zip(fed, batches)):
        assert skipped == [f"bad{k}.jpg"] and x.shape == (6, 3, 16, 16)
        assert torch.equal(x, torch.cat([photometric(batch["view1"], batch["photo1"]),
                                         photometric(batch["view2"], batch["photo2"])]))


def test_device_batches_decode_on_the_device_equal_the_workers(tmp_path):
    """A loader of TwoViews(device_decode=True) through device_batches (decode, crops and photometric ops in
    this process, here on the CPU) feeds the step exactly the input of the worker-decoding loader, with the
    same skipped files."""
    import data
    from test_decode import decode_set
    files = decode_set(tmp_path)

    def feed(device_decode):
        ds = data.TwoViews(files, img_size=40, seed=3, device_decode=device_decode)
        loader = torch.utils.data.DataLoader(ds, batch_size=3, sampler=data.RunSampler(len(files), 3, seed=3),
                                             collate_fn=data.two_view_batch, num_workers=1)
        loader.sampler.set_steps(0, 4)
        return list(augment.device_batches(loader, torch.device('cpu'), size=40))
    fed, want = feed(True), feed(False)
    assert len(fed) == 4 and any(skipped for _, skipped in fed)
    for (x, skipped), (y, skipped_y) in zip(fed, want):
        assert x.shape == (6, 3, 40, 40) and skipped == skipped_y and torch.equal(x, y)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA decoder's stream hazard needs a GPU")
def test_cuda_decode_right_after_a_free_leaves_queued_kernels_their_memory(tmp_path):
    """Queue slow kernels that read a buffer, free it (the caching allocator hands the block out at once on
    this stream), decode on the GPU: the queued reductions still see their own values (without the drain in
    augment.decode_images the hardware decoder overwrites them)."""
    from test_data import noise_image
    from torchvision.io import read_file
    jpegs = [read_file(noise_image(tmp_path / f'{k}.jpg', 640, 480, seed=k)) for k in range(8)]
    device = torch.device('cuda')
    for _ in range(20):
        bufs = [torch.full((3 * 640 * 480,), 1, dtype=torch.uint8, device=device) for _ in range(8)]
        slow = torch.randn(4096, 4096, device=device)
        for _ in range(20):
            slow = slow @ slow / 64  # ~tens of ms queued ahead of the sums
        sums = [b.float().sum() for b in bufs]  # queued behind the products
        del bufs
        imgs = augment.decode_images(jpegs, device)
        assert all(s.item() == 3 * 640 * 480 for s in sums) and len(imgs) == 8
