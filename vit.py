"""
A hand-written Vision Transformer (ViT-S/16 and smaller configs) whose state_dict has exactly the key layout
of timm's `vit_small_patch16_224` (num_classes=0), and the one place that loads a backbone from a file. This
file imports nothing of the project: copy it as it is.

    cls_token [1,1,D]  pos_embed [1,1+T,D]  patch_embed.proj.{weight,bias}
    blocks.{i}.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}.{weight,bias}  norm.{weight,bias}

qkv is packed as timm does it: the 3*D outputs are [q | k | v], each split into heads of D/heads contiguous
channels.
The architecture is ViT (Dosovitskiy et al., ICLR 2021, arXiv 2010.11929); timm's initialisation.
"""
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

CONFIGS = {
    # the paper's backbone: 150 state_dict keys, 21,665,664 parameters
    "vit_small": dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6),
    # the built-in demo: 64 px crops, 8x8 tokens, trains in minutes on a laptop CPU
    "vit_demo": dict(img_size=64, patch_size=8, embed_dim=128, depth=4, num_heads=4),
    # unit tests
    "vit_test": dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2),
}


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x):
        """q, k, v [B, heads, N, D/heads] of the tokens x [B, N, D]."""
        B, N, C = x.shape
        return self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)

    def forward(self, x, attn_mask=None):
        """softmax(q k^T / sqrt(d_head) + mask) v through SDPA (flash / memory-efficient kernels on CUDA)."""
        q, k, v = self.qkv_heads(x)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(out.transpose(1, 2).reshape(x.shape))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as timm


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, attn_mask=None):
        x = x + self.attn(self.norm1(x), attn_mask)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """The patch projection of timm (a Conv2d of kernel = stride = patch, so the weights load as they are),
    computed as what it is: a reshape into patches and one matmul. On an H100/H200 the cuDNN convolution took
    ~5 ms of a 56 ms ViT-S/16 step at batch 2x256 (forward, weight gradient and two layout transposes), the
    matmul well under 1 ms."""

    def __init__(self, patch_size, dim):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        """[B, C, H, W] -> [B, T, D], tokens in row-major order, each the projection of its
        (c, y, x)-flattened patch."""
        B, C, H, W = x.shape
        p, w = self.patch_size, self.proj.weight
        patches = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, -1, C * p * p)
        return F.linear(patches, w.reshape(w.shape[0], -1), self.proj.bias)


