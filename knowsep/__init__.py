"""knowsep: sparse autoencoders with adaptive connection pruning for knowledge separation."""

__version__ = "0.1.0"
