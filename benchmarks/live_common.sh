# Shared by the live benchmark scripts (sourced, not run).

wait_health() {  # wait_health PID [SECONDS]: until the server on :8000 answers, or fail if it
  # exits first (default 600 s)
  python - "$1" "${2:-600}" <<'PY'
import sys, time, httpx
pid, seconds = int(sys.argv[1]), int(sys.argv[2])
for _ in range(seconds):
    try:  # a server that exited is a zombie until the shell waits for it
        alive = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        alive = False
    if not alive:
        sys.exit(f"the server (pid {pid}) exited before it was healthy: see its log")
    try:
        if httpx.get("http://127.0.0.1:8000/health", timeout=2).json()["status"] == "ok":
            break
    except Exception:
        pass
    time.sleep(1)
PY
}
