"""permsparse: learnable channel permutations for accurate N:M-sparse Transformers.

    import permsparse
    result = permsparse.prune(model, tokenizer, permsparse.PruneConfig(pattern="2:4"), calib=windows)
    permsparse.export(model, "out", result.sites, result.perms, pattern="2:4", score="wanda", groups=4)
    deployed = permsparse.load("out", deploy=True)
"""

from permsparse.io.export import export, load, read_plan
from permsparse.config import LearnConfig
from permsparse.core.pattern import NMPattern, count_violations, nm_mask, unstructured_mask
from permsparse.core.permutation import Permutation
from permsparse.api import PruneResult, prune
from permsparse.config import PruneConfig
from permsparse.models.sites import Site, find_sites

__version__ = "0.1.0"

__all__ = [
    "NMPattern",
    "Permutation",
    "Site",
    "LearnConfig",
    "PruneConfig",
    "PruneResult",
    "prune",
    "export",
    "load",
    "read_plan",
    "find_sites",
    "nm_mask",
    "count_violations",
    "unstructured_mask",
    "__version__",
]
