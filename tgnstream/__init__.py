"""tgnstream: streaming inference and continual training for memory-based temporal GNNs."""

__version__ = "0.1.0"
