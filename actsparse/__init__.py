"""actsparse: an activation dataset pipeline and offline analyzer for FFN activation sparsity."""

__version__ = "0.1.0"
