"""Data: the HDF5 shard schema (shared by data_prep's writer and the loader) and, later, the loader."""
