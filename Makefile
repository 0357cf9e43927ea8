# The two commands of the README. Both bootstrap what they need first.
SHELL := /bin/bash
ENV := source scripts/env.sh &&
KD := target/debug/kd

.PHONY: demo test bootstrap build golden bench lint

bootstrap:
	@bash scripts/bootstrap

build: bootstrap
	@$(ENV) cargo build -p kd-cli -p kd-python

## Train a teacher and distill a student on the embedded data set, 3 seeds,
## against the same student trained alone; prints the result table.
demo: build
	@bash scripts/demo

## The whole test suite.
test: bootstrap
	@$(ENV) cargo build -p kd-cli -p kd-python && OMP_NUM_THREADS=1 cargo nextest run --workspace --no-fail-fast

## Regenerate the golden fixtures from the PyTorch reference script.
golden: bootstrap
	@$(ENV) cd tests/golden && python gen.py && python models.py && python sgd.py && python dot.py && python pth.py && python augment.py && python imagefolder.py && python randaugment.py && python mixup.py

bench: bootstrap
	@$(ENV) cargo bench -p kd-engine

lint: bootstrap
	@$(ENV) cargo fmt --all -- --check && cargo clippy --workspace --all-targets -- -D warnings