class VisionTransformer(nn.Module):
    def __init__(self, img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size={img_size} must be a multiple of patch_size={patch_size}")
        self.config = dict(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                           num_heads=num_heads, mlp_ratio=mlp_ratio)
        self.patch_size, self.embed_dim, self.num_heads = patch_size, embed_dim, num_heads
        self.grid = img_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid ** 2, embed_dim))
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.reset_parameters()

    def reset_parameters(self):
        """timm's ViT init: trunc-normal(0.02) for pos-embed and linears, 1e-6-normal CLS token, zero
        biases."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.proj.weight  # as a linear layer on the flattened patch (timm / MAE)
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)

    def pos_embed_for(self, gh, gw):
        """The position embedding for a gh x gw token grid: bicubic interpolation of the learned grid (the CLS
        slot is kept as is). The stored grid size returns the parameter itself, so the training resolution is
        unchanged."""
        if gh == gw == self.grid:
            return self.pos_embed
        cls, grid = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        grid = grid.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), size=(gh, gw), mode="bicubic", align_corners=False).to(cls.dtype)
        return torch.cat([cls, grid.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)], dim=1)

    def tokens_in(self, x):
        """x [B, 3, H, W] (H, W multiples of the patch size) -> the input of the first block [B, 1+T, D]: CLS
        token and patch embeddings plus the position embedding (interpolated to the H x W grid)."""
        B, _, H, W = x.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"input of {H}x{W} px: height and width must be multiples of the patch size {p}")
        x = torch.cat([self.cls_token.expand(B, -1, -1), self.patch_embed(x)], dim=1)
        return x + self.pos_embed_for(H // p, W // p)

    def forward_features(self, x, attn_mask=None):
        """x [B, 3, H, W] -> final-LayerNorm tokens [B, 1+T, D], CLS first. attn_mask: optional SDPA mask
        broadcastable to [B, heads, 1+T, 1+T] (bool: True = may attend)."""
        x = self.tokens_in(x)
        for blk in self.blocks:
            x = blk(x, attn_mask)
        return self.norm(x)

    def forward(self, x):
        return self.forward_features(x)

    @torch.no_grad()
    def last_cls_attention(self, x):
        """The last block's attention of the CLS token over the patch tokens, [B, heads, T] in float32 (each
        row sums to 1 minus the CLS token's own share), as DINO's get_last_selfattention: ContrastiveCrop's
        heat map and visualize.py's pictures."""
        x = self.tokens_in(x)
        for blk in self.blocks[:-1]:
            x = blk(x)
        q, k, _ = self.blocks[-1].attn.qkv_heads(self.blocks[-1].norm1(x))
        logits = (q[:, :, :1] * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # [B, heads, 1, 1+T]
        return logits.float().softmax(-1)[:, :, 0, 1:]


def create_vit(name="vit_small", **overrides):
    """A ViT from one of CONFIGS, with any field overridden (depth, embed_dim, num_heads, patch_size,
    img_size)."""
    if name not in CONFIGS:
        raise ValueError(f"--model {name!r}: expected one of {sorted(CONFIGS)}")
    return VisionTransformer(**{**CONFIGS[name], **overrides})


def vit_small(**overrides):
    return create_vit("vit_small", **overrides)


def global_feature(tokens, agg):
    """The image-level feature (METHOD.md 5.2) from final-LN tokens [B, 1+T, D]: 'cls' = the CLS token,
    'gap' = the mean of the T patch tokens."""
    if agg == "cls":
        return tokens[:, 0]
    if agg == "gap":
        return tokens[:, 1:].mean(1)
    raise ValueError(f"agg={agg!r}: expected 'cls' or 'gap'")


def vit_flops(config, img_size=None):
    """Forward matmul FLOPs (2 per multiply-add) of one image: patch embedding, qkv/proj/MLP linears and the
    two attention products; norms, softmax and GELU are ignored, as in the usual MFU accounting (training = 3x
    this)."""
    D, p, depth = config["embed_dim"], config["patch_size"], config["depth"]
    n = 1 + ((img_size or config["img_size"]) // p) ** 2
    hidden = int(D * config.get("mlp_ratio", 4.0))
    per_block = 2 * n * (3 * D * D + D * D + 2 * D * hidden) + 2 * 2 * n * n * D
    return 2 * (n - 1) * 3 * p * p * D + depth * per_block


# ------------------------------------------------------------------------------------------------------------
# Loading a backbone from a file: our pretraining checkpoint, a plain timm-layout state dict (timm, DINO), or
# a DINO-style training checkpoint ('teacher'/'student' with 'module.backbone.' prefixes). Shared by both
# probes.

TIMM_WIDTHS = {192: 3, 384: 6, 768: 12, 1024: 16}  # timm's ViT-Ti/S/B/L: 64 channels a head


def _config_from_state_dict(sd, name=None):
    """The ViT config of a plain state dict. The head count is not in the shapes: it comes from CONFIGS[name]
    when a name is given (--model), else from the one CONFIGS entry of that width, else from timm's standard
    widths; any other width is refused (a wrong head count would load without an error and compute something
    else)."""
    try:
        D = sd["cls_token"].shape[-1]
        p = sd["patch_embed.proj.weight"].shape[-1]
        T = sd["pos_embed"].shape[1] - 1
        depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        hidden = sd["blocks.0.mlp.fc1.weight"].shape[0]
    except (KeyError, ValueError, IndexError) as e:
        raise ValueError(f"not a ViT state dict in the timm key layout (missing {e}); keys start with "
                         f"{sorted(sd)[:5]}") from None
    grid = int(math.isqrt(T))
    heads = {c["num_heads"] for c in CONFIGS.values() if c["embed_dim"] == D}
    if name is not None:
        if CONFIGS[name]["embed_dim"] != D:
            raise ValueError(f"--model {name} has width {CONFIGS[name]['embed_dim']}, the "
                             f"state dict's is {D}")
        heads = {CONFIGS[name]["num_heads"]}
    elif not heads and D in TIMM_WIDTHS:
        heads = {TIMM_WIDTHS[D]}
    if len(heads) != 1:
        raise ValueError(f"a plain state dict of width {D}: its head count is not stored and this width is "
                         f"{'shared by configs with different head counts' if heads else 'not a known one'}; "
                         f"pass --model with the config it was trained with (one of {sorted(CONFIGS)})")
    return dict(img_size=grid * p, patch_size=p, embed_dim=D, depth=depth, num_heads=heads.pop(),
                mlp_ratio=hidden / D)


def non_finite_keys(state_dict):
    """The keys of the floating-point tensors of state_dict that hold a NaN or an Inf."""
    return [k for k, v in state_dict.items()
            if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]


def load_backbone(path, device="cpu", name=None):
    """Load a ViT backbone from `path`; returns (model in eval mode, args dict of the pretraining run or {}).
    name: the CONFIGS entry of a plain state dict (its head count; see _config_from_state_dict).
    Refuses, with a message naming the file: a missing file, a pickle that is not a plain tensor checkpoint
    (weights_only=True executes nothing), NaN/Inf weights, and a state dict of another architecture (lists the
    keys)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for code-carrying pickles, RuntimeError for non-torch files
        raise ValueError(f"checkpoint {path}: refused by torch.load(weights_only=True) - not a plain tensor "
                         f"checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"checkpoint {path}: expected a dict of tensors, got {type(ckpt).__name__}")
    args, config = {}, None
    if isinstance(ckpt.get("model"), dict):  # ours
        sd, args, config = ckpt["model"], ckpt.get("args") or {}, ckpt.get("vit_config")
    elif isinstance(ckpt.get("teacher"), dict):  # DINO training checkpoint
        sd = ckpt["teacher"]
    elif isinstance(ckpt.get("state_dict"), dict):
        sd = ckpt["state_dict"]
    else:
        sd = ckpt
    clean = {}
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod.", "backbone."):
            k = k[len(prefix):] if k.startswith(prefix) else k
        if not k.startswith(("head.", "fc_norm.")):  # classifier heads are not part of the backbone
            clean[k] = v
    bad = non_finite_keys(clean)
    if bad:
        raise ValueError(f"checkpoint {path}: non-finite values (NaN/Inf) in {len(bad)} "
                         f"tensors, e.g. {bad[:3]}")
    if config and name and CONFIGS[name]["num_heads"] != config["num_heads"]:
        raise ValueError(f"checkpoint {path}: --model {name} has {CONFIGS[name]['num_heads']} heads, the "
                         f"checkpoint's config {config['num_heads']}")
    try:
        model = VisionTransformer(**(config or _config_from_state_dict(clean, name)))
    except ValueError as e:
        raise ValueError(f"checkpoint {path}: {e}") from None
    want = model.state_dict()
    missing = sorted(set(want) - set(clean))
    unexpected = sorted(set(clean) - set(want))
    shapes = [f"{k}: file {tuple(clean[k].shape)} vs model {tuple(want[k].shape)}"
              for k in sorted(set(want) & set(clean)) if clean[k].shape != want[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(
            f"checkpoint {path}: not a ViT backbone of the expected layout: "
            f"{len(missing)} missing keys {missing[:6]}, {len(unexpected)} unexpected keys {unexpected[:6]}, "
            f"{len(shapes)} shape mismatches {shapes[:4]}")
    model.load_state_dict(clean, strict=True)
    return model.to(device).eval(), args
