"""Interoperability: PyTorch weight import/export, Flax NNX modules, checkpoints."""
