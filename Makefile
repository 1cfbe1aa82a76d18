# dkron-ha developer entry points. `make test` is what CI runs (.ci/run).
.PHONY: inject test tools dev-cluster bench lint

# CI builds once from a clean checkout: incremental caches would only cost disk and time.
ifdef CI
export CARGO_INCREMENTAL := 0
endif

# The main job without a cluster: inject the example StatefulSet and print it.
inject:
	cargo run --quiet -- inject -f examples/dkron.yaml

# Every test: formatting and clippy first; then the real control plane and node components
# (etcd, Kubernetes, CoreDNS, helm) from pinned Go modules, after installing the nodes' Debian
# packages if missing (as root on Debian); cached in ~/.cache/dkron-ha/tools, so only the first
# run pays.
test: lint tools
	cargo test --workspace
	cd tests/tools/dkron-standin && GOFLAGS=-mod=mod go test ./...

tools:
	bash tests/tools/build.sh

# A cluster with real nodes and dkron-ha installed from the chart; Ctrl-C stops it all.
# DKRON_BIN=/path/to/static/dkron imports Dkron; DEV_CLUSTER_ARGS="--nodes 2" etc.
DEV_CLUSTER_ARGS ?=
dev-cluster: tools
	cargo run --example dev_cluster -- $(DEV_CLUSTER_ARGS)

bench:
	cargo bench --bench admission

lint:
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
