#!/usr/bin/env bash
# Counts CPU instructions per admission review (repeatable, unlike wall-clock time on a shared
# machine): builds benches/review_instructions.rs and runs it under valgrind's callgrind.
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
rm -f "$out"
