"""Share: continual learning in one shared low-rank subspace (arXiv 2602.06043)."""

__version__ = "0.1.0"
