#!/usr/bin/env bash
# hardened-run.sh UNIT WORK SYNAPSE_CONF_DIR S3_ENDPOINT BUCKET (from scripts/test-package.sh)
#
# Runs the installed daemon the way its systemd unit would, for machines where systemd is not
# PID 1 (containers, CI): a mount and PID namespace rebuilt like the unit's sandbox, then
# setpriv and a seccomp filter built from the unit's own SystemCallFilter= lines. What is emulated
# (read from UNIT where it has a value):
#   User=/Group=, NoNewPrivileges=, CapabilityBoundingSet= (empty), AmbientCapabilities=
#   ProtectSystem=strict + ReadWritePaths= (the whole tree read-only but the media store and
#     state_dir), ProtectHome=, PrivateTmp=, PrivateDevices= (a /dev of null, zero, full, random,
#     urandom, tty), ProtectProc=invisible + ProcSubset=pid (a proc of our PID namespace with
#     hidepid=invisible,subset=pid), ProtectKernelTunables= (/sys read-only)
#   SystemCallFilter= (the groups expanded with systemd-analyze syscall-filter, default action
#     SystemCallErrorNumber=), SystemCallArchitectures=native, MemoryDenyWriteExecute=,
#     RestrictAddressFamilies= (seccomp, as systemd does them), UMask=
# Not emulated: PrivateUsers= (a user namespace mapping only root and User=), RestrictNamespaces=,
#   LockPersonality=, RestrictRealtime=, ProtectClock=, ProtectHostname=, KeyringMode=, RemoveIPC=,
#   LimitNOFILE= (the daemon's raise of its soft limit is exercised by the tests).
# Then checks what the hardening must not break: the startup scan uploads a fresh file at once
# (only the read lease tells it is complete: upload.settle is 1h here) and leaves one held open
# for writing until it is closed (the close event, inotify), inotify uploads a new file, the
# control socket answers `status`, /metrics and /health answer, READY=1 reaches NOTIFY_SOCKET,
# and SIGTERM stops it cleanly.
set -euo pipefail
unit=$1 work=$2 hs=$3 endpoint=$4 bucket=$5
cd "$(dirname "$0")/.."
source scripts/lib.sh
log() { printf '==> hardened: %s\n' "$*" >&2; }
die() { log "FAIL: $*"; [[ -f "$work/hardened.log" ]] && sed 's/^/    /' "$work/hardened.log" >&2; exit 1; }
setting() { sed -n "s/^$1=//p" "$unit"; }

if ! /usr/bin/python3 -c 'import seccomp' 2>/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-seccomp >&2 ||
    { apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-seccomp >&2; } || true
  /usr/bin/python3 -c 'import seccomp' 2>/dev/null || die "python3-seccomp (Debian) is needed for the syscall filter"
fi

user=$(setting User)
state=/var/lib/synapse-s3-offload
media="$work/media"
[[ $(setting ProtectSystem) == strict && $(setting PrivateTmp) == true && $(setting ProtectProc) == invisible ]] ||
  die "$unit no longer has the settings this emulates (ProtectSystem=strict, PrivateTmp, ProtectProc=invisible)"

# --- The seccomp filter, from the unit's lines -----------------------------------------------------
setting SystemCallFilter >"$work/syscall-filter"
setting RestrictAddressFamilies >"$work/address-families"
systemd-analyze syscall-filter >"$work/syscall-groups" 2>/dev/null
errno=$(setting SystemCallErrorNumber)
umask_=$(setting UMask)
[[ -s "$work/syscall-filter" && $(setting MemoryDenyWriteExecute) == true ]] || die "no SystemCallFilter/MemoryDenyWriteExecute in $unit"
cat >"$work/seccomp-exec.py" <<'EOF'
# seccomp-exec.py GROUPS FILTER FAMILIES ERRNO -- PROGRAM ARGS: loads the unit's filters, execs.
import errno, os, sys, seccomp

