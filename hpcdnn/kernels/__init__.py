"""Numba CPU kernels (pure functions on arrays) and their torch twins. Imports nothing of hpcdnn outside this package
and never mpi4py (tests/test_layout.py checks)."""
