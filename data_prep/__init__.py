"""data_prep: ImageNet, image folders and IDX files into verified HDF5 shards (`data-prep --help`)."""
