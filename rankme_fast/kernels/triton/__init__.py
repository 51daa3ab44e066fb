"""Triton kernels (import this package only when a Triton backend is used: it imports triton)."""