groups_file, filter_file, families_file, err = sys.argv[1:5]
argv = sys.argv[sys.argv.index("--") + 1:]
groups, cur = {}, None
for line in open(groups_file):
    s = line.strip()
    if line.startswith("@"):
        cur = groups.setdefault(s, [])
    elif cur is not None and s and not s.startswith("#"):
        cur.append(s)

def expand(item, seen=()):
    if not item.startswith("@"):
        return {item}
    out = set()
    for m in groups.get(item, []):
        if m not in seen:
            out |= expand(m, seen + (item,))
    return out

# systemd: the first line sets an allow list; later lines add to it, or remove with ~.
allowed = set()
for i, line in enumerate(open(filter_file).read().split("\n")):
    if not line.strip():
        continue
    deny = line.startswith("~")
    names = set().union(*(expand(n) for n in line.lstrip("~").split()))
    if i == 0 and deny:
        sys.exit("a deny-list filter: not emulated")
    allowed = allowed - names if deny else allowed | names
# MemoryDenyWriteExecute=, as systemd implements it; RestrictAddressFamilies= on socket().
PROT_WRITE, PROT_EXEC, SHM_EXEC = 0x2, 0x4, 0o100000
g = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
deny = seccomp.ERRNO(errno.EPERM)
g.add_rule(deny, "mmap", seccomp.Arg(2, seccomp.MASKED_EQ, PROT_WRITE | PROT_EXEC, PROT_WRITE | PROT_EXEC))
g.add_rule(deny, "mprotect", seccomp.Arg(2, seccomp.MASKED_EQ, PROT_EXEC, PROT_EXEC))
g.add_rule(deny, "pkey_mprotect", seccomp.Arg(2, seccomp.MASKED_EQ, PROT_EXEC, PROT_EXEC))
g.add_rule(deny, "shmat", seccomp.Arg(2, seccomp.MASKED_EQ, SHM_EXEC, SHM_EXEC))
fams = {"AF_UNIX": 1, "AF_INET": 2, "AF_INET6": 10}
keep = {fams[n] for n in open(families_file).read().split()}
for fam in range(0, 64):
    if fam not in keep:
        g.add_rule(seccomp.ERRNO(errno.EAFNOSUPPORT), "socket", seccomp.Arg(0, seccomp.EQ, fam))
g.load()
code = getattr(errno, err)
f = seccomp.SyscallFilter(defaction=seccomp.ERRNO(code))
unknown = 0
for name in sorted(allowed):
    try:
        f.add_rule(seccomp.ALLOW, name)
    except (RuntimeError, ValueError):
        unknown += 1  # not a syscall of this architecture
# Last: the allow list may not allow seccomp() itself (systemd loads all before the exec).
f.load()
print(f"seccomp: {len(allowed) - unknown} syscalls allowed, default {err}", file=sys.stderr)
os.execv(argv[0], argv)
EOF

# --- The sandbox ---------------------------------------------------------------------------------
cat >"$work/sandbox.sh" <<'EOF'
# Runs inside `unshare --mount --pid --fork` as root; ends by exec'ing the daemon as User=.
set -euo pipefail
work=$1 media=$2 state=$3 user=$4 errno=$5 umask_=$6
shift 6
mount -n --make-rprivate /
keep_dev=$(mktemp -d /run/sso-dev.XXXXXX)
mount -n -t tmpfs -o mode=0755,nosuid,noexec tmpfs "$keep_dev"
for d in null zero full random urandom tty; do touch "$keep_dev/$d"; mount -n --bind "/dev/$d" "$keep_dev/$d"; done
# ReadWritePaths=: bind each onto itself first, so that making the rest read-only leaves them.
for p in "$media" "$state"; do mount -n --bind "$p" "$p"; done
# ProtectSystem=strict: every other mount read-only (but the API file systems, rebuilt below).
findmnt -rno TARGET | while read -r m; do
  case "$m" in /proc* | /dev* | /sys* | "$media" | "$state" | "$keep_dev"*) continue ;; esac
  mount -n -o remount,bind,ro "$m" 2>/dev/null || true
