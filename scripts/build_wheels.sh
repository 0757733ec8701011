#!/usr/bin/env bash
# Builds celeriac's Linux wheels through Zig (cross-compiling with maturin, no Docker) and
# its sdist, each timed.
#
#   scripts/build_wheels.sh [--profile release|ci] [--out DIR] PLATFORM...
#
# PLATFORM is one of
#   x86_64-manylinux2014    glibc 2.17 and later (RHEL 7+, Debian 9+, Ubuntu 18.04+, AL2)
#   aarch64-manylinux2014   the same on 64-bit ARM (Graviton, Ampere, Raspberry Pi OS 64)
#   x86_64-musllinux_1_2    musl 1.2 and later (Alpine 3.13+)
#   sdist
# Every wheel is abi3 (cp310-abi3: Cargo.toml's pyo3 feature abi3-py310), so one wheel per
# platform serves CPython 3.10 and every later version. The release profile is fat LTO and
# stripped (Cargo.toml); `--profile ci` builds the same wheel without LTO, for CI's time.
# Runs with the venv's maturin and ziglang on PATH (`make wheels` sees to both).
set -euo pipefail

PROFILE=release
OUT=dist
while [ $# -gt 0 ]; do
    case $1 in
        --profile) PROFILE=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --) shift; break ;;
        -*) echo "build_wheels: unknown option $1" >&2; exit 2 ;;
        *) break ;;
    esac
done
if [ $# -eq 0 ]; then
    echo "usage: $0 [--profile release|ci] [--out DIR] PLATFORM..." >&2
    exit 2
fi

cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p "$OUT"

rust_target() {  # the Rust target triple and maturin's --compatibility of a PLATFORM
    case $1 in
        x86_64-manylinux2014) echo "x86_64-unknown-linux-gnu manylinux2014" ;;
        aarch64-manylinux2014) echo "aarch64-unknown-linux-gnu manylinux2014" ;;
        x86_64-musllinux_1_2) echo "x86_64-unknown-linux-musl musllinux_1_2" ;;
        *) echo "build_wheels: unknown platform $1" >&2; return 2 ;;
    esac
}

ensure_rust_target() {  # the standard library of a cross target comes from rustup
    if ! rustup target list --installed | grep -qx "$1"; then
        rustup target add "$1"
    fi
}

timed() {  # timed COMMAND...: run it; its wall and CPU time go to $TIMING
    local TIMEFORMAT='%0R s wall, %0U s user + %0S s sys CPU'
    { time "$@" 2>&3; } 3>&2 2>"$TIMING"
}

TIMING=$(mktemp)
trap 'rm -f "$TIMING"' EXIT
TIMES=()
for platform in "$@"; do
    if [ "$platform" = sdist ]; then
        rm -f "$OUT"/celeriac-*.tar.gz
        timed maturin sdist --out "$OUT"
    else
        read -r target compat < <(rust_target "$platform")
        ensure_rust_target "$target"
        arch=${platform%%-*} tag=${platform#*-}
        rm -f "$OUT"/celeriac-*"$tag"*"$arch".whl
        # --zig: Zig's C compiler and linker, with the glibc 2.17 (or musl) symbols of the
        # platform, for the Rust code and for the C in ring, SQLite, zstd, lzma and bzip2.
        timed maturin build --profile "$PROFILE" --zig --target "$target" \
            --compatibility "$compat" --out "$OUT"
    fi
    TIMES+=("$(printf '%-22s %s' "$platform" "$(cat "$TIMING")")")
done
printf '\nbuild times, profile %s, on %s cores (load average %s):\n' "$PROFILE" "$(nproc)" \
    "$(cut -d' ' -f1-3 /proc/loadavg)"
printf '  %s\n' "${TIMES[@]}"
ls -1 "$OUT"/celeriac-*
