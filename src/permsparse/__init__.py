"""permsparse: learnable channel permutations for accurate N:M-sparse Transformers."""

from .nm import NMPattern, count_violations, nm_mask, unstructured_mask
from .permutation import Permutation

__version__ = "0.1.0"

__all__ = ["NMPattern", "Permutation", "nm_mask", "count_violations", "unstructured_mask", "__version__"]
