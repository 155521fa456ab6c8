#!/usr/bin/env bash
# Install camtrap-edge as a systemd service on a Jetson (JetPack 6) or any systemd Linux.
#
#   sudo systemd/install.sh            # install, create user and folders; enable once the config passes
#   systemd/install.sh --dry-run       # print every step, change nothing
#
# What it does:
#   1. the user `camtrap` (group video, for the GPU) via systemd-sysusers
#   2. /etc/camtrap-edge (config, keys/) and /var/lib/camtrap-edge (ledger, models, engines,
#      records) via systemd-tmpfiles; /etc/camtrap-edge/config.yaml from the example if absent
#   3. a venv in /opt/camtrap-edge/venv WITH system site packages. On a Jetson (detected from
#      /etc/nv_tegra_release, the L4T release) it uses what JetPack ships in the system Python:
#      TensorRT's bindings (no wheel on PyPI for Jetson), and onnxruntime-gpu if installed there
#      (or --ort-wheel); it never pip-installs the CPU onnxruntime over a GPU one, pins
#      numpy<2 (JetPack's TensorRT bindings are built against NumPy 1.x) and builds pycuda
#      against JetPack's CUDA (--cuda, default /usr/local/cuda)
#   4. the unit in /etc/systemd/system; it is enabled only when
#      `camtrap-edge check-config --strict` passes (config, watch folder, bundle, keys, engine
#      runtime); otherwise the reasons are printed and the unit is left disabled
#
# Options:
#   --prefix DIR          install into DIR as if it were / (staging, tests); default /
#   --dry-run             print the commands instead of running them
#   --source SRC          what pip installs: a source folder or a wheel (default: this repository)
#   --python PY           the system Python the venv is made from (default python3)
#   --tegra-release FILE  the L4T release file (default /etc/nv_tegra_release)
#   --cuda DIR            the CUDA toolkit pycuda is built against (default /usr/local/cuda)
#   --ort-wheel WHEEL     Jetson: an onnxruntime-gpu wheel (file or URL) when the system Python has none
#   --no-venv             skip the venv and pip steps
#   --no-pycuda           skip building pycuda (CPU-only hosts, ONNX Runtime backend)
#   --no-enable           do not enable the unit
#   --apt                 apt-get install the build prerequisites first (python3-venv, python3-dev, build-essential)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
prefix=/
dry=0
source_spec="$repo"
py=python3
tegra_release=/etc/nv_tegra_release
cuda=/usr/local/cuda
ort_wheel=""
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
    --python) py="${2:?--python needs an interpreter}"; shift 2 ;;
    --tegra-release) tegra_release="${2:?--tegra-release needs a file}"; shift 2 ;;
    --cuda) cuda="${2:?--cuda needs a folder}"; shift 2 ;;
    --ort-wheel) ort_wheel="${2:?--ort-wheel needs a wheel file or URL}"; shift 2 ;;
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
config="$P/etc/camtrap-edge/config.yaml"

run() {
  echo "+ $*"
  if [ "$dry" -eq 0 ]; then "$@"; fi
}

warn() { echo "install.sh: warning: $*" >&2; }

# What the system Python already has (read-only probes, also run by --dry-run).
probe() { "$py" -c "$1" 2>/dev/null || true; }

if [ "$dry" -eq 0 ] && [ "$(id -u)" -ne 0 ]; then
  echo "install.sh: run as root (sudo), or use --dry-run to see the steps" >&2
  exit 1
fi

