#!/usr/bin/env bash
# Fuzzing: runs each cargo-fuzz target in fuzz/ for a bounded time and fails if any finds a
# crash (a panic, a failed property, a timeout or running out of memory).
#
#   .ci/fuzz.sh                               every target, FUZZ_SECONDS (60) each
#   FUZZ_SECONDS=600 .ci/fuzz.sh frames       one target, longer
#
# Targets: client_request (decoding a client's JSON request), frames (frame reading, fragment
# reassembly and the limits, the same events however reads split the bytes), channel_index
# (subscribe, unsubscribe, disconnect and publish against a model).
#
# Built on the stable toolchain with `-s none` (no sanitizer, which would need nightly); the
# fuzz targets still check their properties with assertions. Installs cargo-fuzz if missing.
# The corpus grows in fuzz/corpus/TARGET and crashes land in fuzz/artifacts/TARGET (both
# ignored by git); reproduce one with `cargo fuzz run -s none TARGET PATH`, print it with
# `cargo fuzz fmt -s none TARGET PATH`, and turn it into a regression test in the library.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

SECONDS_EACH=${FUZZ_SECONDS:-60}
if [ "$#" -gt 0 ]; then
    TARGETS=("$@")
else
    TARGETS=(client_request frames channel_index history)
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== cargo install cargo-fuzz --locked"
    cargo install cargo-fuzz --locked
fi
cargo fuzz --version

echo "== cargo fuzz build -s none"
cargo fuzz build -s none

LOGS=target/fuzz-logs
mkdir -p "$LOGS"
failed=()
summary=()
for target in "${TARGETS[@]}"; do
    echo "== fuzz $target for ${SECONDS_EACH}s"
    corpus=fuzz/corpus/$target
    mkdir -p "$corpus"
    # libFuzzer writes new inputs to the first corpus directory only: the committed seeds
    # are read, never changed.
    dirs=("$corpus")
    if [ -d "fuzz/seeds/$target" ]; then
        dirs+=("fuzz/seeds/$target")
    fi
    flags=(-max_total_time="$SECONDS_EACH" -timeout=30 -rss_limit_mb=2048 -print_final_stats=1)
    if [ "$target" = client_request ]; then
        flags+=(-dict=fuzz/dicts/json.dict)
    fi
    log=$LOGS/$target.log
    # Bounded twice: by libFuzzer's -max_total_time, and by timeout in case it hangs.
    set +e
    timeout $((SECONDS_EACH + 300)) cargo fuzz run -s none "$target" "${dirs[@]}" -- "${flags[@]}" \
        >"$log" 2>&1
    rc=$?
    set -e
    runs=$(sed -n 's/^Done \([0-9]*\) runs in \([0-9]*\) second.*/\1 runs in \2 s/p' "$log" | tail -n 1)
    if [ "$rc" -ne 0 ]; then
        echo "FAILED: $target (exit $rc); the end of $log:" >&2
        grep -v '^"' "$log" | tail -n 40 >&2
        ls fuzz/artifacts/"$target"/ 2>/dev/null | sed 's/^/  artifact: /' >&2 || true
        failed+=("$target")
        summary+=("$target: FAILED (exit $rc)")
    else
        summary+=("$target: ${runs:-? runs}")
    fi
done

echo "== fuzz summary (${SECONDS_EACH}s per target)"
printf '  %s\n' "${summary[@]}"
if [ "${#failed[@]}" -gt 0 ]; then
    echo "fuzzing found crashes in: ${failed[*]}" >&2
    exit 1
fi
