"""MPI plumbing, below the driver: roles (communicator split), window (RMA), control (the layout of the parameter server's
words and rows), param_server, downpour (the worker side), allreduce, portions and lbfgs (Sandblaster's distributed parts).
Nothing here imports the driver layer (train, config, evaluate, checkpoint, metrics, the loader, topologies).
Importing this package does not initialise MPI; its modules import mpi4py.
"""
