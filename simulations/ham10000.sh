#!/usr/bin/env bash
# HAM10000 dermoscopy across its 4 real centres (image + record fusion):
# local-only at each centre vs pooled vs FedAvg / FedProx / FedAdam, 3 seeds.
# Expensive on a 2-core CPU machine (hours); a GPU is used when present (1/4 GPU per site).
# Usage: simulations/ham10000.sh [key=value ...]     (env: SEEDS, STRATEGIES, OUT)
set -euo pipefail
cd "$(dirname "$0")/.."
FEDMED=${FEDMED:-$(command -v fedmed || echo .venv/bin/fedmed)}
if [ ! -f data/ham10000/fedmed-data.yaml ]; then
  "$FEDMED" data import ham10000 ../shared/data/ham10000 --out data/ham10000
fi
exec "$FEDMED" compare -c configs/ham10000.yaml \
  --seeds ${SEEDS:-0 1 2} --strategies ${STRATEGIES:-fedavg fedprox fedadam} \
  --out "${OUT:-runs/compare-ham10000}" \
  data.image_size=64 federation.rounds=10 federation.local_epochs=2 federation.evaluate_every=10 "$@"
