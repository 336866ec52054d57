"""whale_pl: WHALE world models (arXiv 2411.05619) as a PyTorch Lightning pipeline."""

__version__ = "0.1.0"
