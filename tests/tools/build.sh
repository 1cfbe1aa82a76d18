#!/usr/bin/env bash
# Builds the real components dkron-ha's tests run (etcd, the Kubernetes control plane and node
# components, CoreDNS, helm, actionlint; zig and cargo-zigbuild for the image) and the Dkron stand-in from their pinned Go modules into a gitignored cache, after making
# sure the Debian packages the test nodes run (containerd, runc, CNI plugins, iptables) are there. A module's binaries are
# rebuilt only when the go.mod/go.sum that pins them (or their version stamp) changes or one is
# missing, so a warm machine pays nothing. Prints the cache's bin directory.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
# Outside the checkout (a fresh clone on a warm machine reuses it); override with DKRON_HA_TOOLS_CACHE.
cache="${DKRON_HA_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dkron-ha/tools}"
mkdir -p "$cache/bin"

# Test binaries run this at start-up: two at once must not write the same files.
exec 9>"$cache/.lock"
if command -v flock >/dev/null; then flock 9; fi

# The Debian packages the tests need (mostly the test nodes'): PACKAGE=a file it installs. Installed when missing if this runs
# as root on Debian (saying so), otherwise the script stops with the command that installs them.
node_packages=(
	containerd=/usr/bin/containerd
	runc=/usr/sbin/runc
	containernetworking-plugins=/usr/lib/cni/bridge
	iptables=/usr/sbin/iptables
	conntrack=/usr/sbin/conntrack
	# Not the nodes': the virtualenv zig is installed into (below).
	python3-venv=/usr/share/doc/python3-venv
)
ensure_node_packages() {
	local missing=() spec
	for spec in "${node_packages[@]}"; do
		if [ ! -e "${spec#*=}" ]; then missing+=("${spec%%=*}"); fi
	done
	if [ "${#missing[@]}" -eq 0 ]; then return 0; fi
	local install="apt-get install -y --no-install-recommends ${missing[*]}"
	if [ "$(id -u)" = 0 ] && [ -f /etc/debian_version ] && command -v apt-get >/dev/null; then
		echo "installing the Debian packages the tests need: ${missing[*]} (apt-get update; $install)" >&2
		DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
		DEBIAN_FRONTEND=noninteractive $install -qq >&2
	else
		echo "the tests need these Debian packages: ${missing[*]}; install them with:" >&2
		echo "  sudo apt-get update && sudo $install" >&2
		exit 1
	fi
}
ensure_node_packages

# [EXTRA_LDFLAGS=...] [WITH_SOURCES=1] build_module DIR NAME=PACKAGE... : builds each PACKAGE of
# the Go module in tests/tools/DIR as $cache/bin/NAME, linked with EXTRA_LDFLAGS (-X version
# stamps) if set. The stamp $cache/DIR.stamp holds the sha256 of that go.mod+go.sum
# (+ EXTRA_LDFLAGS; + the module's own non-test .go files with WITH_SOURCES=1, for a module
# whose program is its own code).
build_module() {
	local dir="$1"; shift
	local stamp="$cache/$dir.stamp"
	local extra="${EXTRA_LDFLAGS:-}"
	local want have="" spec name pkg
	want="$({ cat "$here/$dir/go.mod" "$here/$dir/go.sum"; printf '%s' "$extra"
		if [ "${WITH_SOURCES:-0}" = 1 ]; then
			find "$here/$dir" -maxdepth 1 -name '*.go' ! -name '*_test.go' | LC_ALL=C sort | xargs cat
		fi; } | sha256sum | cut -d' ' -f1)"
	if [ -f "$stamp" ]; then have="$(cat "$stamp")"; fi
	local todo=()
	for spec in "$@"; do
		name="${spec%%=*}"
		if [ "$have" != "$want" ] || [ ! -x "$cache/bin/$name" ]; then todo+=("$spec"); fi
	done
	if [ "${#todo[@]}" -eq 0 ]; then return 0; fi

	# Until every binary is rebuilt, no stamp may vouch for the old ones.
	rm -f "$stamp"
	for spec in "${todo[@]}"; do
		name="${spec%%=*}"
		pkg="${spec#*=}"
		echo "building $name from $pkg (pinned in tests/tools/$dir) into $cache/bin" >&2
		(cd "$here/$dir" && CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath -ldflags="-s -w $extra" \
			-o "$cache/bin/$name.tmp" "$pkg")
		# Renamed into place so a binary that is running is never overwritten.
		mv -f "$cache/bin/$name.tmp" "$cache/bin/$name"
	done
	echo "$want" >"$stamp"
}