done
mount -n -o remount,bind,ro /sys 2>/dev/null || true # ProtectKernelTunables=
for d in /home /root /run/user; do # ProtectHome=
  if [[ -d $d ]]; then mount -n -t tmpfs -o ro,mode=0000 tmpfs "$d"; fi
done
mount -n -t tmpfs -o mode=1777 tmpfs /tmp # PrivateTmp=
mount -n -t tmpfs -o mode=1777 tmpfs /var/tmp
mount -n --move "$keep_dev" /dev # PrivateDevices=
mount -n -t proc -o hidepid=invisible,subset=pid proc /proc # ProtectProc=, ProcSubset=
umask "$umask_"
# User= also sets HOME (and USER, LOGNAME) to the user's.
HOME=$(getent passwd "$user" | cut -d: -f6) USER=$user LOGNAME=$user
export HOME USER LOGNAME
exec setpriv --reuid="$user" --regid="$user" --init-groups --no-new-privs \
  --bounding-set=-all --inh-caps=-all --ambient-caps=-all \
  /usr/bin/python3 "$work/seccomp-exec.py" "$work/syscall-groups" "$work/syscall-filter" "$work/address-families" "$errno" -- "$@"
EOF

# --- Files the startup scan finds ----------------------------------------------------------------------
install -d -o "$user" -g "$user" "$media/local_content/aa/bb" "$media/local_content/cc/dd"
fresh="local_content/aa/bb/freshlyclosedfile01"
held="local_content/aa/bb/heldopenforwrite002"
runuser -u "$user" -- sh -c "printf 'fresh' >'$media/$fresh'"
# "Synapse" still writing: a file kept open for writing by another process of the user.
# setpriv and `exec sleep`: one process holds the descriptor (runuser would fork, and a child
# sleep would keep the file open after the kill).
setpriv --reuid="$user" --regid="$user" --init-groups \
  sh -c "exec 9>>'$media/$held'; printf 'held' >&9; exec sleep 600" &
writer=$!
trap 'kill $writer 2>/dev/null || true' EXIT

mport=$(free_port)
notify="$work/notify.sock"
python3 - "$notify" >"$work/notify.txt" 2>&1 <<'EOF' &
import os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sys.argv[1]); os.chmod(sys.argv[1], 0o666); s.settimeout(120)
try:
    while True:
        print(s.recv(4096).decode(), flush=True)
except socket.timeout:
    pass
EOF
notify_pid=$!
trap 'kill $writer $notify_pid 2>/dev/null || true' EXIT
for _ in $(seq 1 50); do [[ -S $notify ]] && break; sleep 0.1; done

daemon_env=(
  SYNAPSE_S3_OFFLOAD__SYNAPSE_CONFIG="$hs/homeserver.yaml"
  SYNAPSE_S3_OFFLOAD__SYNAPSE_CONFIG_DIR="$hs/conf.d"
  SYNAPSE_S3_OFFLOAD__UPLOAD__SETTLE=1h
  SYNAPSE_S3_OFFLOAD__METRICS__LISTEN="127.0.0.1:$mport"
  NOTIFY_SOCKET="$notify" RUST_LOG=info
)
exec_start=$(setting ExecStart)
log "starting: $exec_start (User=$user, sandboxed)"
env "${daemon_env[@]}" unshare --mount --pid --fork --kill-child \
  bash "$work/sandbox.sh" "$work" "$media" "$state" "$user" "$errno" "$umask_" $exec_start \
  >"$work/hardened.log" 2>&1 &
sandbox=$!
# The daemon is PID 1 of its namespace: killing it ends the sandbox (unshare's --kill-child does
# not reach it: the death signal is cleared when setpriv changes the credentials).
pid=
cleanup() {
  kill "$writer" "$notify_pid" 2>/dev/null || true
  if [[ -n "$pid" ]]; then kill -KILL "$pid" 2>/dev/null || true; fi
  kill "$sandbox" 2>/dev/null || true
}
trap cleanup EXIT
for _ in $(seq 1 100); do
  pid=$(pgrep -u "$user" -f "^${exec_start%% *}" | head -n1) && break
  sleep 0.1
