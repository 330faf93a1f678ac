"""Topologies by name: what the one training driver (hpcdnn/train.py) does with a replica's gradient.

    Kind = topology("downpour")        # the class; hpcdnn/topologies/base.py says what the driver calls on it
A new topology is one module in this package (a subclass of base.Topology) and one line below. Entries are
"module:Class" so that listing the names (Config's allowed values, --help) imports neither torch nor MPI.
"""

from __future__ import annotations

import importlib

TOPOLOGIES = {
    "local": "hpcdnn.topologies.sgd:Local",  # one process
    "allreduce": "hpcdnn.topologies.allreduce:Allreduce",  # synchronous data-parallel SGD (Horovod/DDP baseline)
    "downpour": "hpcdnn.topologies.downpour:Downpour",  # asynchronous SGD against a sharded parameter server
    "sandblaster": "hpcdnn.topologies.sandblaster:Sandblaster",  # distributed batch L-BFGS
}


def topology(name: str):
    """The topology class registered as `name`."""
    if name not in TOPOLOGIES:
        raise ValueError(f"--topology={name!r} is not one of {', '.join(TOPOLOGIES)}")
    module, _, cls = TOPOLOGIES[name].partition(":")
    return getattr(importlib.import_module(module), cls)
