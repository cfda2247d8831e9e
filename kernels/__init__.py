"""Fused Triton kernels behind :mod:`fastkd.losses` (installed as ``fastkd.kernels``).

One file per kernel: the Triton kernel(s), a ``torch.autograd.Function`` and a thin functional entry.
The pure-PyTorch reference each kernel is tested against lives in :mod:`fastkd.losses.reference`.
"""
