"""Input validation shared by every loss: clear errors, raised before any kernel launch.

Each check names the argument and what was expected. Shape, dtype and device checks are free (metadata only).
Checks that must look at the data (mask values, rows without a valid token) cost a device-to-host sync on a
GPU; they are on by default and can be switched off for production training loops with
``FASTKD_CHECK_VALUES=0`` or :func:`set_value_checks`.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_value_checks = os.environ.get("FASTKD_CHECK_VALUES", "1") not in ("0", "false", "False", "")


def set_value_checks(enabled: bool) -> None:
    """Turn the data-dependent checks (mask values, empty rows) on or off for this process."""
    global _value_checks
    _value_checks = bool(enabled)


def value_checks_enabled() -> bool:
    return _value_checks


@contextlib.contextmanager
def value_checks(enabled: bool) -> Iterator[None]:
    """Within the block, turn the data-dependent checks on or off (e.g. off in a trainer whose masks come from
    its own collator, so each loss call costs no device-to-host sync)."""
    global _value_checks
    previous, _value_checks = _value_checks, bool(enabled)
    try:
        yield
    finally:
        _value_checks = previous


def check_float(name: str, x: torch.Tensor, ndim: int | tuple[int, ...] | None = None, what: str = "") -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.is_meta:
        raise ValueError(f"{name}: expected a tensor with data, got a meta tensor (no values to compute with)")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(
            f"{name}: expected a floating dtype (float16, bfloat16, float32 or float64), got {x.dtype}"
        )
    if ndim is not None:
        dims = (ndim,) if isinstance(ndim, int) else ndim
        if x.dim() not in dims:
            shape = what or " or ".join(f"{d}-D" for d in dims)
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(x.shape)}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    # Only tensors: what is not one (a mask given as a list) is refused by its own check, naming it.
    items = [(k, v) for k, v in tensors.items() if isinstance(v, torch.Tensor)]
    if not items:
        return
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{name}: expected a tensor on {first.device} (the device of {first_name}), got {t.device}"
            )


def check_mask(mask: torch.Tensor | None, batch: int, length: int, name: str = "mask") -> torch.Tensor | None:
    """Validate a [B, L] padding mask (bool or 0/1, 1 = real token) and return it as bool (or None)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor of shape [B, L] or None, got {type(mask).__name__}")
    if mask.dim() != 2 or tuple(mask.shape) != (batch, length):
        raise ValueError(f"{name}: expected shape [B, L] = [{batch}, {length}], got {tuple(mask.shape)}")
    if mask.is_complex():
        raise ValueError(f"{name}: expected a bool or 0/1 tensor, got {mask.dtype}")
    if mask.dtype != torch.bool:
        if _value_checks and not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"{name}: expected bool or 0/1 values (1 = real token), found other values")
        mask = mask != 0
    if _value_checks and batch > 0 and not bool(mask.any(dim=1).all()):
        rows = (~mask.any(dim=1)).nonzero().flatten().tolist()
        raise ValueError(f"{name}: every sequence needs at least one valid token; rows {rows[:8]} have none")
    return mask


def check_transport(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, a_name: str = "a", b_name: str = "b") -> None:
    """A batch of transport problems: cost [P, M, N] with histograms a [P, M] and b [P, N], on one device."""
    check_float("cost", cost, 3, "[P, M, N]")
    check_float(a_name, a, 2, "[P, M]")
    check_float(b_name, b, 2, "[P, N]")
    check_same_device(cost=cost, **{a_name: a, b_name: b})
    P, M, N = cost.shape
    if 0 in cost.shape:  # the reference's max() over an empty dim and the kernel's empty launch disagreed
        raise ValueError(f"cost: expected a non-empty batch of transport problems [P, M, N], got {tuple(cost.shape)}")
    if tuple(a.shape) != (P, M):
        raise ValueError(f"{a_name}: expected shape [P, M] = [{P}, {M}], got {tuple(a.shape)}")
    if tuple(b.shape) != (P, N):
        raise ValueError(f"{b_name}: expected shape [P, N] = [{P}, {N}], got {tuple(b.shape)}")


