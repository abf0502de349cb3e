#!/usr/bin/env bash
# Rebalancing with hand-over, live, on two GPUs. Two Llama-3-8B-shaped models; each GPU's page
# pool is sized to hold one active model and its KV cache (pool_memory_fraction 0.2 of an
# H200's free memory, about 28 GiB), so a model without a worker can only get one by taking it
# from the other. Model a runs alone for 30 s at a load that keeps an instance on each GPU; then
# model b starts. WarmServe drains one of a's instances, hands its running requests over to a's
# other instance (each stream goes on where it was), and starts b on the freed GPU.
#   PYTHONPATH=src benchmarks/live_rebalance.sh OUTDIR [DURATION_S]
# POLICIES="warmserve warmserve-no-handover" (the default) runs both; the second lets the
# drained instance finish its requests first. Writes config.yaml, requests.csv, and per policy
# bench-<policy>.json, serve-<policy>.log, cluster-<policy>.jsonl, metrics-<policy>.txt; prints
# a table last.
set -u
out=${1:-rebalance-out}; duration=${2:-75}
cache=${WARMSERVE_CACHE_DIR:-/tmp/warmserve-live}
mkdir -p "$out"
python - "$out" "$duration" "$cache" <<'PY'
import sys
from pathlib import Path

import numpy as np
import torch

from warmserve.engine.checkpoint import write_synthetic

out, duration, cache = Path(sys.argv[1]), float(sys.argv[2]), Path(sys.argv[3])
path = cache / "synth" / "llama-3-8b"
if not (path / "config.json").exists():
    write_synthetic("llama-3-8b", path, device="cuda" if torch.cuda.is_available() else "cpu")
(out / "config.yaml").write_text("""\
cluster:
  nodes:
    - name: gpus
      host_memory_gib: 200
      pinned_cache_gib: 80
      disk_read_gbps: 2.0
      devices:
        - {type: cuda, count: 2, memory_gib: 141, h2d_gbps: 52}
models:
  - {name: llama-3-8b-a, checkpoint: "synth:llama-3-8b", dtype: bfloat16, max_context: 4096}
  - {name: llama-3-8b-b, checkpoint: "synth:llama-3-8b", dtype: bfloat16, max_context: 4096}
engine:
  kv_cache_gib: 6
  max_num_seqs: 64
  max_tokens_per_step: 4096
  use_cuda_graphs: true
  max_cuda_graph_batch: 32
policy:
  instance_capacity: 16
  min_instances: 0
  window_s: 20
  keep_alive_s: 10
  new_instance_protect_s: 5
  pool_memory_fraction: 0.2
server:
  max_queued_per_model: 2048
""")
rng = np.random.default_rng(0)
rows = []
for model, start, rate in (("llama-3-8b-a", 0.0, 9.0), ("llama-3-8b-b", 30.0, 6.0)):
    t = start
    while True:
        t += rng.exponential(1.0 / rate)
        if t >= duration:
            break
        rows.append((t, model, int(rng.integers(128, 385)), 128))
rows.sort()
with open(out / "requests.csv", "w") as f:
    f.write("arrival_s,model,input_tokens,output_tokens\n")
    f.writelines(f"{t:.4f},{m},{i},{o}\n" for t, m, i, o in rows)
print(f"{len(rows)} requests over {duration:.0f} s")
PY
source "$(dirname "$0")/live_common.sh"
for policy in ${POLICIES:-warmserve warmserve-no-handover}; do
  python -m warmserve.cli --cache-dir "$cache" --log-level warning serve \
      --config "$out/config.yaml" --policy "$policy" --port 8000 > "$out/serve-$policy.log" 2>&1 &
  pid=$!
  wait_health "$pid" 900 || { cat "$out/serve-$policy.log" >&2; exit 1; }
  sleep 12  # idle models scale to zero: the run starts with nothing active
  while sleep 1; do
    curl -s -m 5 http://127.0.0.1:8000/v1/cluster || echo '{"error": "no answer"}'; echo
  done > "$out/cluster-$policy.jsonl" 2>/dev/null &
  watcher=$!
  python -m warmserve.cli bench --url http://127.0.0.1:8000 --workload "$out/requests.csv" \
      --config "$out/config.yaml" --models llama-3-8b-a,llama-3-8b-b --duration "$duration" \
      --max-input-tokens 512 --max-output-tokens 128 --json > "$out/bench-$policy.json"
  kill "$watcher"
  curl -s -m 5 http://127.0.0.1:8000/metrics > "$out/metrics-$policy.txt"
  kill -INT "$pid"; wait "$pid"
  grep -m 20 -E "ERROR|Traceback|Error" "$out/serve-$policy.log" > "$out/errors-$policy.txt"
done
python - "$out" <<'PY'
import json, re, sys
from pathlib import Path
out = Path(sys.argv[1])
print(f"\n{'policy':22s} {'TTFT p50':>9s} {'p99':>8s} {'TPOT':>6s} {'done':>5s} {'drop':>5s} "
      f"{'in SLO':>7s} {'stalled':>7s} {'hand-overs':>10s} {'rebalances':>10s}")
for bench in sorted(out.glob("bench-*.json")):
    policy = bench.stem[len("bench-"):]
    s = json.loads(bench.read_text())["live"]
    metrics = (out / f"metrics-{policy}.txt").read_text() if (
        out / f"metrics-{policy}.txt").exists() else ""
    handed = sum(float(v) for v in re.findall(r"^warmserve_hand_overs_total\{.*\} (\S+)$",
                                              metrics, re.M))
    rebalances = set()
    for line in (out / f"cluster-{policy}.jsonl").read_text().splitlines():
        try:
            view = json.loads(line)
        except ValueError:
            continue
        for action in view.get("controller_actions", []):
            if action["action"] == "rebalance":
                rebalances.add((action["t"], action["model"], action["worker"]))
    f = lambda v: "-" if v is None else f"{v * 1000:.0f}"
    print(f"{policy:22s} {f(s['ttft_p50_s']):>9s} {f(s['ttft_p99_s']):>8s} "
          f"{f(s['tpot_mean_s']):>6s} {s['completed']:5d} {s['dropped']:5d} "
          f"{s['slo_attainment']:7.3f} {s['stalled_past_slo']:7d} {handed:10.0f} "
          f"{len(rebalances):10d}")
    for message, count in s["errors"].items():
        print(f"    {count} requests failed: {message}")
print("(milliseconds; in SLO: first token within 1 s and no later wait longer than that)")
PY
