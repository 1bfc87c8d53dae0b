"""permsparse: learnable channel permutations for accurate N:M-sparse Transformers.

    import permsparse
    model, tok = permsparse.load_model("smollm2-135m")
    windows = permsparse.load_text_windows("wikipedia", tok, window=512, n_calib=64)
    result = permsparse.prune(model, tok, permsparse.PruneConfig(pattern="2:4"), calib=windows.calib)
    result.save_pretrained("out", model, tok)             # permsparse.export with what the result knows
    fast = permsparse.from_pretrained("out", deploy=True)  # permsparse.load in transformers' habits
"""

from permsparse._version import __version__

from permsparse.api import PruneResult, prune
from permsparse.config import LearnConfig, PruneConfig
from permsparse.core.pattern import NMPattern, count_violations, nm_mask, unstructured_mask
from permsparse.core.permutation import Permutation
from permsparse.data.text import load_text_windows
from permsparse.io.export import export, from_pretrained, load
from permsparse.io.plan import read_plan
from permsparse.models.loading import load_model
from permsparse.models.sites import Site, find_sites

__all__ = [
    "prune",
    "PruneConfig",
    "LearnConfig",
    "PruneResult",
    "from_pretrained",
    "export",
    "load",
    "read_plan",
    "load_model",
    "load_text_windows",
    "find_sites",
    "Site",
    "NMPattern",
    "Permutation",
    "nm_mask",
    "count_violations",
    "unstructured_mask",
    "__version__",
]
