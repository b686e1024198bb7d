"""
Part kernel of bench.py (run through it: python bench.py --gpu-check, or --skip train,vit,data,e2e,run): the
thresholded set score of DenseCL++* (losses._guided_choice) by the fused Triton kernel against the two torch
ops, and the kernel's block sizes swept (the fastest on an H200 is the one fused_score.py launches).
"""
import time

import torch

import losses
import vit

# BLOCK_T, BLOCK_K, GROUP, warps, stages of the kernel sweep
KERNEL_CONFIGS = [(64, 128, 8, 8, 3), (32, 128, 8, 4, 3), (32, 256, 8, 8, 3), (64, 256, 8, 8, 3),
                  (16, 256, 8, 8, 4), (64, 128, 1, 4, 3), (128, 128, 4, 8, 3), (32, 128, 16, 4, 4),
                  (64, 256, 16, 8, 3), (64, 256, 8, 8, 4), (64, 256, 4, 8, 3), (16, 128, 8, 4, 4)]


def bench_kernel(cfg, device, rows, median_time, free, beta=0.5, M=256, D=128):
    """Part kernel (CUDA with triton): losses._guided_choice at the bench size, the fused Triton score against
    the two torch ops (bf16 product, float32 sum), on clustered unit tokens (cosines spread over [-0.5, 1], as
    trained features, not the ~0 of random ones): median times, the largest error of each score table against
    float64 on 8 anchor views, and how often each picks the float64 choice's set (the bf16 path training
    runs); the fused table's error at D = 512 (--head-out 512: D in blocks), the same features repeated 4 times
    and halved, so the float64 table is the same; then the kernel alone for every block config of
    KERNEL_CONFIGS at T tokens and at 16. median_time(fn, device, warmup, steps) and
    free(device) are bench.py's timer and memory reset."""
    if device.type != "cuda" or losses.fused_score is None:
        rows.append({"part": "kernel", "name": "no CUDA or no triton: skipped"})
        return
    B, T = cfg.batch_size, (cfg.img_size // vit.CONFIGS[cfg.model]["patch_size"]) ** 2
    g = torch.Generator(device).manual_seed(0)
    protos = torch.nn.functional.normalize(torch.randn(64, D, device=device, generator=g), dim=-1)
    pick = torch.randint(64, (2, B, T), device=device, generator=g)
    z = protos[pick] + 0.8 * torch.randn(2, B, T, D, device=device, generator=g) / D ** 0.5
    z = torch.nn.functional.normalize(z, dim=-1).to(torch.bfloat16)
    z_all, img = z.reshape(2 * B, T, D), torch.arange(B, device=device)
    keys = z_all.reshape(-1, D)  # every token of the batch: the per-token layout of M >= T
    r = torch.randint(T, (M, 2 * B), device=device, generator=g)
    own = torch.stack([img, B + img], -1)[None].expand(2, B, 2)
    row = {"part": "kernel", "name": f"thresholded set score, B={B} T={T} M={M}", "beta": beta}
    try:
        with torch.no_grad():
            want = losses._guided_choice(z.double(), z_all.double(), r, own, beta, fused=False)
            exact = losses._threshold_sum(z_all[:8].double(), keys.double(), beta, False)
            for fused in (True, False):
                key = "fused" if fused else "unfused"
                t = median_time(lambda: losses._guided_choice(z, z_all, r, own, beta, fused=fused), device,
                                cfg.warmup, cfg.steps)
                table = losses._threshold_sum(z_all[:8], keys, beta, fused)
                best = losses._guided_choice(z, z_all, r, own, beta, fused=fused)
                row.update({f"{key}_ms": 1e3 * t,
                            f"{key}_max_err": (table.double() - exact).abs().max().item(),
                            f"{key}_same_choice": (best == want).double().mean().item()})
            wide = torch.cat([z_all[:8]] * 4, -1) / 2, torch.cat([keys] * 4, -1) / 2  # exact in bf16
            row["fused_max_err_D512"] = (losses._threshold_sum(*wide, beta, True).double() - exact).abs().max().item()
        row["ratio"] = row["fused_ms"] / row["unfused_ms"]
        for T_ in (T, 16):  # every candidate block config: the exact score and the score on 16 tokens
            zt = z_all[:, :T_].contiguous()
            for c in KERNEL_CONFIGS:
                kw = dict(zip(("BLOCK_T", "BLOCK_K", "GROUP", "num_warps", "num_stages"), c))
                try:
                    t = median_time(lambda: losses.fused_score.launch(zt, keys, beta, *c), device, 2, 10)
                    row.setdefault("configs", []).append(dict(T=T_, ms=1e3 * t, **kw))
                except Exception as e:
                    row.setdefault("configs", []).append(dict(T=T_, error=str(e)[:300], **kw))
    except Exception as e:  # one broken part must not cost the rest of a GPU check
        row["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
    rows.append(row)
    print(f"  [{time.perf_counter() - cfg.t_start:.0f} s] kernel: {row}", flush=True)
    free(device)
