#!/usr/bin/env bash
# The first live measurement of the headline: the same bursty workload against `warmserve serve`
# with --policy warmserve and with --policy serverlessllm, on one GPU (config h100-live).
#   PYTHONPATH=src benchmarks/live_compare.sh OUTDIR [DURATION_S] [RATE_RPS]
# Prints a table last; writes bench-<policy>.json and serve-<policy>.log into OUTDIR.
# POLICIES="warmserve" runs only those (the table shows every bench-*.json in OUTDIR); SEED=K
# replays another draw of the workload (default 1).
# While the bench runs, the cluster view (/v1/cluster: every worker's models, their engines'
# queues and KV blocks, the controller's latest actions) is recorded every 2 s into
# cluster-<policy>.jsonl, so a run that goes wrong shows how.
set -u
out=${1:-live-out}; duration=${2:-90}; rate=${3:-6}
cache=${WARMSERVE_CACHE_DIR:-/tmp/warmserve-live}
mkdir -p "$out"
python - <<PY
from pathlib import Path
import torch
from warmserve.engine.checkpoint import write_synthetic
path = Path("$cache") / "synth" / "llama-3-8b"
if not (path / "config.json").exists():
    write_synthetic("llama-3-8b", path, device="cuda" if torch.cuda.is_available() else "cpu")
PY
source "$(dirname "$0")/live_common.sh"
for policy in ${POLICIES:-warmserve serverlessllm}; do
  python -m warmserve.cli --cache-dir "$cache" --log-level warning serve --config h100-live \
      --policy "$policy" --port 8000 > "$out/serve-$policy.log" 2>&1 &
  pid=$!
  wait_health "$pid" || { cat "$out/serve-$policy.log" >&2; exit 1; }
  sleep 12  # past new_instance_protect_s and keep_alive_s: idle models have scaled to zero
  while sleep 2; do
    curl -s -m 5 http://127.0.0.1:8000/v1/cluster || echo '{"error": "no answer"}'; echo
  done > "$out/cluster-$policy.jsonl" 2>/dev/null &
  watcher=$!
  python -m warmserve.cli bench --url http://127.0.0.1:8000 --workload azure-functions \
      --rate "$rate" --duration "$duration" --max-input-tokens 512 --max-output-tokens 64 \
      --seed "${SEED:-1}" --json > "$out/bench-$policy.json"
  kill "$watcher"
  kill -INT "$pid"; wait "$pid"
done
python - "$out" <<'PY'
import json, sys
out = sys.argv[1]
print(f"\n{'policy':14s} {'TTFT p50':>10s} {'TTFT p90':>10s} {'TTFT p99':>10s} {'TPOT':>8s} "
      f"{'done':>6s} {'drop':>5s} {'in SLO':>7s} {'activations':>11s}")
from pathlib import Path
for policy in ("warmserve", "serverlessllm"):
    if not Path(f"{out}/bench-{policy}.json").exists():
        continue
    s = json.load(open(f"{out}/bench-{policy}.json"))["live"]
    f = lambda v, scale=1000: "-" if v is None else f"{v * scale:.1f}"
    print(f"{policy:14s} {f(s['ttft_p50_s']):>10s} {f(s['ttft_p90_s']):>10s} "
          f"{f(s['ttft_p99_s']):>10s} {f(s['tpot_mean_s']):>8s} {s['completed']:6d} "
          f"{s['dropped']:5d} {s['slo_attainment']:7.3f} {s['activations']!s:>11s}")
print("(milliseconds)")
PY
