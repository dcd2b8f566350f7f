#!/usr/bin/env bash
# A team on several machines, on one: two hearth instances on loopback
# behind nginx (bench/nginx-team.conf), each agent session pinned to one
# instance by its session header. bench/team.py runs the sessions, kills
# one instance halfway and checks that its sessions move and carry on.
#
#   bench/team.sh
#   HEARTH=/path/to/hearth MODEL=/path/to.gguf bench/team.sh
#
# Environment: HEARTH (default target/release/hearth; a copy is run, so a
# rebuild meanwhile does no harm), MODEL (default SmolLM2-135M-Instruct
# Q4_1 in ~/.cache/hearth/models), HEARTH_ARGS (more `hearth serve` flags),
# NGINX_CONF (default bench/nginx-team.conf: the template to test),
# KEEP=1 (keep the temporary directory: nginx and hearth logs).
# Installs nginx with apt-get when it is missing. Exits non-zero when a
# check fails.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
hearth="${HEARTH:-$root/target/release/hearth}"
model="${MODEL:-${HEARTH_HOME:-$HOME/.cache/hearth}/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
conf="${NGINX_CONF:-$here/nginx-team.conf}"
read -r -a extra <<<"${HEARTH_ARGS:-}"

say() { echo "==> $*" >&2; }
die() { echo "bench/team.sh: $*" >&2; exit 1; }

case "${1:-}" in
    "") ;;
    -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "no arguments (see --help)" ;;
esac

[[ -x "$hearth" ]] || die "missing $hearth (cargo build --release)"
[[ -f "$model" ]] || die "model not found: $model (scripts/fetch-models.sh fetches it)"
[[ -f "$conf" ]] || die "missing $conf"
if ! command -v nginx >/dev/null; then
    say "installing nginx"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null \
        || die "apt-get install nginx failed"
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/hearth-team.XXXXXX")"
# nginx's worker runs as an unprivileged user when started as root: it must
# reach its temporary files inside this directory.
chmod 755 "$work"
mkdir -p "$work/logs" "$work/tmp"
pids=()
cleanup() {
    local pid
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if [[ "${KEEP:-0}" == 1 ]]; then
        say "kept $work"
    else
        rm -rf "$work"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

cp "$hearth" "$work/hearth"

declare -A addr pid
# Starts instance $1 and waits for the address it prints once ready.
start_hearth() {
    local name="$1" out="$work/$1.out" i
    : >"$out"
    nice -n 10 "$work/hearth" serve --port 0 --model "$model" --threads 1 "${extra[@]}" \
        >"$out" 2>"$work/logs/$name.log" &
    pid[$name]=$!
    pids+=("$!")
    for ((i = 0; i < 600; i++)); do
        addr[$name]="$(sed -n 's|^hearth listening on http://\([^ ]*\).*|\1|p' "$out")"
        [[ -n "${addr[$name]}" ]] && return 0
        kill -0 "${pid[$name]}" 2>/dev/null || break
        sleep 0.1
    done
    tail -n 20 "$work/logs/$name.log" >&2
    die "hearth $name did not start"
}

start_hearth a
start_hearth b
say "hearth a on ${addr[a]}, b on ${addr[b]}"

port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
server="max_fails=1 fail_timeout=30s;"
sed -e "s|^\( *\)listen @LISTEN@;|\1listen 127.0.0.1:$port;|" \
    -e "s|^\( *\)@SERVERS@\$|\1server ${addr[a]} $server\n\1server ${addr[b]} $server|" \
    "$conf" >"$work/nginx.conf"
nginx -p "$work" -e "$work/logs/error.log" -c "$work/nginx.conf" -t -q \
    || die "nginx rejected $work/nginx.conf"
nginx -p "$work" -e "$work/logs/error.log" -c "$work/nginx.conf" -g 'daemon off;' &
pids+=("$!")
for ((i = 0; ; i++)); do
    curl -sf -o /dev/null "http://127.0.0.1:$port/health" && break
    ((i < 100)) || die "nginx does not answer on 127.0.0.1:$port"
    sleep 0.1
done
say "nginx on 127.0.0.1:$port"

# In the background, so that a signal to this script ends it at once.
python3 "$here/team.py" --proxy "http://127.0.0.1:$port" \
    --instance "a=${addr[a]}=${pid[a]}" --instance "b=${addr[b]}=${pid[b]}" &
pids+=("$!")
# (Quiet: bash would report the instance that team.py kills.)
rc=0
wait "$!" 2>/dev/null || rc=$?
say "done in ${SECONDS}s"
exit "$rc"
