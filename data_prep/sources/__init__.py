"""Data sources, one module each (imagenet, folder, idx): `add_arguments(parser)` and `open_source(args)`."""
