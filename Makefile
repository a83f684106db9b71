# Entry points of the study. `make repro` and `make test` are the two set-up
# commands of the README; both install everything first (idempotent).
SHELL := /bin/bash
VENV := $(CURDIR)/.venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp
PROFILE ?= default
KERNEL := mtl

# glibc's default malloc returns freed tensor memory to the kernel on every
# step; on a small CPU machine that made torch 2-3.7x slower.  These keep it.
export MALLOC_MMAP_MAX_ := 0
export MALLOC_TRIM_THRESHOLD_ := 100000000000
export DVC_NO_ANALYTICS := 1
export PATH := $(VENV)/bin:$(PATH)

.PHONY: setup apt kernel dvc-config repro test sweep learning-curve clean-results help

help:
	@echo "make repro              set up, then run the whole DVC pipeline (default CPU profile)"
	@echo "make repro PROFILE=paper   the paper's settings (MobileNetV2, 224 px, GPU)"
	@echo "make test               set up, then run the test suite"
	@echo "make repro PROFILE=full    every package of the table, no caps (CPU, <= 100 min): results/profiles/full/"
	@echo "make learning-curve PROFILE=full   the best recipe on 1k..all training pictures (results/learning_curve/)"
	@echo "make sweep              a papermill parameter sweep, scored on val (SWEEP=sweeps/stage1.yaml)"
	@echo "make setup              only install (.venv, Debian tools, Jupyter kernel, DVC config)"

setup: $(STAMP) kernel dvc-config

# Debian side: apt package lists (the corpus downloads .deb files by name) and
# libmagic (AugLy).  Needs root or sudo once; skipped when already satisfied.
apt:
	@bash scripts/setup_apt.sh

$(STAMP): pyproject.toml Makefile scripts/setup_apt.sh
	@bash scripts/setup_apt.sh
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=23"
	# torch first, pinned: these builds lie on the machine's disk (see README).
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

kernel: $(STAMP)
	@$(PY) -m mtl.runtime install-kernel --name $(KERNEL)

dvc-config: $(STAMP)
	@$(VENV)/bin/dvc config core.analytics false
	@$(VENV)/bin/dvc config core.check_update false

repro: setup
ifeq ($(PROFILE),default)
	$(VENV)/bin/dvc repro
else
	scripts/profile_run.sh $(PROFILE)
endif

# One thread per process: the tests run many small processes (DataLoader workers, two
# torchrun ranks, notebook kernels) on two cores, where OpenMP threads that spin while
# waiting made single tests several times slower.
test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

clean-results:
	rm -rf results/notebooks

# A papermill parameter sweep scored on val (sweeps/*.yaml); SWEEP_SET overrides every variant.
SWEEP ?= sweeps/stage1.yaml
SWEEP_SET ?=
sweep: setup
	$(VENV)/bin/dvc repro evalset features
	$(PY) -m mtl.sweep $(SWEEP) $(if $(SWEEP_SET),--set $(SWEEP_SET))

# The learning curve (sweeps/learning_curve.yaml): the profile's corpus, evaluation set and
# feature cache first (only those stages), then every point, scored on val and test.
learning-curve: setup
ifeq ($(PROFILE),default)
	$(VENV)/bin/dvc repro evalset features
	$(PY) -m mtl.learning_curve sweeps/learning_curve.yaml
else
	# the profile's own data folders: its corpus and eval set (the feature cache is built on first use)
	$(VENV)/bin/mtl corpus --profile profiles/$(PROFILE).yaml
	$(VENV)/bin/mtl evalset --profile profiles/$(PROFILE).yaml
	$(PY) -m mtl.learning_curve sweeps/learning_curve.yaml --profile profiles/$(PROFILE).yaml
endif
	$(PY) -m mtl.report --readme README.md
