# Sourced by the service scripts: stop every process recorded as $PIDS/*.pid (TERM, up to
# 5 s, then KILL) and forget it.
stop() {
  [ -d "$PIDS" ] || return 0
  local f pid
  for f in "$PIDS"/*.pid; do
    [ -e "$f" ] || continue
    pid=$(cat "$f")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$f"
  done
}
