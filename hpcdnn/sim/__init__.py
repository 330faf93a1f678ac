"""`hpcdnn simulate`: a cost model of Downpour, allreduce and Sandblaster on a cluster we do not have (cost.py,
profiles.py), its planning mode (plan.py) and an emulator that trains for real on a simulated clock (emulate.py)."""
