"""
The thresholded set score of DenseCL++* (METHOD.md 4.5) as one Triton kernel, for losses._guided_choice on a
GPU: for anchor views z [A, T, D] and keys [K, D],

    out[a, w] = sum_t qbar(z[a, t] . keys[w]),     qbar(q) = q if q > beta else -1     -> float32 [A, K]

A speed path only: the two torch ops of losses._threshold_sum compute the same table (equal within float
rounding: here the products are taken in float32 from the inputs' dtype), but write the [A, T, K] product out
and read it back; the kernel keeps each product tile in registers and thresholds and sums it there.
Importing this file needs triton (it ships with torch's CUDA builds) and registers the custom op
fused_score::threshold_sum, so torch.compile sees one opaque call; losses.py imports it when it can and
computes the score by the torch ops otherwise.
"""
import torch
import triton
import triton.language as tl

MAX_BLOCK_D = 128  # the kernel's largest block of the feature dimension


@triton.jit
def _threshold_sum_kernel(z_ptr, k_ptr, out_ptr, A, T, K, D, beta, BLOCK_T: tl.constexpr,
                          BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, N_D: tl.constexpr,
                          GROUP: tl.constexpr, PRECISION: tl.constexpr):
    """out[a, w] = sum_t qbar(z[a, t] . k[w]) for BLOCK_K keys (program axis 0) and GROUP anchor views
    (axis 1): the product tiles stay in registers, thresholded and summed there. The feature dimension D
    comes in N_D blocks of BLOCK_D (the tiles fit in shared memory at any D); with one block the keys stay
    loaded for every tile, with several they are loaded block by block."""
    w = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    d = tl.arange(0, BLOCK_D)
    if N_D == 1:
        keys = tl.load(k_ptr + w[:, None] * D + d[None, :], mask=(w[:, None] < K) & (d[None, :] < D),
                       other=0.0)
    n_t = tl.cdiv(T, BLOCK_T)
    total = tl.zeros([BLOCK_K], dtype=tl.float32)
    for i in range(0, GROUP * n_t):
        a, t = tl.program_id(1) * GROUP + i // n_t, (i % n_t) * BLOCK_T + tl.arange(0, BLOCK_T)
        s = tl.zeros([BLOCK_K, BLOCK_T], dtype=tl.float32)
        for j in range(0, N_D):
            dj = j * BLOCK_D + d
            q = tl.load(z_ptr + (a * T + t[:, None]) * D + dj[None, :],
                        mask=(t[:, None] < T) & (dj[None, :] < D) & (a < A), other=0.0)
            if N_D > 1:
                keys = tl.load(k_ptr + w[:, None] * D + dj[None, :],
                               mask=(w[:, None] < K) & (dj[None, :] < D), other=0.0)
            s += tl.dot(keys, tl.trans(q), input_precision=PRECISION)  # float32 [BLOCK_K, BLOCK_T]
        total += tl.sum(tl.where(t[None, :] < T, tl.where(s > beta, s, -1.0), 0.0), 1)
        last = i % n_t == n_t - 1  # the view's last tile: write its sums, start the next view's
        tl.store(out_ptr + a * K + w, total, mask=(w < K) & (a < A) & last)
        total = tl.where(last, 0.0, total)


def launch(z, keys, beta, block_t, block_k, group, num_warps, num_stages):
    """_threshold_sum_kernel on z [A, T, D] and keys [K, D] with one block config -> float32 [A, K]. D
    comes in blocks of at most MAX_BLOCK_D (a [256 x 512] bf16 key tile alone would fill an H100's 228
    KB of shared memory). PRECISION 'ieee' for float32 inputs: full float32 products, no TF32 (for
    bf16/fp16 inputs Triton ignores the flag: their products are exact in the float32 accumulator)."""
    (A, T, D), K = z.shape, keys.shape[0]
    z, keys = z.contiguous(), keys.to(z.dtype).contiguous()
    out = torch.empty(A, K, dtype=torch.float32, device=z.device)
    block_d = min(MAX_BLOCK_D, max(16, triton.next_power_of_2(D)))
    _threshold_sum_kernel[(triton.cdiv(K, block_k), triton.cdiv(A, group))](
        z, keys, out, A, T, K, D, beta, BLOCK_T=block_t, BLOCK_K=block_k, BLOCK_D=block_d,
        N_D=triton.cdiv(D, block_d), GROUP=group,
        PRECISION="ieee" if z.dtype == torch.float32 else "tf32", num_warps=num_warps,
        num_stages=num_stages)
    return out


@torch.library.custom_op("fused_score::threshold_sum", mutates_args=())
def threshold_sum(z: torch.Tensor, keys: torch.Tensor, beta: float) -> torch.Tensor:
    """The score table by _threshold_sum_kernel; a custom op, so torch.compile treats it as one opaque
    call. Blocks: the fastest of bench.py's sweep on an H200."""
    block_t = min(64, max(16, triton.next_power_of_2(z.shape[1])))
    return launch(z, keys, beta, block_t, 256, 8, 8, 4 if block_t == 16 else 3)


@threshold_sum.register_fake
def _(z, keys, beta):
    return z.new_empty(z.shape[0], keys.shape[0], dtype=torch.float32)
