"""Fused Triton kernels behind :mod:`fastkd.losses` (installed as ``fastkd.kernels``).

One file per kernel: the Triton kernel(s), a ``torch.autograd.Function`` and a thin functional entry.
The pure-PyTorch reference each kernel is tested against lives in :mod:`fastkd.losses.reference`.
"""

if __name__ == "kernels":
    # Imported as the top-level ``kernels``: a checkout's root is on sys.path (pytest, ``python -m``) and someone
    # asked for PyPI's ``kernels``, which transformers >= 5.25 depends on and imports at start-up
    # (``from kernels import CUDAProperties``); this folder shadowed it and every model import failed. fastkd
    # never imports this folder by that name (it is ``fastkd.kernels``), so hand over to the installed package.
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _spec = _machinery.PathFinder.find_spec(
        "kernels", [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _root])
    if _spec is not None:
        _module = _util.module_from_spec(_spec)
        _sys.modules["kernels"] = _module  # the import statement hands out what sys.modules holds at its end
        _spec.loader.exec_module(_module)
