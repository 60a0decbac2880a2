#!/usr/bin/env bash
# What a user installs is what the tests ran: build the wheel, install it (not editable) into a new
# virtualenv as a non-root user, and run the compose-equivalent loop (scripts/wheel_check.py) from
# a working directory that user cannot write, once per dependency set:
#   tested      the versions the test suite runs (constraints/tested.txt, `make constraints`)
#   production  what a fresh `pip install tgnstream` resolves today; written to
#               constraints/production.txt (CI refreshes it on every run)
# Usage: scripts/wheel_check.sh [tested|production|both]   (default both; `make wheel-check`)
# As root it runs the loop as the user tgncheck (created if missing); as another user, as that user.
# Env: TGNSTREAM_DATA (default ../shared/datasets/wikipedia.csv), WHEEL_CHECK_DIR (default a temp dir).
set -euo pipefail

case "${1:-both}" in
  -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  tested|production) SETS=("$1") ;;
  both) SETS=(tested production) ;;
  *) echo "usage: $0 [tested|production|both]" >&2; exit 2 ;;
esac

REPO="$(cd "$(dirname "$0")/.." && pwd)"
DATA="$(realpath "${TGNSTREAM_DATA:-$REPO/../shared/datasets/wikipedia.csv}")"
[ -r "$DATA" ] || { echo "dataset $DATA not readable (set TGNSTREAM_DATA)" >&2; exit 2; }
PYTHON="${PYTHON:-python3}"
[ -x "$REPO/.venv/bin/python" ] && PYTHON="$REPO/.venv/bin/python"
WORK="${WHEEL_CHECK_DIR:-$(mktemp -d /tmp/tgnstream-wheel-check.XXXXXX)}"
mkdir -p "$WORK"
chmod 755 "$WORK"

if [ "$(id -u)" = 0 ]; then
  USER_NAME=tgncheck
  id "$USER_NAME" >/dev/null 2>&1 || useradd --create-home --shell /bin/bash "$USER_NAME"
  as_user() { runuser -u "$USER_NAME" -- env HOME="$(getent passwd "$USER_NAME" | cut -d: -f6)" "$@"; }
else
  USER_NAME="$(id -un)"
  as_user() { "$@"; }
fi

echo "== building the wheel (from a copy of the files git would hand a user: no stale build/)"
rm -rf "$WORK/dist" "$WORK/src"
mkdir -p "$WORK/src"
if git -C "$REPO" rev-parse --git-dir >/dev/null 2>&1; then
  # A tracked file deleted in the work tree is skipped (cp's complaint only).
  (cd "$REPO" && git ls-files -co --exclude-standard -z | xargs -0 cp --parents -t "$WORK/src" 2>/dev/null) || true
else
  tar -C "$REPO" --exclude=./.venv --exclude=./build --exclude=./runs -c . | tar -C "$WORK/src" -x
fi
"$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$WORK/dist" "$WORK/src" 2>&1 | grep -v -i warning || true
WHEEL="$(ls "$WORK"/dist/tgnstream-*.whl)"
chmod -R a+rX "$WORK/dist"
# The loop runs from here: owned by root (or read-only), so any relative path the services
# write to fails instead of landing in a checkout.
mkdir -p "$WORK/readonly-cwd"
chmod 555 "$WORK/readonly-cwd"

failed=0
for set in "${SETS[@]}"; do
  venv="$WORK/venv-$set" run="$WORK/run-$set"
  rm -rf "$venv" "$run"
  mkdir -p "$venv" "$run"
  chown -R "$USER_NAME" "$venv" "$run" 2>/dev/null || true
  echo "== $set dependencies: a new virtualenv as $USER_NAME ($venv)"
  as_user python3 -m venv "$venv"
  as_user "$venv/bin/python" -m pip install -q --upgrade pip
  # The CPU build of torch first, as `make` does (a bare requirement would pull the CUDA build).
  as_user "$venv/bin/python" -m pip install -q torch==2.13.0
  if [ "$set" = tested ]; then
    as_user "$venv/bin/python" -m pip install -q -c "$REPO/constraints/tested.txt" "$WHEEL[demo]"
  else
    as_user "$venv/bin/python" -m pip install -q "$WHEEL[demo]"
    { echo "# What a fresh \`pip install tgnstream[demo]\` resolved on $(date -u +%F) (scripts/wheel_check.sh)."
      as_user "$venv/bin/python" -m pip freeze --exclude tgnstream; } > "$REPO/constraints/production.txt"
  fi
  as_user "$venv/bin/python" -m pip check
  as_user "$venv/bin/python" -m pip list 2>/dev/null | grep -E '^(torch|protobuf|grpcio|grpcio-health-checking|grpcio-reflection|pydantic|confluent-kafka|kafka-python) ' | tr -s ' ' | paste -sd ';' | sed 's/^/   versions: /'
  echo "== $set dependencies: the loop from the installed package (cwd not writable)"
  if (cd "$WORK/readonly-cwd" && as_user "$venv/bin/python" "$REPO/scripts/wheel_check.py" \
        --root "$run" --deploy "$REPO/deploy" --data "$DATA"); then
    echo "== $set dependencies: PASS"
  else
    echo "== $set dependencies: FAIL (logs in $run)"
    failed=1
  fi
done
exit "$failed"