build_module etcd etcd=go.etcd.io/etcd/server/v3
# Stamped with their release like Kubernetes' own build (hack/lib/version.sh), so /version says
# v1.36.3 rather than v0.0.0-master and version checks (helm's kubeVersion) see a real one.
EXTRA_LDFLAGS="-X k8s.io/component-base/version.gitVersion=v1.36.3 \
-X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=36 \
-X k8s.io/client-go/pkg/version.gitVersion=v1.36.3 \
-X k8s.io/client-go/pkg/version.gitMajor=1 -X k8s.io/client-go/pkg/version.gitMinor=36" \
	build_module k8s \
	kube-apiserver=k8s.io/kubernetes/cmd/kube-apiserver \
	kube-controller-manager=k8s.io/kubernetes/cmd/kube-controller-manager \
	kube-scheduler=k8s.io/kubernetes/cmd/kube-scheduler \
	kubelet=k8s.io/kubernetes/cmd/kubelet \
	kube-proxy=k8s.io/kubernetes/cmd/kube-proxy \
	kubectl=k8s.io/kubernetes/cmd/kubectl
build_module coredns coredns=github.com/coredns/coredns
# Stamped like helm's own Makefile: its version, and the Kubernetes version of its client-go
# (v0.37 -> 1.37) as the default for `helm template` and `helm lint`.
EXTRA_LDFLAGS="-X helm.sh/helm/v3/internal/version.version=v3.22.0 \
-X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=37 \
-X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=37" \
	build_module helm helm=helm.sh/helm/v3/cmd/helm
# Lints the release and CI workflows (.github/workflows) in the test command.
build_module actionlint actionlint=github.com/rhysd/actionlint/cmd/actionlint
# The Dkron stand-in the tests run when DKRON_BIN names no real Dkron (a test fixture).
WITH_SOURCES=1 build_module dkron-standin dkron-standin=.

# The static musl build of the image the tests run (`make image`, xtask): the Rust target, zig
# (from PyPI, in a virtualenv in the cache) and cargo-zigbuild, at the versions xtask names.
# The arm64 target is `make image-check`'s business, not the test command's.
ensure_image_toolchain() {
	local xtask="$here/../../xtask/src/lib.rs" zig_version zigbuild_version
	zig_version="$(sed -n 's/^pub const ZIGLANG_VERSION: &str = "\(.*\)";/\1/p' "$xtask")"
	zigbuild_version="$(sed -n 's/^pub const CARGO_ZIGBUILD_VERSION: &str = "\(.*\)";/\1/p' "$xtask")"
	if command -v rustup >/dev/null && ! rustup target list --installed | grep -qx x86_64-unknown-linux-musl; then
		echo "adding the Rust target x86_64-unknown-linux-musl (rustup target add)" >&2
		rustup target add x86_64-unknown-linux-musl >&2
	fi
	if [ "$(cat "$cache/zig.stamp" 2>/dev/null)" != "$zig_version" ] || [ ! -x "$cache/bin/zig" ]; then
		echo "installing zig $zig_version (pip install ziglang) into $cache/zig" >&2
		rm -rf "$cache/zig" "$cache/zig.stamp"
		python3 -m venv "$cache/zig" >&2
		"$cache/zig/bin/pip" install --quiet "ziglang==$zig_version" >&2
		ln -sf "$("$cache/zig/bin/python" -c 'import ziglang, os; print(os.path.dirname(ziglang.__file__))')/zig" "$cache/bin/zig"
		echo "$zig_version" >"$cache/zig.stamp"
	fi
	if [ "$(cat "$cache/cargo-zigbuild.stamp" 2>/dev/null)" != "$zigbuild_version" ] || [ ! -x "$cache/bin/cargo-zigbuild" ]; then
		echo "installing cargo-zigbuild $zigbuild_version into $cache/bin" >&2
		rm -f "$cache/cargo-zigbuild.stamp"
		cargo install --quiet "cargo-zigbuild@$zigbuild_version" --locked --no-default-features --root "$cache" >&2
		echo "$zigbuild_version" >"$cache/cargo-zigbuild.stamp"
	fi
}
ensure_image_toolchain
echo "$cache/bin"
