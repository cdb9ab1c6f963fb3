#!/usr/bin/env bash
# Installs the Debian packages lhfs and its tests need, only those missing (quick when all are
# there). Needs root, as the tests themselves do (FUSE mounts, loop devices).
set -euo pipefail
packages=(fuse3 e2fsprogs xfsprogs fio util-linux mount openssl)
missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing system packages: ${missing[*]}"
  if [ "$(id -u)" -ne 0 ]; then
    echo "error: installing packages needs root (run as root, or install: ${missing[*]})" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
