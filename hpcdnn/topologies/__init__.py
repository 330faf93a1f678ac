"""Topologies: what the training loop does with a replica's gradient (registry in progress)."""
