"""Numba CPU kernels (pure functions on arrays) and their torch twins. Never imports mpi4py."""