def check_finite(mask: torch.Tensor | None = None, *, batch_dim: int = 0, seq_dim: int | dict[str, int] | None = None,
                 **tensors: torch.Tensor | None) -> None:
    """Every tensor holds only finite values at its valid positions (``mask`` [B, L] bool over ``batch_dim`` and
    ``seq_dim``; padded positions may hold anything, no loss reads them). ``seq_dim`` may be {name: dim} when
    the tensors keep their tokens at different dims (a tensor not named there is checked whole). One
    device-to-host sync for all of them; a data-dependent check, so off with the other value checks. A NaN
    teacher would otherwise be zeroed by the softmax-based losses (loss 0, NaN gradients) instead of failing."""
    if not _value_checks:
        return
    items = [(name, x) for name, x in tensors.items() if x is not None and x.numel()]
    if not items:
        return
    dims = seq_dim if isinstance(seq_dim, dict) else {name: seq_dim for name, _ in items}
    flags = []
    for name, x in items:
        ok = torch.isfinite(x)
        if mask is not None and dims.get(name) is not None:
            shape = [1] * x.dim()
            shape[batch_dim], shape[dims[name]] = mask.shape
            ok = ok | ~mask.reshape(shape)
        flags.append(ok.all())
    for (name, _), finite in zip(items, torch.stack(flags).tolist(), strict=True):
        if not finite:
            where = " at valid (unmasked) positions" if mask is not None and dims.get(name) is not None else ""
            raise ValueError(f"{name}: expected finite values{where}, found NaN or inf")


def check_directions(**tensors: torch.Tensor) -> None:
    """Every vector along the last dim has a direction (a non-zero norm): a loss on normalised vectors (Patient KD)
    has none to compare at the zero vector, where F.normalize's eps would give a loss of 1 and a gradient of
    order 1/eps. A data-dependent check (one device-to-host sync), so off with the other value checks."""
    if not _value_checks:
        return
    flags = torch.stack([(x != 0).any(dim=-1).all() for x in tensors.values()]).tolist()
    for name, ok in zip(tensors, flags, strict=True):
        if not ok:
            raise ValueError(f"{name}: expected vectors with a direction; found the zero vector, which Patient KD's "
                             f"normalised loss cannot compare (h/‖h‖ is undefined there)")


def check_sinkhorn_args(eps, iters) -> None:
    """Sinkhorn's settings, for both paths: the torch one looped forever with eps=-1 and returned a NaN plan for
    eps=0 or NaN, and took iters of 0, -5 or 2.7."""
    if eps is not None and not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and math.isfinite(eps)
                                and 0 < eps <= 1):
        raise ValueError(f"eps: expected a number in (0, 1] (relative to max |cost|), got {eps!r}")
    if iters is not None and not (isinstance(iters, int) and not isinstance(iters, bool) and iters >= 1):
        raise ValueError(f"iters: expected a positive int, got {iters!r}")


def check_histograms(**hists: torch.Tensor) -> None:
    """Transport marginals [P, M]: finite, non-negative, each row summing to 1 (to the rounding of its dtype).
    Data-dependent (one sync), so off with the other value checks."""
    if not _value_checks:
        return
    items = [(n, h) for n, h in hists.items() if h.numel()]
    if not items:
        return
    flags = []
    for _, h in items:
        tol = 1e-4 if h.dtype in (torch.float32, torch.float64) else 2e-2
        sums = h.double().sum(-1)
        flags += [torch.isfinite(h).all(), (h >= 0).all(), ((sums - 1).abs() <= tol).all()]
    got = torch.stack(flags).tolist()
    for i, (name, h) in enumerate(items):
        finite, nonneg, sums_to_one = got[3 * i: 3 * i + 3]
        if not (finite and nonneg):
            raise ValueError(f"{name}: expected finite, non-negative masses")
        if not sums_to_one:
            bad = h.double().sum(-1)
            raise ValueError(f"{name}: expected each row to sum to 1 (a histogram), got sums "
                             f"{[round(float(s), 6) for s in bad[:4]]}")
