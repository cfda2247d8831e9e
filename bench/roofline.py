"""Roofline estimates, fused vs eager, for each fused loss: labelled estimates, never measurements.

Eager: the PyTorch code runs forward and backward on ``meta`` tensors under a dispatch mode that records every
aten kernel it would launch: the bytes it reads and writes (each eager op is its own kernel, so its inputs come
from and its outputs go to HBM), its matmul FLOPs (torch's FlopCounter formulas), its elementwise FP32 work
(one op per output element) and its exponentials (exp, softmax, log-softmax and their backwards). Views are not
kernels and count nothing. The attention losses' eager path is ``fastkd.losses.reference`` (what bench/ times as
"eager": fp32 maps from bf16 inputs, so its matmuls run at the FP32 rate); hidden_mse's is what autocast makes
of ``F.linear`` + an MSE (bf16 GEMM, fp32 loss), the comparison the issue asks for.

Fused: the kernels' own counts. Compulsory HBM bytes (each input read once per kernel; re-reads of tiles are
assumed to hit L2), tensor FLOPs from the tile products each kernel issues (hi/lo splits and 3xTF32 counted
as the extra MMAs they are), exponentials per visited (query, key) pair, and, where a kernel's innermost SASS
loop is the tile loop (attention_kl), an issue bound and a MUFU bound from that loop's instruction counts in
the static report times the tiles the kernel visits.

Time per kernel = max(bytes / HBM bandwidth, tensor FLOPs / tensor peak, FP32 FLOPs / FP32 peak, MUFU, issue)
+ a 2 µs floor per launch; the sum over kernels is the estimate. Limits: H100 SXM 3.35 TB/s, ~990 TFLOP/s
dense bf16/fp16 (half that for TF32), 67 TFLOP/s FP32, 16 MUFU results and 4 warp-instructions per SM per
clock at 1.83 GHz; H200 the same SM with 4.8 TB/s.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

GPUS = {"H100 SXM": 3.35e12, "H200": 4.8e12}  # HBM bytes/s; the SM is the same
TENSOR_PEAK = 989e12  # dense fp16/bf16 FLOP/s
TF32_PEAK = TENSOR_PEAK / 2
FP32_PEAK = 67e12
CLOCK = 1.83e9
SMS = 132
MUFU_PER_CLK_SM = 16
ISSUE_PER_CLK_SM = 4  # warp-instructions
LAUNCH_FLOOR_S = 2e-6
EXP_OPS = {"exp", "_softmax", "_log_softmax", "_log_softmax_backward_data", "_softmax_backward_data", "exp2"}


# ---------------------------------------------------------------- eager: count what the aten kernels do


class _EagerCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.kernels: list[dict] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        if returns and returns[0].alias_info is not None:  # a view: no kernel, no traffic
            return out
        tensors_in = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        tensors_out = [a for a in torch.utils._pytree.tree_leaves(out) if isinstance(a, torch.Tensor)]
        name = func.__name__.split(".")[0]
        numel_out = sum(t.numel() for t in tensors_out)
        self.kernels.append({
            "op": name,
            "bytes": sum(t.numel() * t.element_size() for t in tensors_in + tensors_out),
            "exp": numel_out if name in EXP_OPS else 0,
            "elementwise": 0 if name in ("mm", "bmm", "addmm", "baddbmm") else numel_out,
            "dtype": tensors_out[0].dtype if tensors_out else None,
        })
        return out


def eager_counts(fn, inputs: list[torch.Tensor]) -> dict:
    """Forward and backward of ``fn(*inputs)`` on meta tensors: per-kernel traffic, FLOPs and exponentials."""
    metas = [x.detach().to("meta").requires_grad_(x.requires_grad) for x in inputs]
    flops = FlopCounterMode(display=False)
    counter = _EagerCounter()
    with flops, counter:
        fn(*metas).backward()
    by_dtype: dict = defaultdict(int)
    for op, n in flops.get_flop_counts()["Global"].items():
        by_dtype[str(op)] += n
    matmul_flops = flops.get_total_flops()
    half = any(k["op"] in ("mm", "bmm", "addmm", "baddbmm") and k["dtype"] in (torch.float16, torch.bfloat16)
               for k in counter.kernels)
    return {"kernels": counter.kernels, "matmul_flops": matmul_flops, "matmul_on_tensor_cores": half}


def eager_time(counts: dict, bandwidth: float) -> float:
    peak = TENSOR_PEAK if counts["matmul_on_tensor_cores"] else FP32_PEAK
    matmuls = [k for k in counts["kernels"] if k["op"] in ("mm", "bmm", "addmm", "baddbmm")]
    share = counts["matmul_flops"] / max(1, len(matmuls))  # FLOPs split evenly over the matmul kernels
    total = 0.0
    for k in counts["kernels"]:
        flops = share if k in matmuls else 0.0
        total += max(k["bytes"] / bandwidth, flops / peak, k["elementwise"] / FP32_PEAK,
                     k["exp"] / (MUFU_PER_CLK_SM * SMS * CLOCK)) + LAUNCH_FLOOR_S
    return total


# ---------------------------------------------------------------- fused: the kernels' own counts


def _bounds(k: dict, bandwidth: float) -> dict[str, float]:
    """Seconds a fused kernel needs by each limit."""
    return {"HBM": k["bytes"] / bandwidth, "tensor": k.get("tensor_flops", 0) / k.get("peak", TENSOR_PEAK),
            "MUFU": k.get("mufu_s", 0.0), "issue": k.get("issue_s", 0.0)}


def _kernel_time(k: dict, bandwidth: float) -> float:
    return max(_bounds(k, bandwidth).values()) + LAUNCH_FLOOR_S


def _loop_bounds(row: dict | None, tiles: int) -> dict:
    """Issue and MUFU bounds of a kernel whose innermost SASS loop runs once per visited tile."""
    if row is None:
        return {}
    loop, warps = row["inner_loop"], row["num_warps"]
    return {"issue_s": tiles * loop["instructions"] * warps / (ISSUE_PER_CLK_SM * SMS * CLOCK),
            "mufu_s": tiles * loop.get("mufu", 0) * warps * 32 / (MUFU_PER_CLK_SM * SMS * CLOCK)}


def fused_attention_kl(B, H, spans, d, dtype_bytes, rows_by_kernel) -> dict:
    """Kernels of one training step: forward (with dQ), KL-row sum, dK backward, dQ scaling."""
    fwd, dk = rows_by_kernel.get("_attention_kl_fwd"), rows_by_kernel.get("_attention_kl_bwd_dk")
    bm, bn_f = (fwd["constexprs"]["BLOCK_M"], fwd["constexprs"]["BLOCK_N"]) if fwd else (64, 32)
    bn = dk["constexprs"]["BLOCK_N"] if dk else 64
    pairs = H * sum(n * n for n in spans)
    tiles_f = H * sum(math.ceil(n / bm) * math.ceil(n / bn_f) for n in spans)
    tiles_k = H * sum(math.ceil(n / bm) * math.ceil(n / bn) for n in spans)
    L = max(spans)
    bhl = B * H * L
    qk = 4 * bhl * d * dtype_bytes  # the four inputs, once
    split = 2 if dtype_bytes == 2 else 1
    kernels = [
        {"name": "forward + dQ", "bytes": qk + bhl * (4 * d + 12),
         "tensor_flops": tiles_f * bm * bn_f * (4 * d + 2 * 2 * d * split), **_loop_bounds(fwd, tiles_f)},
        {"name": "sum of KL rows", "bytes": 4 * bhl},
        {"name": "dK backward", "bytes": qk + 8 * bhl + bhl * d * dtype_bytes,
         "tensor_flops": tiles_k * bm * bn * (4 * d + 2 * d * split), **_loop_bounds(dk, tiles_k)},
        {"name": "dQ scaling", "bytes": bhl * d * (4 + dtype_bytes)},
    ]
    return {"kernels": kernels, "exp": 4 * pairs, "pairs": pairs,
            "extra_bytes": 8 * bhl + 4 * bhl * d + B * L + 4 * B + 4,
            "extra_formula": "8·B·H·L (lse_s, lse_t fp32) + 4·B·H·L·d_s (dQ fp32) + B·L (mask) + 4·B (spans) + 4"}


def fused_attention_mse(B, H, spans, d, dtype_bytes, rows_by_kernel) -> dict:
    """Gram forward, the direct kernel's early exits, and the two Gram backward launches (dQ_s, dK_s)."""
    L = max(spans)
    bhl, rows = B * H * L, H * sum(spans)
    grams = B * H * 6 * d * d * 4
    qk = 4 * bhl * d * dtype_bytes
    kernels = [
        {"name": "Gram forward", "bytes": qk + grams, "tensor_flops": rows * 2 * 6 * d * d},
        {"name": "direct forward (early exits)", "bytes": 8 * B * H},
        *({"name": f"Gram backward {x}", "bytes": 3 * bhl * d * dtype_bytes + grams // 3,
           "tensor_flops": 3 * rows * 2 * 2 * d * d, "peak": TF32_PEAK} for x in ("dQ_s", "dK_s")),
    ]
    return {"kernels": kernels, "exp": 0, "pairs": H * sum(n * n for n in spans),
            "extra_bytes": grams + B * L + 4 * B + 4,
            "extra_formula": "24·B·H·d² (six d×d fp32 Grams per head, O(B·H·d²), independent of L) + B·L (mask) "
                             "+ 4·B (spans) + 4"}


