"""fastkd: performance-first knowledge distillation for BERT-style encoders."""

from fastkd import losses
from fastkd.capture import ActivationCapture, Captured, capture

__version__ = "0.1.0"
__all__ = ["losses", "ActivationCapture", "Captured", "capture", "__version__"]
