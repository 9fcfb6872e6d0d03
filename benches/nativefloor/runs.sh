#!/usr/bin/env bash
# Alternate the Python floor with the native floor (bare, real) ROUNDS times; logs in results/.
set -euo pipefail
cd "$(dirname "$0")"
ROUNDS=${ROUNDS:-3}
REQ=${REQ:-3000}
OUT=${OUT:-results/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
BIN=./target/release/nativefloor
for r in $(seq 1 "$ROUNDS"); do
  for what in python bare real bare+overlap real+overlap; do
    f="$OUT/round$r-$what.txt"
    { echo "uptime before: $(uptime)"
      if [ "$what" = python ]; then
        (cd ../.. && python -m nebula.cli.main bench --floor --chains 16 --requests "$REQ")
      else
        mode=${what%+overlap}; extra=(); [ "$mode" != "$what" ] && extra=(--overlap)
        "$BIN" run --mode "$mode" "${extra[@]}" --chains 1,16 --requests "$REQ"
      fi
      echo "uptime after: $(uptime)"; } > "$f" 2>&1
    echo "== round $r $what"; grep -E "RATIO|at once against|uptime before" "$f"
  done
done
echo "logs in $OUT"