def fused_hidden_mse(K, N, d_s, d_t, dtype_bytes) -> dict:
    """Fused forward (writes R), then cuBLAS dH = R·W, dW = Rᵀ·H_s, db = ΣR and their scalings."""
    r = K * N * d_t * dtype_bytes
    hs, w = K * N * d_s * dtype_bytes, K * d_t * d_s * dtype_bytes
    gemm = 2 * K * N * d_s * d_t
    kernels = [
        {"name": "forward (R stored)", "bytes": hs + r + w + r, "tensor_flops": gemm},
        {"name": "dH = R·W", "bytes": r + w + hs, "tensor_flops": gemm},
        {"name": "dH scaling", "bytes": 2 * hs},
        {"name": "dW = Rᵀ·H_s", "bytes": r + hs + w, "tensor_flops": gemm},
        {"name": "db = ΣR", "bytes": r},
    ]
    return {"kernels": kernels, "exp": 0, "extra_bytes": r,
            "extra_formula": "K·B·L·d_t in the dot dtype (R, held between the passes)"}


def fused_time(fused: dict, bandwidth: float) -> float:
    return sum(_kernel_time(k, bandwidth) for k in fused["kernels"])


# ---------------------------------------------------------------- eager definitions


def eager_hidden_mse_autocast(h_s, h_t, w, b, mask):
    """What autocast makes of the natural eager code: the projection as a bf16 GEMM (bf16 inputs here, or fp32
    ones under CUDA autocast, which casts baddbmm's operands), the MSE in fp32."""
    proj = torch.baddbmm(b.to(h_s.dtype)[:, None, :], h_s.flatten(1, 2), w.to(h_s.dtype).transpose(1, 2))
    diff = proj.float() - h_t.flatten(1, 2).float()
    m = mask.flatten()[None, :, None].float()
    return (diff * m).square().sum() / (m.sum() * diff.shape[0] * diff.shape[-1])


