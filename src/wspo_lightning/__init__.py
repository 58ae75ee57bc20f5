"""Weak-to-strong preference optimisation on PyTorch Lightning."""
