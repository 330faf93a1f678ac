"""Data: the HDF5 shard and manifest schema (shared by data_prep's writer and the reader), the JPEG codec, and the loader."""
