"""Kernels and their pure-torch twins (Triton kernels live in ``kernels.triton``, imported lazily)."""