echo "== camtrap-edge install into ${P:-/}"
jetson=0
ort_info=""
if [ -r "$tegra_release" ]; then
  jetson=1
  # first line, e.g. "# R36 (release), REVISION: 4.3, GCID: ..., BOARD: generic, EABI: aarch64, ..."
  l4t="$(head -n1 "$tegra_release" | sed -n 's/^# R\([0-9][0-9]*\) (release), REVISION: \([0-9.]*[0-9]\).*/R\1.\2/p')"
  case "$l4t" in
    R36.*) jetpack=6 ;;
    R35.*) jetpack=5 ;;
    "") jetpack="?"; warn "cannot read the L4T release from $tegra_release: $(head -n1 "$tegra_release")" ;;
    *) jetpack="?" ;;
  esac
  echo "   Jetson: L4T ${l4t:-unknown} (JetPack $jetpack)"
  [ "$jetpack" = 6 ] || warn "the tested route is JetPack 6 (L4T R36); see docs/jetson.md"
  trt_version="$(probe 'import tensorrt; print(tensorrt.__version__)')"
  ort_info="$(probe 'import onnxruntime as o; print(o.__version__, *o.get_available_providers())')"
  if [ -n "$trt_version" ]; then
    echo "   system TensorRT $trt_version (the venv sees JetPack's bindings)"
  else
    warn "$py cannot import tensorrt: install JetPack's python3-libnvinfer (apt-get install nvidia-jetpack)"
  fi
  if [[ " $ort_info " == *" CUDAExecutionProvider "* ]]; then
    echo "   system onnxruntime-gpu ${ort_info%% *} (${ort_info#* })"
  fi
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
  run "$py" -m venv --system-site-packages "$venv"
  run "$venv/bin/pip" install --upgrade pip
  if [ "$jetson" -eq 1 ]; then
    # edge-core: the edge extra without the PyPI onnxruntime, a CPU build that would shadow
    # JetPack's onnxruntime-gpu. numpy<2: JetPack 6's TensorRT bindings are built against NumPy 1.x.
    ort=()
    if [[ " $ort_info " == *" CUDAExecutionProvider "* ]]; then
      :  # the system onnxruntime-gpu, seen through the system site packages
    elif [ -n "$ort_wheel" ]; then
      ort=("$ort_wheel")
    else
      warn "no onnxruntime-gpu in $py and no --ort-wheel: installing the CPU onnxruntime (the tensorrt" \
        "backend is the GPU path; for onnxruntime on the GPU see docs/jetson.md)"
      ort=("onnxruntime>=1.16")
    fi
    run "$venv/bin/pip" install "numpy<2" "${source_spec}[edge-core]" "${ort[@]}"
  else
    run "$venv/bin/pip" install "${source_spec}[edge]"
  fi
  if [ "$do_pycuda" -eq 1 ]; then
    if [ -x "$cuda/bin/nvcc" ]; then
      # against JetPack's CUDA: headers and libraries of $cuda, its nvcc first on the PATH
      pins=()
      [ "$jetson" -eq 1 ] && pins=("numpy<2")
      run env CUDA_ROOT="$cuda" CPATH="$cuda/include" LIBRARY_PATH="$cuda/lib64" \
        PATH="$cuda/bin:/usr/sbin:/usr/bin:/sbin:/bin" "$venv/bin/pip" install "${pins[@]}" pycuda
    else
      warn "no $cuda/bin/nvcc: pycuda not built; only the onnxruntime backend will work" \
        "(JetPack: apt-get install nvidia-jetpack, or --cuda DIR)"
    fi
  fi
  if [ "$dry" -eq 0 ] && ! "$venv/bin/python" -c "import tensorrt, pycuda.driver" 2>/dev/null; then
    warn "the venv cannot import tensorrt and pycuda: use engine: {type: onnxruntime}"
  fi
else
  echo "   skipped (--no-venv)"
fi

echo "== 4. service"
run install -D -m 0644 "$here/camtrap-edge.service" "$P/etc/systemd/system/camtrap-edge.service"
if [ -z "$P" ]; then
  run systemctl daemon-reload
fi
enabled=0
if [ "$do_enable" -eq 1 ]; then
  # Enable only a unit that can start: the same check as its ExecStartPre.
  if [ -x "$venv/bin/camtrap-edge" ] || [ "$do_venv" -eq 1 ]; then
    check=("$venv/bin/camtrap-edge" check-config --strict "$config")
  else
    check=("$py" -m edge.cli check-config --strict "$config")
  fi
  if [ "$dry" -eq 1 ]; then
    echo "+ ${check[*]}"
    echo "+ systemctl ${root_opt[*]} enable camtrap-edge.service   # only if that check passes"
  elif "${check[@]}"; then
    run systemctl "${root_opt[@]}" enable camtrap-edge.service
    enabled=1
  else
    echo "install.sh: camtrap-edge.service installed but NOT enabled: $config fails the check above" >&2
  fi
fi

cat <<EOF
== done ($(if [ "$dry" -eq 1 ]; then echo "dry run"; elif [ "$enabled" -eq 1 ]; then echo "unit enabled"; else echo "unit NOT enabled"; fi)). Next:
   1. edit ${config} (device id, watch folders, MQTT broker) and check it:
      ${venv#"$P"}/bin/camtrap-edge check-config --strict /etc/camtrap-edge/config.yaml
   2. put the model bundle in /var/lib/camtrap-edge/models/current and the signing public key in
      /etc/camtrap-edge/keys/; trust the GPU path: camtrap-edge selftest --bundle ... --backend tensorrt
   3. watch folders other than /srv/camtrap/incoming: add ReadWritePaths= in
      'systemctl edit camtrap-edge' (see docs/systemd.md)
   4. systemctl enable --now camtrap-edge && journalctl -u camtrap-edge -f
EOF
