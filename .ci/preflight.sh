#!/usr/bin/env bash
# Preflight for .ci/run: checks, before anything is built, that each tool CI needs is there,
# installs from Debian's packages the ones that can be installed, and stops with a message
# that says what to do for the ones that cannot. Without it a fresh machine fails minutes in,
# with an error that names neither the tool nor the fix (a libfuzzer-sys build script that
# finds no C++ compiler, a venv without pip in the Autobahn step).
#
#   .ci/preflight.sh RUST_VERSION     e.g. 1.95.0: fail unless rustc is exactly that version
#
# What is needed, and by what:
#   cc, c++        C and C++ compilers: build scripts of C code (libfuzzer-sys builds
#                  libFuzzer, which is C++, for .ci/fuzz.sh)    Debian: gcc, g++
#   python3 venv   .ci/autobahn.sh makes a venv and pip-installs kosoku into it (PYTHON, if
#                  set, is the interpreter it uses)             Debian: python3, python3-venv
#   rustfmt        cargo fmt --check                            rustup component: rustfmt
#   clippy         cargo clippy -D warnings                     rustup component: clippy
#   rustc          exactly RUST_VERSION (see .ci/run for why)   the machine's toolchain
#
# Debian packages are installed only when something is missing (with sudo when not root);
# rustup components cannot be: no machine of this kind can download a toolchain or a
# component, so a missing one is an error that says so.
set -euo pipefail

if [ "$#" -ne 1 ]; then
    echo "usage: $0 RUST_VERSION" >&2
    exit 2
fi
PINNED_RUST=$1
PYTHON=${PYTHON:-python3}

# Each check prints what it found; `missing` collects the Debian packages to install.
missing=()

check_compiler() { # command, Debian package
    if command -v "$1" >/dev/null 2>&1; then
        echo "  $1: $("$1" --version | head -n 1)"
    else
        echo "  $1: missing (Debian package $2)"
        missing+=("$2")
    fi
}

# A venv is only usable by autobahn.sh if it has pip, so make one and ask its pip: `import
# venv` alone succeeds on Debian's python3 without python3-venv, whose venvs then fail.
python_venv_works() {
    command -v "$PYTHON" >/dev/null 2>&1 || return 1
    local dir
    dir=$(mktemp -d)
    if "$PYTHON" -m venv "$dir/venv" >/dev/null 2>&1 \
        && "$dir/venv/bin/python" -m pip --version >/dev/null 2>&1; then
        rm -rf "$dir"
        return 0
    fi
    rm -rf "$dir"
    return 1
}

check_python() {
    if ! command -v "$PYTHON" >/dev/null 2>&1; then
        echo "  $PYTHON: missing (Debian packages python3, python3-venv)"
        missing+=(python3 python3-venv)
    elif python_venv_works; then
        echo "  $PYTHON: $("$PYTHON" --version 2>&1) at $(command -v "$PYTHON"), venv with pip works"
    else
        echo "  $PYTHON: $("$PYTHON" --version 2>&1) at $(command -v "$PYTHON"), but" \
            "'$PYTHON -m venv' gives no venv with pip (Debian package python3-venv)"
        missing+=(python3-venv)
    fi
}

echo "== preflight: C and C++ compilers, python3 with venv"
check_compiler cc gcc
check_compiler c++ g++
check_python

if [ "${#missing[@]}" -gt 0 ]; then
    echo "== preflight: installing Debian packages: ${missing[*]}"
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
        if ! command -v sudo >/dev/null 2>&1; then
            echo "preflight: not root and no sudo: install ${missing[*]} by hand" >&2
            exit 1
        fi
        SUDO="sudo"
    fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update
    $SUDO apt-get install -y --no-install-recommends "${missing[@]}"
    # Check again: python3-venv helps Debian's /usr/bin/python3 only, not another python3
    # that comes first on the PATH.
    missing=()
    check_compiler cc gcc
    check_compiler c++ g++
    check_python
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "preflight: still missing after the install: ${missing[*]}." >&2
        echo "  If '$PYTHON' is not Debian's python3, point PYTHON at one that has venv" >&2
        echo "  (PYTHON=/usr/bin/python3 bash .ci/run)." >&2
        exit 1
    fi
fi

echo "== preflight: the Rust toolchain"
failed=0
rustc_version=$(rustc --version 2>/dev/null || true)
echo "  rustc: ${rustc_version:-missing}"
case "$rustc_version" in
    "rustc $PINNED_RUST "*) ;;
    *)
        echo "preflight: CI is pinned to rustc $PINNED_RUST, and this is '${rustc_version:-no rustc}'." >&2
        echo "  New lints or a changed future size can fail 'clippy -D warnings' or the task-size" >&2
        echo "  test (session::tests::connection_task_stays_small) on another compiler. Run CI" >&2
        echo "  with rustc $PINNED_RUST, or move the pin in .ci/run (and rust-version in the" >&2
        echo "  Cargo.toml files) once the code passes on the new one." >&2
        failed=1
        ;;
esac
for component in rustfmt clippy; do
    if [ "$component" = rustfmt ]; then
        version=$(cargo fmt --version 2>/dev/null || true)
    else
        version=$(cargo clippy --version 2>/dev/null || true)
    fi
    if [ -n "$version" ]; then
        echo "  $component: $version"
        # clippy calls itself 0.1.MINOR: it must be the pinned toolchain's, whose lints are
        # the ones -D warnings was checked against.
        if [ "$component" = clippy ]; then
            case "$version" in
                "clippy 0.1.$(echo "$PINNED_RUST" | cut -d. -f2) "*) ;;
                *)
                    echo "preflight: cargo clippy is '$version', not rustc $PINNED_RUST's." >&2
                    failed=1
                    ;;
            esac
        fi
    else
        toolchain=$(rustup show active-toolchain 2>/dev/null | cut -d' ' -f1 || true)
        echo "preflight: the rustup component $component is missing from the toolchain" \
            "${toolchain:-in use}." >&2
        echo "  'rustup component add $component${toolchain:+ --toolchain $toolchain}' would" \
            "add it, but it downloads, and no machine of this kind can: the machine's" \
            "toolchain must come with it." >&2
        failed=1
    fi
done
if [ "$failed" -ne 0 ]; then
    exit 1
fi
echo "== preflight: everything CI needs is here"
