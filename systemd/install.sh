#!/usr/bin/env bash
# Install camtrap-edge as a systemd service on a Jetson (JetPack 6) or any systemd Linux.
#
#   sudo systemd/install.sh            # install, create user and folders, enable (not start)
#   systemd/install.sh --dry-run       # print every step, change nothing
#
# What it does:
#   1. the user `camtrap` (group video, for the GPU) via systemd-sysusers
#   2. /etc/camtrap-edge (config, keys/) and /var/lib/camtrap-edge (ledger, models, engines,
#      records) via systemd-tmpfiles; /etc/camtrap-edge/config.yaml from the example if absent
#   3. a venv in /opt/camtrap-edge/venv WITH system site packages: JetPack ships TensorRT's
#      Python bindings in the system Python only (no wheel on PyPI for Jetson), so the venv
#      must see them; pycuda is built there against /usr/local/cuda
#   4. the unit in /etc/systemd/system, enabled; start it after editing the config
#
# Options:
#   --prefix DIR   install into DIR as if it were / (staging, tests); default /
#   --dry-run      print the commands instead of running them
#   --source SRC   what pip installs: a source folder or a wheel (default: this repository)
#   --no-venv      skip the venv and pip steps
#   --no-pycuda    skip building pycuda (CPU-only hosts, ONNX Runtime backend)
#   --no-enable    do not enable the unit
#   --apt          apt-get install the build prerequisites first (python3-venv, python3-dev, build-essential)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
prefix=/
dry=0
source_spec="$repo"
do_venv=1
do_pycuda=1
do_enable=1
do_apt=0

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) prefix="${2:?--prefix needs a folder}"; shift 2 ;;
    --dry-run) dry=1; shift ;;
    --source) source_spec="${2:?--source needs a folder or wheel}"; shift 2 ;;
    --no-venv) do_venv=0; shift ;;
    --no-pycuda) do_pycuda=0; shift ;;
    --no-enable) do_enable=0; shift ;;
    --apt) do_apt=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

prefix="${prefix%/}"            # "" means the real root
P="$prefix"
root_opt=()
[ -n "$P" ] && root_opt=(--root="$P")
venv="$P/opt/camtrap-edge/venv"

run() {
  echo "+ $*"
  if [ "$dry" -eq 0 ]; then "$@"; fi
}

warn() { echo "install.sh: warning: $*" >&2; }

if [ "$dry" -eq 0 ] && [ "$(id -u)" -ne 0 ]; then
  echo "install.sh: run as root (sudo), or use --dry-run to see the steps" >&2
  exit 1
fi

echo "== camtrap-edge install into ${P:-/}"
if [ -r /etc/nv_tegra_release ]; then
  echo "   Jetson: $(head -n1 /etc/nv_tegra_release)"
fi

if [ "$do_apt" -eq 1 ]; then
  run apt-get update
  run apt-get install -y --no-install-recommends python3-venv python3-dev python3-pip build-essential
fi

echo "== 1. user and folders"
run install -D -m 0644 "$here/camtrap-edge.sysusers.conf" "$P/etc/sysusers.d/camtrap-edge.conf"
run install -D -m 0644 "$here/camtrap-edge.tmpfiles.conf" "$P/etc/tmpfiles.d/camtrap-edge.conf"
run systemd-sysusers "${root_opt[@]}" "$P/etc/sysusers.d/camtrap-edge.conf"
run systemd-tmpfiles "${root_opt[@]}" --create "$P/etc/tmpfiles.d/camtrap-edge.conf"

echo "== 2. config"
if [ -e "$P/etc/camtrap-edge/config.yaml" ]; then
  echo "   keeping existing $P/etc/camtrap-edge/config.yaml"
else
  group=camtrap
  if [ -n "$P" ]; then  # the prefix's own group database, not the host's
    group="$(awk -F: '$1 == "camtrap" { print $3 }' "$P/etc/group" 2>/dev/null || true)"
    group="${group:-camtrap}"
  fi
  run install -m 0640 -o root -g "$group" "$here/config.example.yaml" "$P/etc/camtrap-edge/config.yaml"
fi

echo "== 3. program (venv with system site packages)"
if [ "$do_venv" -eq 1 ]; then
  run python3 -m venv --system-site-packages "$venv"
  run "$venv/bin/pip" install --upgrade pip
  # JetPack 6's TensorRT bindings are built against NumPy 1.x; a NumPy 2 in the venv would
  # shadow the system one and break `import tensorrt`.
  if [ -r /etc/nv_tegra_release ]; then
    run "$venv/bin/pip" install "numpy<2" "${source_spec}[edge]"
  else
    run "$venv/bin/pip" install "${source_spec}[edge]"
  fi
  if [ "$do_pycuda" -eq 1 ]; then
    if [ -x /usr/local/cuda/bin/nvcc ] || [ "$dry" -eq 1 ]; then
      run env CUDA_ROOT=/usr/local/cuda PATH="/usr/local/cuda/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
        "$venv/bin/pip" install pycuda
    else
      warn "no /usr/local/cuda/bin/nvcc: pycuda not built; only the onnxruntime backend will work"
    fi
  fi
  if [ "$dry" -eq 0 ] && ! "$venv/bin/python" -c "import tensorrt" 2>/dev/null; then
    warn "the venv cannot import tensorrt (not a JetPack system?): use engine.backend: onnxruntime"
  fi
else
  echo "   skipped (--no-venv)"
fi

echo "== 4. service"
run install -D -m 0644 "$here/camtrap-edge.service" "$P/etc/systemd/system/camtrap-edge.service"
if [ -z "$P" ]; then
  run systemctl daemon-reload
fi
if [ "$do_enable" -eq 1 ]; then
  run systemctl "${root_opt[@]}" enable camtrap-edge.service
fi

cat <<EOF
== done. Next:
   1. edit ${P}/etc/camtrap-edge/config.yaml (device id, watch folders, MQTT broker)
      and check it:  ${venv#"$P"}/bin/camtrap-edge check-config /etc/camtrap-edge/config.yaml
   2. put the model bundle in /var/lib/camtrap-edge/models/current and the signing public key in
      /etc/camtrap-edge/keys/; trust the GPU path: camtrap-edge selftest --bundle ... --backend tensorrt
   3. watch folders other than /srv/camtrap/incoming: add ReadWritePaths= in
      'systemctl edit camtrap-edge' (see docs/systemd.md)
   4. systemctl start camtrap-edge && journalctl -u camtrap-edge -f
EOF
