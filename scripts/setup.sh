#!/usr/bin/env bash
# Installs the Debian packages am2z-lua needs (only the missing ones; nothing
# when all are there) and builds the project into build/.
#   bash scripts/setup.sh            # release-ish build (RelWithDebInfo)
#   AM2Z_BUILD_DIR=build-asan AM2Z_CMAKE_ARGS=-DAM2Z_SANITIZE=ON bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

# luarocks: the install spec builds the rockspec with it.
PACKAGES=(build-essential cmake pkg-config libluajit2-5.1-dev luajit2 libuv1-dev
          libhiredis-dev lua-cjson libssl-dev lua-busted redis-server luarocks)

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

BUILD_DIR="${AM2Z_BUILD_DIR:-build}"
cmake -S . -B "$BUILD_DIR" ${AM2Z_CMAKE_ARGS:-} >/dev/null
cmake --build "$BUILD_DIR" -j"$(nproc)" >/dev/null
echo "setup: built $BUILD_DIR/bin/am2z-lua and $BUILD_DIR/lib/am2z/core.so"
