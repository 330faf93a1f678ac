"""hpcdnn: AlexNet and DistBelief (Downpour SGD, Sandblaster L-BFGS) on MPI and Slurm.

Importing hpcdnn never initialises MPI: only hpcdnn.mpi and the topologies that run under mpirun import mpi4py.
"""

__version__ = "0.1.0"
