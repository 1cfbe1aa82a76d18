#!/usr/bin/env bash
# Counts CPU instructions per admission review (repeatable, unlike wall-clock time on a shared
# machine): builds benches/review_instructions.rs and runs it under valgrind's callgrind, then
# prints where the instructions go.
set -euo pipefail
cd "$(dirname "$0")/../.."
exe="$(cargo bench --bench review_instructions --no-run --message-format=json 2>/dev/null \
	| python3 -c 'import sys, json
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "review_instructions":
        print(m["executable"])')"
out="$(mktemp)"
valgrind --tool=callgrind --callgrind-out-file="$out" "$exe" 2>&1 | grep -o 'refs: *[0-9,]*' | tr -d ', ' \
	| awk -F: '{printf "%d instructions per review (%s over 2000)\n", $2 / 2000, $2}'
# Where they go: our functions and the JSON parse, inclusive, as shares of the whole run.
echo "inclusive share of the run (the reviews are all of it):"
callgrind_annotate --inclusive=yes "$out" 2>/dev/null \
	| grep -E 'dkron_ha::|serde_json::de::from_trait|base64_simd' \
	| sed -E 's/^ *[0-9,]+ \( *([0-9.]+%)\) +\?\?\?:([^ ]+).*/  \1 \2/' | head -15
rm -f "$out"
