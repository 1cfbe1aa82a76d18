# dkron-ha developer entry points. `make test` is what CI runs (.ci/run).
.PHONY: inject test tools dev-cluster bench lint

# CI builds once from a clean checkout: incremental caches would only cost disk and time.
ifdef CI
export CARGO_INCREMENTAL := 0
endif

# The main job without a cluster: inject the example StatefulSet and print it.
inject:
	cargo run --quiet -- inject -f examples/dkron.yaml

# Every test: formatting and clippy first, then the real components from pinned Go modules
# (cached in ~/.cache/dkron-ha/tools, so only the first run pays), then cargo test.
test: lint tools
	cargo test --workspace

tools:
	bash tests/tools/build.sh

# A real control plane with `dkron-ha serve` registered as its webhook; Ctrl-C stops it all.
dev-cluster: tools
	cargo run --example dev_cluster

bench:
	cargo bench --bench admission

lint:
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
