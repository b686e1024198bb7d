"""Tests of vit.py: timm's key layout and numbers, the CLS attention, position-embedding interpolation, and
loading a backbone from our checkpoints, plain timm / DINO state dicts and back into timm."""
import math

import pytest
import torch

import vit
from conftest import save_demo_backbone


# ------------------------------------------------------------------------------------------------------------
# the model


def test_vit_small_has_timm_layout():
    sd = vit.vit_small().state_dict()
    assert len(sd) == 150
    assert sum(v.numel() for v in sd.values()) == 21_665_664
    shapes = {"cls_token": (1, 1, 384), "pos_embed": (1, 197, 384),
              "patch_embed.proj.weight": (384, 3, 16, 16),
              "blocks.11.attn.qkv.weight": (1152, 384), "blocks.0.attn.qkv.bias": (1152,),
              "blocks.5.attn.proj.weight": (384, 384), "blocks.3.mlp.fc1.weight": (1536, 384),
              "blocks.3.mlp.fc2.weight": (384, 1536), "norm.weight": (384,), "blocks.7.norm2.bias": (384,)}
    for k, s in shapes.items():
        assert tuple(sd[k].shape) == s, k


def test_vit_matches_timm_when_available():
    timm = pytest.importorskip("timm")
    torch.set_default_dtype(torch.float32)
    ours = vit.vit_small().eval()
    theirs = timm.create_model("vit_small_patch16_224", num_classes=0, pretrained=False).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(ours.forward_features(x), theirs.forward_features(x), atol=1e-5)


def explicit_attention(blk, x):
    """softmax(q k^T / sqrt(d)) of an Attention module, written out from its packed [q | k | v] weights, and
    its output."""
    B, N, D = x.shape
    H, d = blk.num_heads, D // blk.num_heads
    W, b = blk.qkv.weight, blk.qkv.bias
    q, k, v = [(x @ W[i * D:(i + 1) * D].T + b[i * D:(i + 1) * D]).view(B, N, H, d).transpose(1, 2)
               for i in range(3)]
    att = (q @ k.transpose(-1, -2) / math.sqrt(d)).softmax(-1)
    return att, blk.proj((att @ v).transpose(1, 2).reshape(B, N, D))


def test_vit_attention_matches_explicit_softmax():
    """qkv packing [q|k|v] with contiguous heads and the SDPA output against the textbook formula (float64);
    the CLS row of the last block's attention (last_cls_attention) against the same formula on that block's
    input."""
    m = vit.create_vit("vit_test").double().eval()
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    att, ref = explicit_attention(m.blocks[-1].attn, x)
    assert torch.allclose(m.blocks[-1].attn(x), ref, atol=1e-12)
    img = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    h = m.tokens_in(img)
    for blk in m.blocks[:-1]:
        h = blk(h)
    att, _ = explicit_attention(m.blocks[-1].attn, m.blocks[-1].norm1(h))
    cls_attn = m.last_cls_attention(img)
    assert cls_attn.dtype == torch.float32 and cls_attn.shape == (2, m.num_heads, 16)
    assert torch.allclose(cls_attn.double(), att[:, :, 0, 1:], atol=1e-6)


def test_pos_embed_interpolation():
    m = vit.create_vit("vit_test").eval()
    x = torch.randn(1, 3, 32, 32)
    # the training size uses the parameter itself: output unchanged
    assert m.pos_embed_for(4, 4) is m.pos_embed
    # an explicit identity interpolation gives the same output
    same = torch.nn.functional.interpolate(m.pos_embed[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2),
                                           size=(4, 4), mode="bicubic", align_corners=False)
    assert torch.allclose(same.permute(0, 2, 3, 1).reshape(1, 16, -1), m.pos_embed[:, 1:], atol=1e-12)
    assert m.forward_features(torch.randn(2, 3, 64, 48)).shape == (2, 1 + 8 * 6, 32)
    with pytest.raises(ValueError, match="multiples of the patch size"):
        m.forward_features(torch.randn(1, 3, 30, 32))
    assert m.forward_features(x).shape == (1, 17, 32)


# ------------------------------------------------------------------------------------------------------------
# loading backbones


def test_head_count_of_a_plain_state_dict(tmp_path, monkeypatch):
    backbone = save_demo_backbone(tmp_path)
    model, _ = vit.load_backbone(str(tmp_path / "plain.pt"))
    assert model.num_heads == 4
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.forward_features(x), backbone.eval().forward_features(x))
    # width now ambiguous
    monkeypatch.setitem(vit.CONFIGS, "vit_demo_2h", dict(vit.CONFIGS["vit_demo"], num_heads=2))
    with pytest.raises(ValueError, match="pass --model"):
        vit.load_backbone(str(tmp_path / "plain.pt"))
    # --model honoured
    assert vit.load_backbone(str(tmp_path / "plain.pt"), name="vit_demo")[0].num_heads == 4
    assert vit.load_backbone(str(tmp_path / "plain.pt"), name="vit_demo_2h")[0].num_heads == 2
    with pytest.raises(ValueError, match="width 32"):
        vit.load_backbone(str(tmp_path / "plain.pt"), name="vit_test")
    # our checkpoint carries its config: a contradicting --model
    with pytest.raises(ValueError, match="heads"):
        vit.load_backbone(str(tmp_path / "ckpt.pt"), name="vit_demo_2h")
    torch.save(vit.create_vit("vit_demo", embed_dim=96, num_heads=3).state_dict(), tmp_path / "w96.pt")
    with pytest.raises(ValueError, match="width 96.*pass --model"):
        vit.load_backbone(str(tmp_path / "w96.pt"))
    torch.save(vit.create_vit("vit_demo", embed_dim=192, num_heads=3).state_dict(), tmp_path / "tiny.pt")
    # timm's ViT-Ti width: 64 channels a head
    assert vit.load_backbone(str(tmp_path / "tiny.pt"))[0].num_heads == 3


def test_timm_loads_our_checkpoint_as_documented(tmp_path):
    """The README's call: timm.create_model('vit_small_patch16_224', num_classes=0, checkpoint_path=ckpt)
    takes our pretraining checkpoint as it is ('model' holds the backbone in timm's layout) and gives our
    features."""
    timm = pytest.importorskip("timm", reason="timm is not installed (an optional peer, not a requirement)")
    torch.manual_seed(0)
    ours = vit.vit_small().eval()
    state = {"model": ours.state_dict(), "vit_config": ours.config, "heads": {}, "optimizer": {}, "step": 1,
             "epoch": 0, "args": {"model": "vit_small", "montage_r": [2, 7]}, "skipped": [],
             "rng": {"torch": torch.get_rng_state()}}
    torch.save(state, tmp_path / "ckpt.pt")
    theirs = timm.create_model("vit_small_patch16_224", num_classes=0,
                               checkpoint_path=str(tmp_path / "ckpt.pt"))
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(theirs.eval().forward_features(x), ours.forward_features(x), atol=1e-5)
