#!/usr/bin/env bash
# The synthetic DICOM + records cohort with N virtual hospitals (default 10), simulated on
# this machine with the deployment's own ServerApp and ClientApp; prints wall time and peak
# memory (also in <out>/timing.json).
# Usage: simulations/synth.sh [key=value ...]     (env: SITES, OUT)
set -euo pipefail
cd "$(dirname "$0")/.."
FEDMED=${FEDMED:-$(command -v fedmed || echo .venv/bin/fedmed)}
SITES=${SITES:-10}
ROOT=data/synth${SITES}
if [ ! -f "$ROOT/fedmed-data.yaml" ]; then
  "$FEDMED" data synth --out "$ROOT" --sites "$SITES" --central 200
fi
OUT=${OUT:-runs/sim-synth${SITES}}
rm -rf "$OUT"
TIME=$(command -v /usr/bin/time >/dev/null && echo "/usr/bin/time -v" || echo "")
exec $TIME "$FEDMED" simulate -c configs/default.yaml --out "$OUT" \
  data.root="$ROOT" data.sites=null federation.central_test="$ROOT/central" \
  federation.min_sites="$SITES" federation.rounds=3 federation.local_epochs=1 \
  data.image_size=32 train.batch_size=32 "$@"
