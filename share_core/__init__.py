"""Share: continual learning in one shared low-rank subspace (arXiv 2602.06043)."""

__version__ = "0.1.0"

# The task families register themselves with share_core.base (a leaf module) when imported:
# importing the package makes every family known by name, whichever module is imported first.
from . import families  # noqa: E402, F401