# ---------------------------------------------------------------- per loss


def _bound(k: dict, bandwidth: float) -> str:
    parts = _bounds(k, bandwidth)
    return max(parts, key=parts.get)


def estimate(loss: str, B: int, L: int, d: int, spans: list[int], rows_by_kernel: dict, H: int = 12) -> dict:
    """Fused and eager estimates of one training step (forward + backward) of ``loss``, bf16 inputs."""
    from fastkd.losses import reference as ref

    bf16 = torch.bfloat16
    mask = torch.arange(L)[None, :] < torch.tensor(spans)[:, None]
    if loss == "hidden_mse":
        K, d_t = 3, 768
        fused = fused_hidden_mse(K, B * L, d, d_t, 2)
        inputs = [torch.empty(K, B, L, d, dtype=bf16, requires_grad=True), torch.empty(K, B, L, d_t, dtype=bf16),
                  torch.empty(K, d_t, d, requires_grad=True), torch.empty(K, d_t, requires_grad=True), mask]
        eager = eager_counts(eager_hidden_mse_autocast, inputs)
        eager_name = "autocast bf16: F.linear as bf16 GEMM, MSE in fp32"
    else:
        fn = fused_attention_kl if loss == "attention_kl" else fused_attention_mse
        fused = fn(B, H, spans, d, 2, rows_by_kernel)
        shape = (B, H, L, d)
        inputs = [torch.empty(shape, dtype=bf16, requires_grad=True), torch.empty(shape, dtype=bf16,
                                                                                     requires_grad=True),
                  torch.empty(shape, dtype=bf16), torch.empty(shape, dtype=bf16), mask]
        eager = eager_counts(getattr(ref, loss), inputs)
        eager_name = "fastkd.losses.reference (fp32 [B, H, L, L] maps)"
    out = {"loss": loss, "B": B, "L": L, "d": d, "H": H, "masked": min(spans) < L, "eager_path": eager_name,
           "fused_bytes": sum(k["bytes"] for k in fused["kernels"]),
           "fused_tensor_flops": sum(k.get("tensor_flops", 0) for k in fused["kernels"]),
           "fused_exp": fused["exp"], "fused_launches": len(fused["kernels"]),
           "eager_bytes": sum(k["bytes"] for k in eager["kernels"]), "eager_matmul_flops": eager["matmul_flops"],
           "eager_fp32_flops": sum(k["elementwise"] for k in eager["kernels"]),
           "eager_exp": sum(k["exp"] for k in eager["kernels"]), "eager_launches": len(eager["kernels"]),
           "extra_bytes": fused["extra_bytes"], "extra_formula": fused["extra_formula"],
           "fused_bounds": {k["name"]: _bound(k, GPUS["H100 SXM"]) for k in fused["kernels"]}}
    for gpu, bw in GPUS.items():
        tf, te = fused_time(fused, bw), eager_time(eager, bw)
        out[gpu] = {"fused_us": tf * 1e6, "eager_us": te * 1e6, "speedup": te / tf}
    return out
