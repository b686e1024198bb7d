"""
fused_score.py, the Triton kernel of the thresholded set score (skipped without triton): run by Triton's CPU
interpreter against float64 through losses, its bf16 launch recorded by a fake kernel, and that launch compiled
ahead of time for sm_90.
"""
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton not installed (it ships with torch's CUDA builds)")
import fused_score  # noqa: E402 (needs triton)


FUSED_CHECK = """
import torch, torch.nn.functional as F, losses
torch.manual_seed(0)
# D = 300, 512: D in blocks of 128 (3 with a ragged one, 4), the keys loaded block by block
for A, T, D, K in ((9, 13, 24, 300), (3, 70, 32, 129), (8, 16, 128, 256), (3, 11, 300, 40), (9, 20, 512, 260)):
    z, keys = F.normalize(torch.randn(A, T, D), dim=-1), F.normalize(torch.randn(K, D), dim=-1)
    got = losses._threshold_sum(z, keys, 0.1, True)
    want = losses._threshold_sum(z.double(), keys.double(), 0.1, False)
    assert got.dtype == torch.float32 and (got.double() - want).abs().max() < 1e-4, (A, T, D, K)
B, T, D = 5, 9, 16
z = F.normalize(torch.randn(2, B, T, D) + 0.5 * torch.randn(D), dim=-1)
img = torch.arange(B)
own = torch.stack([img, B + img], -1)[None].expand(2, B, 2)
for M in (4, 12):  # sets scored member by member (M < T) and through the per-token table (M >= T)
    r = torch.randint(T, (M, 2 * B))
    for beta in (0.0, 0.4):
        want = losses._guided_choice(z.double(), z.double().reshape(2 * B, T, D), r, own, beta, fused=False)
        choice = lambda z: losses._guided_choice(z, z.reshape(2 * B, T, D), r, own, beta, fused=True)
        assert torch.equal(choice(z), want), (M, beta)
        assert torch.equal(torch.compile(choice, backend="aot_eager", fullgraph=True)(z), want), (M, beta)
print("fused ok")
"""


def test_fused_threshold_sum_equals_float64_in_the_triton_interpreter():
    """The Triton kernel of the thresholded set score, run by Triton's CPU interpreter (TRITON_INTERPRET=1, in
    a subprocess: it is read at import), on sizes that are no multiple of its blocks (T, D, keys, anchor
    views), D up to 512 (--head-out 512: D in blocks): the table equals float64, and _guided_choice with it
    picks the float64 sets in both layouts, also compiled in one graph (the custom op)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", FUSED_CHECK], env=env, capture_output=True, text=True,
                         timeout=300, cwd=os.path.dirname(os.path.abspath(__file__)))
    assert out.returncode == 0 and "fused ok" in out.stdout, out.stderr[-3000:]


class FakeKernel:
    """Stands in for fused_score._threshold_sum_kernel: records the grid and the arguments of each launch."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((grid, args, kwargs))


@pytest.mark.parametrize("T,D,block_t,block_d,n_d", [(196, 128, 64, 128, 1), (16, 128, 16, 128, 1),
                                                     (40, 512, 64, 128, 4), (9, 24, 16, 32, 1)])
def test_bf16_launch_parameters(monkeypatch, T, D, block_t, block_d, n_d):
    """The bf16 launch training makes on a GPU (the interpreter cannot run bf16 dots), recorded by a fake
    kernel: bf16 inputs (keys cast to them), a float32 [A, K] output, the grid (keys / 256, views / 8), the
    blocks of bench.py's sweep (BLOCK_T from T, BLOCK_D <= 128 in N_D blocks covering D), 'tf32' (ignored by
    Triton for bf16 dots) where float32 inputs get 'ieee'."""
    fake = FakeKernel()
    monkeypatch.setattr(fused_score, "_threshold_sum_kernel", fake)
    A, K = 20, 600
    z = torch.randn(A, T, D).to(torch.bfloat16)
    out = fused_score.threshold_sum(z, torch.randn(K, D, dtype=torch.float32), 0.5)
    (grid, args, kw), = fake.launches
    assert out.shape == (A, K) and out.dtype == torch.float32 and grid == (3, 3)
    assert args[0].dtype == args[1].dtype == torch.bfloat16 and args[1].is_contiguous()
    assert args[3:] == (A, T, K, D, 0.5)
    assert kw == dict(BLOCK_T=block_t, BLOCK_K=256, BLOCK_D=block_d, N_D=n_d, GROUP=8, PRECISION="tf32",
                      num_warps=8, num_stages=4 if block_t == 16 else 3)
    assert block_d * n_d >= D > block_d * (n_d - 1)
    fused_score.launch(z.float(), torch.randn(K, D), 0.5, 16, 128, 4, 4, 3)
    assert fake.launches[1][2]["PRECISION"] == "ieee" and fake.launches[1][0] == (5, 5)


H100_SHARED = 232448  # bytes of shared memory one block may use on an H100 / H200 (227 KB)


@pytest.mark.parametrize("D", [128, 512])
def test_bf16_kernel_fits_an_h100(monkeypatch, D):
    """The launch of the bf16 path (recorded by FakeKernel) compiled ahead of time for sm_90 by Triton's own
    compiler and ptxas, no GPU needed: its tiles fit the 227 KB of shared memory (with D = 512 in one block,
    the kernel before the loop over D needed 320 KB and could not launch)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    fake = FakeKernel()
    monkeypatch.setattr(fused_score, "_threshold_sum_kernel", fake)
    fused_score.threshold_sum(torch.randn(16, 196, D).to(torch.bfloat16), torch.randn(512, D), 0.5)
    (_, _, kw), = fake.launches
    monkeypatch.undo()
    options = {k: kw.pop(k) for k in ("num_warps", "num_stages")}
    types = dict(z_ptr="*bf16", k_ptr="*bf16", out_ptr="*fp32", A="i32", T="i32", K="i32", D="i32", beta="fp32")
    source = ASTSource(fn=fused_score._threshold_sum_kernel, signature={**types, **{k: "constexpr" for k in kw}},
                       constexprs=kw)
    try:
        kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    except RuntimeError as e:  # the environment (no ptxas in this triton), not our kernel
        if "ptxas" in str(e) and "not found" in str(e):
            pytest.skip(str(e)[:200])
        raise
    assert 0 < kernel.metadata.shared <= H100_SHARED, kernel.metadata.shared
