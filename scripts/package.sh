#!/usr/bin/env bash
# Builds the custom handler as a static Linux x86-64 binary and assembles the deployable
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
  # musl gives a fully static binary (the bundled SQLite is compiled with musl-gcc). Without
  # the musl toolchain (rustup target add x86_64-unknown-linux-musl; apt-get install
  # musl-tools), glibc linked statically gives one too.
  if rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-linux-musl \
    && command -v musl-gcc >/dev/null; then
    target=x86_64-unknown-linux-musl
    flags=""
    export CC_x86_64_unknown_linux_musl=musl-gcc
  else
    echo "musl toolchain not found: linking glibc statically" >&2
    target=x86_64-unknown-linux-gnu
    flags="-C target-feature=+crt-static"
  fi
  (cd "$root" && RUSTFLAGS="$flags ${RUSTFLAGS:-}" cargo build --release --locked -p handler --target "$target")
  binary="$root/target/$target/release/handler"
fi

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
