#!/usr/bin/env bash
# UCI heart disease on FLamby's Fed-Heart-Disease split (same test patients as FLamby's
# published table): local-only, pooled, FedAvg, FedProx, FedAdam, FedYogi; 3 seeds.
# Usage: simulations/heart_disease_flamby.sh [key=value ...]     (env: SEEDS, STRATEGIES, OUT)
set -euo pipefail
cd "$(dirname "$0")/.."
FEDMED=${FEDMED:-$(command -v fedmed || echo .venv/bin/fedmed)}
PYTHON=${PYTHON:-$(dirname "$FEDMED")/python}
if [ ! -f data/heart-disease-flamby/fedmed-data.yaml ]; then
  "$PYTHON" simulations/flamby_heart_split.py ../shared/data/uci-heart-disease data/heart-disease-flamby
fi
# The budget of simulations/heart_disease.sh: 20 rounds x 5 local epochs, lr 1e-3.
exec "$FEDMED" compare -c configs/heart_disease_flamby.yaml \
  --seeds ${SEEDS:-0 1 2} --strategies ${STRATEGIES:-fedavg fedprox fedadam fedyogi} \
  --out "${OUT:-runs/compare-heart-flamby}" \
  federation.rounds=20 federation.local_epochs=5 federation.evaluate_every=20 train.lr=0.001 "$@"
