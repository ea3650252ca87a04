#!/usr/bin/env bash
# The nightly kernel matrix (`make kernels`): KSMH DIR SEEDS.
# Writes DIR/YYYYmmdd-HHMMSS/matrix.{json,md}, then compares it with the newest earlier run
# in DIR (`ksmh compare`). Exit status: 1 if the matrix has a mismatch or is worse than the
# previous night, 2 on an error, else 0.
set -uo pipefail
ksmh=$1 dir=$2 seeds=$3
out="$dir/$(date +%Y%m%d-%H%M%S)"
previous=$(find "$dir" -mindepth 2 -maxdepth 2 -name matrix.json -printf '%h\n' 2>/dev/null | sort | tail -n 1)
"$ksmh" kernels check --seeds "$seeds" --out "$out"
status=$?
if [[ $status -eq 2 ]]; then
  exit 2
fi
if [[ -n $previous ]]; then
  "$ksmh" compare "$previous" "$out" | tee "$out/compare.md"
  rc=${PIPESTATUS[0]}
  if [[ $rc -gt $status ]]; then
    status=$rc
  fi
fi
exit "$status"