done

object() { [[ -f "$work/s3/$bucket/$1" ]]; }
wait_for() { # seconds description command...: polls until the command succeeds
  local deadline=$((SECONDS + $1)) what=$2
  shift 2
  until "$@"; do
    kill -0 "$sandbox" 2>/dev/null || die "the daemon exited while waiting for: $what"
    ((SECONDS < deadline)) || die "timed out: $what"
    sleep 0.2
  done
  log "ok: $what"
}
http() { python3 -c 'import sys,urllib.request as u
try: r=u.urlopen(sys.argv[1], timeout=5); print(r.status); sys.stdout.write(r.read().decode())
except u.HTTPError as e: print(e.code); sys.stdout.write(e.read().decode())' "$1"; }
export -f http

[[ -n "$pid" ]] || die "no daemon process of $user"
wait_for 60 "READY=1 on NOTIFY_SOCKET" grep -q '^READY=1' "$work/notify.txt"
status=/proc/$pid/status
grep -q '^Seccomp:[[:space:]]*2' "$status" || die "the daemon runs without its seccomp filter"
grep -q '^NoNewPrivs:[[:space:]]*1' "$status" || die "NoNewPrivs is not set"
grep -q '^CapBnd:[[:space:]]*0000000000000000' "$status" || die "capabilities are left in the bounding set"
log "ok: the daemon (pid $pid) runs as $user with seccomp, NoNewPrivs, no capabilities"
wait_for 30 "the read lease: a fresh closed file found by the startup scan is uploaded at once (settle is 1h)" object "$fresh"
sleep 2 # the held file is looked at every 250 ms meanwhile: give it some chances to go wrongly
object "$held" && die "a file still open for writing was uploaded (the read lease did not see the writer)"
log "ok: the read lease: a file held open for writing waits"
kill "$writer"
wait "$writer" 2>/dev/null || true
wait_for 30 "inotify: the held file is uploaded once closed" object "$held"
new="local_content/cc/dd/writtenwhilerunning3"
runuser -u "$user" -- sh -c "printf 'new' >'$media/$new'"
wait_for 30 "inotify: a file written while running is uploaded" object "$new"
wait_for 10 "/health answers 200" bash -c "[[ \$(http 'http://127.0.0.1:$mport/health' | sed -n 1p) == 200 ]]"
wait_for 10 "/metrics counts the three uploads" bash -c \
  "http 'http://127.0.0.1:$mport/metrics' | grep '^synapse_s3_offload_uploaded_total{outcome=\"uploaded\"} 3' >/dev/null"
runuser -u "$user" -- env "${daemon_env[@]}" ${exec_start% run} status --json >"$work/status.json" 2>"$work/status.err" ||
  die "status over the control socket failed: $(cat "$work/status.err")"
tr -d ' \n' <"$work/status.json" | grep -q '"daemon_running":true' ||
  die "status did not come from the daemon over its control socket: $(head -c 300 "$work/status.json")"
log "ok: the control socket answers status (daemon_running: true)"
kill -TERM "$pid"
for _ in $(seq 1 150); do kill -0 "$sandbox" 2>/dev/null || break; sleep 0.2; done
kill -0 "$sandbox" 2>/dev/null && die "the daemon did not stop within 30 s of SIGTERM"
wait "$sandbox" || die "the daemon exited non-zero after SIGTERM"
grep -q '^STOPPING=1' "$work/notify.txt" || die "no STOPPING=1 on NOTIFY_SOCKET"
log "ok: SIGTERM: STOPPING=1, exit 0"
if grep -v '^seccomp: ' "$work/hardened.log" | grep -qiE 'operation not permitted|EPERM|permission denied'; then
  sed 's/^/    /' "$work/hardened.log" >&2
  die "the daemon's log has permission errors (above)"
fi
log "all checks passed under the unit's restrictions"
