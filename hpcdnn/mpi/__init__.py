"""The distributed topologies and their MPI plumbing: roles (communicator split), window (RMA), param_server,
downpour, allreduce, sandblaster. Importing this package does not initialise MPI; its modules import mpi4py.
"""
