#!/usr/bin/env bash
# Protocol conformance: runs the Autobahn|Testsuite cases 1 to 10 (compression, 12 and 13, is
# excluded: wshub offers none) against examples/autobahn_echo.rs, wshub's own connection layer,
# through kosoku (a Python 3 runner of Autobahn's own case files), and compares each case's
# verdicts with tests/autobahn/expected-results.json. Fails on any difference, as
# tokio-tungstenite's CI does: a case that gets better is a change to commit, too.
#
#   .ci/autobahn.sh                       run and compare
#   AUTOBAHN_UPDATE=1 .ci/autobahn.sh     run and rewrite the expected results
#
# Environment: AUTOBAHN_VENV (default target/autobahn-venv), AUTOBAHN_TIMEOUT (seconds for the
# whole kosoku run, default 600), PYTHON (default python3). Reports go to target/autobahn/.
# Only the loopback interface is used.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

PYTHON=${PYTHON:-python3}
VENV=${AUTOBAHN_VENV:-target/autobahn-venv}
TIMEOUT=${AUTOBAHN_TIMEOUT:-600}
EXPECTED=tests/autobahn/expected-results.json
OUT=target/autobahn
KOSOKU_VERSION=0.1.0
# Autobahn has no case 8.
CASES=(-i '1.*' -i '2.*' -i '3.*' -i '4.*' -i '5.*' -i '6.*' -i '7.*' -i '9.*' -i '10.*')

echo "== kosoku $KOSOKU_VERSION in $VENV"
if ! "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('kosoku') != '$KOSOKU_VERSION')" 2>/dev/null; then
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "kosoku==$KOSOKU_VERSION"
fi
KOSOKU=$(cd "$VENV/bin" && pwd)/kosoku

echo "== cargo build --release --example autobahn_echo"
cargo build --release --example autobahn_echo

rm -rf "$OUT"
mkdir -p "$OUT"

# Port 0: the echo server binds a port the kernel chooses and prints it, so no other process
# can take the port between choosing and binding it.
target/release/examples/autobahn_echo --addr 127.0.0.1:0 >"$OUT/echo.log" 2>&1 &
ECHO_PID=$!
stop_echo() {
    if kill -0 "$ECHO_PID" 2>/dev/null; then
        kill "$ECHO_PID" 2>/dev/null || true
        wait "$ECHO_PID" 2>/dev/null || true
    fi
}
trap stop_echo EXIT

# Wait (at most 10 s) until it prints the address it listens on.
ADDR=
for _ in $(seq 1 100); do
    ADDR=$(sed -n 's|^autobahn echo listening on ws://\(.*\)/$|\1|p' "$OUT/echo.log")
    if [ -n "$ADDR" ]; then
        break
    fi
    if ! kill -0 "$ECHO_PID" 2>/dev/null; then
        echo "autobahn_echo exited:" >&2
        cat "$OUT/echo.log" >&2
        exit 1
    fi
    sleep 0.1
done
if [ -z "$ADDR" ]; then
    echo "autobahn_echo printed no address within 10 s:" >&2
    cat "$OUT/echo.log" >&2
    exit 1
fi

echo "== kosoku against ws://$ADDR (cases 1 to 10)"
START=$(date +%s)
# kosoku exits 1 when a case fails; the comparison below decides, so do not stop here.
set +e
(cd "$OUT" && timeout "$TIMEOUT" "$KOSOKU" "$ADDR" "${CASES[@]}" -o reports) \
    >"$OUT/kosoku.log" 2>&1
KOSOKU_RC=$?
set -e
ELAPSED=$(($(date +%s) - START))
tail -n 3 "$OUT/kosoku.log"
if ! kill -0 "$ECHO_PID" 2>/dev/null; then
    echo "autobahn_echo died during the run (kosoku exit $KOSOKU_RC):" >&2
    tail -n 50 "$OUT/echo.log" >&2
    exit 1
fi
stop_echo
if [ ! -f "$OUT/reports/index.json" ]; then
    echo "kosoku wrote no results (exit $KOSOKU_RC):" >&2
    tail -n 50 "$OUT/kosoku.log" >&2
    exit 1
fi

echo "== compare with $EXPECTED (run took ${ELAPSED}s)"
"$PYTHON" - "$OUT/reports/index.json" "$EXPECTED" "${AUTOBAHN_UPDATE:-0}" <<'EOF'
import json
import sys

index_path, expected_path, update = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
ACCEPTABLE = {"OK", "NON-STRICT", "INFORMATIONAL"}

# index.json is {agent: {case id: {...}}}; the agent is the server's address here.
(cases,) = json.load(open(index_path)).values()
key = lambda case_id: [int(part) for part in case_id.split(".")]
actual = {
    case_id: {"behavior": r["behavior"], "behaviorClose": r["behaviorClose"]}
    for case_id, r in sorted(cases.items(), key=lambda kv: key(kv[0]))
}
passed = sum(
    r["behavior"] in ACCEPTABLE and r["behaviorClose"] in ACCEPTABLE for r in actual.values()
)
print(f"autobahn: {passed} of {len(actual)} cases passed (OK, NON-STRICT or INFORMATIONAL)")

if update:
    # One line per case, so that a change shows as a one-line diff.
    lines = [f"  {json.dumps(c)}: {json.dumps(r)}" for c, r in actual.items()]
    with open(expected_path, "w") as f:
        f.write("{\n" + ",\n".join(lines) + "\n}\n")
    print(f"wrote {expected_path}")
    sys.exit(0 if passed == len(actual) else 1)

expected = json.load(open(expected_path))
differences = []
for case_id in sorted(set(expected) | set(actual), key=key):
    want, got = expected.get(case_id), actual.get(case_id)
    if want != got:
        differences.append(f"  {case_id}: expected {want}, got {got}")
if differences:
    print(
        "Autobahn results differ from the expected ones: either this is a regression, or the\n"
        "expected file needs the new results (AUTOBAHN_UPDATE=1 .ci/autobahn.sh). Reports are\n"
        "in target/autobahn/reports/ (index.html; one JSON file per case).",
        file=sys.stderr,
    )
    print("\n".join(differences), file=sys.stderr)
    sys.exit(1)
print("autobahn: every case as expected")
EOF
