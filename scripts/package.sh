#!/usr/bin/env bash
# Builds the custom handler as a static Linux x86-64 (musl) binary and assembles the deployable
# function app: dist/func-sync/ (what `func start` runs and `func azure functionapp publish`
# deploys) and dist/func-sync.zip (the same, for zip deployment, with the exec bit kept).
#
# Usage: scripts/package.sh [--binary PATH] [--out DIR]
#   --binary PATH  assemble around an already built binary instead of building one
#   --out DIR      where to put func-sync/ and func-sync.zip (default: dist/)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
out="$root/dist"
binary=""
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "usage: $0 [--binary PATH] [--out DIR]" >&2; exit 2 ;;
  esac
done

if [ -z "$binary" ]; then
  # musl links everything in, the C library's resolver included, so the binary runs on any
  # Functions Linux image. A glibc binary linked statically would still load the image's NSS
  # modules to resolve host names, and fail when their glibc differs from the one it was
  # built with; so there is no fallback.
  if ! rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-linux-musl \
    || ! command -v musl-gcc >/dev/null; then
    echo "the musl toolchain is needed: rustup target add x86_64-unknown-linux-musl;" \
      "apt-get install musl-tools" >&2
    exit 1
  fi
  # The bundled SQLite and aws-lc are C, compiled with musl-gcc.
  export CC_x86_64_unknown_linux_musl=musl-gcc
  (cd "$root" && cargo build --release --locked -p handler --target x86_64-unknown-linux-musl)
  binary="${CARGO_TARGET_DIR:-$root/target}/x86_64-unknown-linux-musl/release/handler"
fi

# Absolute, since the zip is made from inside the app folder.
mkdir -p "$out"
out=$(cd "$out" && pwd)
app="$out/func-sync"
zip_file="$out/func-sync.zip"
rm -rf "$app" "$zip_file"
mkdir -p "$app"
cp "$root/host.json" "$app/host.json"
install -m 755 "$binary" "$app/handler"
for definition in "$root"/functions/*/function.json; do
  name=$(basename "$(dirname "$definition")")
  mkdir -p "$app/$name"
  cp "$definition" "$app/$name/function.json"
done

# Info-ZIP on Linux stores each file's Unix mode, so `handler` stays executable when the
# Functions host extracts the package.
(cd "$app" && zip -q -X -r "$zip_file" .)
echo "app folder: $app"
echo "zip:        $zip_file"
