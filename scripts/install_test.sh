#!/usr/bin/env bash
# The install test of a built wheel: what a user without Rust gets from `pip install`.
#
#   scripts/install_test.sh [WHEEL]      (default: dist's x86_64 manylinux2014 wheel)
#
# For each CPython >= 3.10 found on this machine (PYTHONS="python3.12 /path/python" to
# choose), in a fresh venv whose PATH has no cargo or rustc: pip installs WHEEL and the test
# runner (never an sdist of celeriac), checks that `celeriac` is imported from that venv's
# site-packages and that its console script runs, then runs the demo (examples/demo.py,
# embedded SQLite) and Celery's tutorial tests (tests/brokers/test_tutorial.py, Redis on
# 127.0.0.1:6379) against it, from outside the repo so that python/ is not on sys.path.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WHEEL=${1:-$(ls -1 "$REPO"/dist/celeriac-*-cp310-abi3-*manylinux2014_x86_64*.whl 2>/dev/null | head -1)}
if [ -z "$WHEEL" ] || [ ! -f "$WHEEL" ]; then
    echo "install_test: no wheel (make wheels, or pass one)" >&2
    exit 2
fi
WHEEL=$(cd "$(dirname "$WHEEL")" && pwd)/$(basename "$WHEEL")
# What the tutorial tests import besides celeriac (tests/conftest.py), nothing compiled.
TEST_REQUIREMENTS="pytest>=8 pytest-timeout>=2.3 redis>=5"

# A PATH with no Rust toolchain: the system's directories only, never ~/.cargo/bin.
CLEAN_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
for tool in cargo rustc; do
    if PATH=$CLEAN_PATH command -v "$tool" >/dev/null; then
        echo "install_test: $tool is on the clean PATH ($CLEAN_PATH): not a clean install" >&2
        exit 1
    fi
done

find_pythons() {  # every CPython >= 3.10 here, one per minor version, as "VERSION PATH"
    local candidates=()
    if [ -n "${PYTHONS:-}" ]; then
        read -r -a candidates <<<"$PYTHONS"
    else
        local root
        root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")
        candidates=(/usr/bin/python3.1[0-9] /usr/local/bin/python3.1[0-9]
            "$root"/versions/3.1[0-9]*/bin/python3)
    fi
    local seen=" " py version
    for py in "${candidates[@]}"; do
        [ -x "$py" ] || py=$(command -v "$py" 2>/dev/null) || continue
        version=$("$py" -c 'import sys, platform
ok = platform.python_implementation() == "CPython" and sys.version_info >= (3, 10)
print("%d.%d" % sys.version_info[:2] if ok else "")' 2>/dev/null) || continue
        if [ -n "$version" ] && [[ $seen != *" $version "* ]]; then
            seen+="$version "
            echo "$version $py"
        fi
    done
}

PYS=()
while read -r line; do PYS+=("$line"); done < <(find_pythons | sort -t. -k1,1n -k2,2n)
if [ ${#PYS[@]} -eq 0 ]; then
    echo "install_test: no CPython >= 3.10 found" >&2
    exit 1
fi
echo "install_test: $(basename "$WHEEL") on CPython ${PYS[*]%% *}"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/celeriac-install-test.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
RESULTS=()
failed=0

run_one() {  # run_one VERSION PYTHON: the whole test in one fresh venv
    local version=$1 py=$2 venv="$WORK/venv-$1"
    "$py" -m venv "$venv" 2>/dev/null || "$py" -m virtualenv -q "$venv"  # Alpine: no ensurepip
    # A subshell with only the venv and the system on PATH, nothing from the caller's venv.
    (
        unset VIRTUAL_ENV PYTHONPATH PYTHONHOME CARGO_TARGET_DIR
        export PATH="$venv/bin:$CLEAN_PATH" PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
        cd "$WORK"
        python -m pip install -q --only-binary celeriac "$WHEEL" $TEST_REQUIREMENTS
        python - "$venv" <<'PY'
import pathlib, sys
import celeriac, celeriac._core
venv = pathlib.Path(sys.argv[1]).resolve()
where = pathlib.Path(celeriac._core.__file__).resolve()
if venv not in where.parents or "site-packages" not in where.parts:
    sys.exit(f"celeriac imported from {where}, not from the venv's site-packages")
print(f"celeriac {celeriac.__version__} imported from {where.relative_to(venv)}")
PY
        celeriac --help >/dev/null
        python "$REPO/examples/demo.py"
        python -m pytest -q -p no:cacheprovider -c "$REPO/pyproject.toml" --rootdir "$REPO" \
            "$REPO/tests/brokers/test_tutorial.py"
    )
}

for entry in "${PYS[@]}"; do
    version=${entry%% *} py=${entry#* }
    printf '\n===== CPython %s (%s)\n' "$version" "$py"
    t0=$SECONDS
    # Not `if run_one`: a function called as a condition runs with `set -e` off.
    set +e
    (set -e; run_one "$version" "$py")
    rc=$?
    set -e
    if [ $rc -eq 0 ]; then status=passed; else status=FAILED failed=1; fi
    RESULTS+=("$(printf 'CPython %-5s %-7s %4d s  %s' "$version" "$status" $((SECONDS - t0)) "$py")")
done
printf '\ninstall test of %s:\n' "$(basename "$WHEEL")"
printf '  %s\n' "${RESULTS[@]}"
exit $failed
