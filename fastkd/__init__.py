"""fastkd: performance-first knowledge distillation for BERT-style encoders."""

import importlib.util as _importlib_util
import sys as _sys
from pathlib import Path as _Path


def _register_source_kernels() -> None:
    """Make ``fastkd.kernels`` importable when fastkd is used straight from a source checkout.

    The Triton kernels live in the top-level ``kernels/`` folder, which only pyproject's ``package-dir`` maps to
    ``fastkd.kernels`` (a wheel holds ``fastkd/kernels/``; an editable install adds a finder). Run from a checkout
    through ``PYTHONPATH`` -- the GPU image, where nothing is pip-installed -- neither exists, and every fused
    loss would fail with ``No module named 'fastkd.kernels'``. The kernels beside the imported ``fastkd/`` are
    the ones registered, also under an editable install (which maps the same folder).
    """
    here = _Path(__file__).resolve().parent
    source = here.parent / "kernels" / "__init__.py"
    if "fastkd.kernels" in _sys.modules or (here / "kernels").is_dir() or not source.is_file():
        return
    spec = _importlib_util.spec_from_file_location("fastkd.kernels", source,
                                                   submodule_search_locations=[str(source.parent)])
    module = _importlib_util.module_from_spec(spec)
    _sys.modules["fastkd.kernels"] = module
    spec.loader.exec_module(module)


_register_source_kernels()

from fastkd import losses  # noqa: E402
from fastkd.models.capture import ActivationCapture, Captured, capture  # noqa: E402

__version__ = "0.1.0"
__all__ = ["losses", "ActivationCapture", "Captured", "capture", "Distiller", "__version__"]


def __getattr__(name: str):
    # Imported on first use: fastkd.Distiller pulls in transformers, which `import fastkd.losses` does not need.
    if name == "Distiller":
        from fastkd.distill.distiller import Distiller

        return Distiller
    raise AttributeError(f"module 'fastkd' has no attribute {name!r}")
