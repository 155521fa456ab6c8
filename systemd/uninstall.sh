#!/usr/bin/env bash
# Remove the camtrap-edge service and program; keep the data unless --purge.
#
#   sudo systemd/uninstall.sh            # stop, disable, remove unit, snippets and venv
#   sudo systemd/uninstall.sh --purge    # also the ledger, models, records, config and user
#   systemd/uninstall.sh --dry-run       # print every step, change nothing
#
# Kept without --purge: /var/lib/camtrap-edge (ledger, records, models), /etc/camtrap-edge
# (config, keys) and the user camtrap. Never removed: the watch folders (the camera's images).
#
# Options:
#   --prefix DIR   operate on DIR as if it were / (staging, tests); default /
#   --dry-run      print the commands instead of running them
#   --purge        also delete state, config and the user
set -euo pipefail

prefix=/
dry=0
purge=0

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) prefix="${2:?--prefix needs a folder}"; shift 2 ;;
    --dry-run) dry=1; shift ;;
    --purge) purge=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "uninstall.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

prefix="${prefix%/}"
P="$prefix"
root_opt=()
[ -n "$P" ] && root_opt=(--root="$P")

run() {
  echo "+ $*"
  if [ "$dry" -eq 0 ]; then "$@"; fi
}

if [ "$dry" -eq 0 ] && [ "$(id -u)" -ne 0 ]; then
  echo "uninstall.sh: run as root (sudo), or use --dry-run to see the steps" >&2
  exit 1
fi

echo "== camtrap-edge uninstall from ${P:-/}"
if [ -z "$P" ]; then
  run systemctl disable --now camtrap-edge.service || true
elif [ -e "$P/etc/systemd/system/camtrap-edge.service" ]; then
  run systemctl "${root_opt[@]}" disable camtrap-edge.service
fi
run rm -f "$P/etc/systemd/system/camtrap-edge.service"
run rm -rf "$P/etc/systemd/system/camtrap-edge.service.d"
run rm -f "$P/etc/tmpfiles.d/camtrap-edge.conf" "$P/etc/sysusers.d/camtrap-edge.conf"
run rm -rf "$P/opt/camtrap-edge"
if [ -z "$P" ]; then
  run systemctl daemon-reload
  run systemctl reset-failed camtrap-edge.service || true
fi

if [ "$purge" -eq 1 ]; then
  echo "== purge: state, config, user"
  run rm -rf "$P/var/lib/camtrap-edge" "$P/etc/camtrap-edge"
  if [ "$dry" -eq 1 ] || grep -q '^camtrap:' "$P/etc/passwd" 2>/dev/null; then
    if [ -z "$P" ]; then
      run userdel camtrap
    else
      run userdel --prefix "$P" camtrap
    fi
  fi
  if [ "$dry" -eq 0 ] && grep -q '^camtrap:' "$P/etc/group" 2>/dev/null; then
    if [ -z "$P" ]; then run groupdel camtrap; else run groupdel --prefix "$P" camtrap; fi
  fi
else
  echo "== kept: $P/var/lib/camtrap-edge, $P/etc/camtrap-edge and user camtrap (use --purge to remove)"
fi
echo "== never removed: the watch folders (e.g. $P/srv/camtrap/incoming) and the images in them"
