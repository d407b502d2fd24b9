"""mpitrain: MPI data-parallel training of PyTorch models with compressed gradients."""
__version__ = "0.1.0"
