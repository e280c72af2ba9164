#!/usr/bin/env bash
# HAM10000 dermoscopy across its 4 real centres (image + record fusion):
# local-only at each centre vs pooled vs FedAvg / FedProx / FedAdam, 3 seeds.
# Epoch budget 12 for every method (12 rounds × 1 local epoch; local and pooled up to 12
# epochs with early stopping). Image size from configs/ham10000.yaml (48 px) unless overridden.
# Expensive on a 2-core CPU machine (about 20 min per seed and 2 strategies at 32 px on one
# core); a GPU is used when present (1/4 GPU per site).
# Usage: simulations/ham10000.sh [key=value ...]     (env: SEEDS, STRATEGIES, OUT, CPUS)
# e.g. the run in docs/results.md:
#   SEEDS=0 STRATEGIES="fedavg fedprox" CPUS=1 OUT=runs/compare-ham10000-v2 \
#     OMP_NUM_THREADS=1 nice -n 5 simulations/ham10000.sh data.image_size=32
set -euo pipefail
cd "$(dirname "$0")/.."
FEDMED=${FEDMED:-$(command -v fedmed || echo .venv/bin/fedmed)}
if [ ! -f data/ham10000/fedmed-data.yaml ]; then
  "$FEDMED" data import ham10000 ../shared/data/ham10000 --out data/ham10000
fi
exec "$FEDMED" compare -c configs/ham10000.yaml \
  --seeds ${SEEDS:-0 1 2} --strategies ${STRATEGIES:-fedavg fedprox fedadam} \
  ${CPUS:+--cpus "$CPUS"} --out "${OUT:-runs/compare-ham10000}" \
  federation.rounds=12 federation.local_epochs=1 federation.evaluate_every=12 "$@"
