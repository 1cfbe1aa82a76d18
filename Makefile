# dkron-ha developer entry points. `make test` is what CI runs (.ci/run).
.PHONY: inject test tools dev-cluster bench bench-dkron bench-system lint image image-check release-artifacts

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

# The image users install, from source, without a container engine: the release dkron-ha,
# static (musl, built with cargo-zigbuild), alone in an OCI image per platform plus a
# multi-platform one, in target/image/ (docker/podman load, kind load image-archive, ctr
# images import, skopeo copy oci-archive:). PLATFORMS=amd64 builds one. Says what to install
# when the musl targets, zig or cargo-zigbuild are missing (`make test` installs amd64's).
PLATFORMS ?= amd64,arm64
image:
	cargo xtask image --platform $(PLATFORMS)

# Both platforms, every archive checked, and the arm64 executable run under qemu-user-static
# (`dkron-ha version` and `inject` must print what amd64 does). The release workflow runs it.
image-check:
	cargo xtask image-check

# Everything a release uploads, in target/release-artifacts/ (.github/workflows/release.yml).
release-artifacts:
	cargo xtask release-artifacts

# A cluster with real nodes and dkron-ha installed from the chart; Ctrl-C stops it all.
# DKRON_BIN=/path/to/static/dkron imports Dkron; DEV_CLUSTER_ARGS="--nodes 2" etc.
DEV_CLUSTER_ARGS ?=
dev-cluster: tools
	cargo run --example dev_cluster -- $(DEV_CLUSTER_ARGS)

bench:
	cargo bench --bench admission

# The end-to-end measurements as runs of their own (not part of `make test`): each suite
# BENCH_RUNS times (default 5), one scenario at a time, into target/bench/<suite>.json with a
# min / median / max table. DKRON_BIN=/path/to/static/dkron measures real Dkron.
bench-dkron:
	cargo xtask bench dkron

bench-system:
	cargo xtask bench system

lint:
	cargo fmt --check
	cargo clippy --workspace --all-targets -- -D warnings
