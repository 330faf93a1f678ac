"""MPI plumbing, below the driver: roles (communicator split, model-parallel replicas), window (RMA), control (the layout
of the parameter server's words and rows), param_server, downpour (the worker side), allreduce, portions and lbfgs
(Sandblaster's distributed parts), and model parallelism: exchange (activations between a replica's ranks as autograd
functions), partition (layers split by output units) and towers (AlexNet's two towers).
Nothing here imports the driver layer (train, config, evaluate, checkpoint, metrics, the loader, topologies); partition
and towers build on hpcdnn.models. Importing this package does not initialise MPI; its modules import mpi4py.
"""
