#!/usr/bin/env bash
# Builds the real components dkron-ha's tests run (kube-apiserver, kube-controller-manager,
# etcd) from their pinned Go modules into a gitignored cache. A module's binaries are rebuilt
# only when the go.mod/go.sum that pins them changes or one is missing, so a warm machine pays
# nothing. Prints the cache's bin directory.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
# Outside the checkout (a fresh clone on a warm machine reuses it); override with DKRON_HA_TOOLS_CACHE.
cache="${DKRON_HA_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dkron-ha/tools}"
mkdir -p "$cache/bin"

# Test binaries run this at start-up: two at once must not write the same files.
exec 9>"$cache/.lock"
if command -v flock >/dev/null; then flock 9; fi

# build_module DIR NAME=PACKAGE... : builds each PACKAGE of the Go module in tests/tools/DIR
# as $cache/bin/NAME. The stamp $cache/DIR.stamp holds the sha256 of that go.mod+go.sum.
build_module() {
	local dir="$1"; shift
	local stamp="$cache/$dir.stamp"
	local want have="" spec name pkg
	want="$(cat "$here/$dir/go.mod" "$here/$dir/go.sum" | sha256sum | cut -d' ' -f1)"
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
		(cd "$here/$dir" && CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath -ldflags='-s -w' \
			-o "$cache/bin/$name.tmp" "$pkg")
		# Renamed into place so a binary that is running is never overwritten.
		mv -f "$cache/bin/$name.tmp" "$cache/bin/$name"
	done
	echo "$want" >"$stamp"
}

build_module etcd etcd=go.etcd.io/etcd/server/v3
build_module k8s \
	kube-apiserver=k8s.io/kubernetes/cmd/kube-apiserver \
	kube-controller-manager=k8s.io/kubernetes/cmd/kube-controller-manager
echo "$cache/bin"
