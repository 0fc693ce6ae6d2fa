#!/usr/bin/env bash
# mesh: one idempotent setup for a fresh Debian 12 machine (run as root).
# Installs the eBPF toolchain (Debian's rustc with a prebuilt bpfel `core`, LLVM 22, bpf-linker)
# and every tool the tests and benchmarks use. Safe to run again: it only installs what is missing.
set -euo pipefail

log() { printf '[setup] %s\n' "$*" >&2; }

if [ "$(id -u)" != 0 ]; then
  echo "setup.sh must run as root (it installs Debian packages)" >&2
  exit 1
fi

PKGS=(
  # eBPF toolchain: Debian rustc (ships core for bpfel-unknown-none) + LLVM 22 for bpf-linker
  rustc-web libstd-rust-web-dev-bpf llvm-22-dev libpolly-22-dev libzstd-dev zlib1g-dev
  build-essential pkg-config
  # network plumbing and clients used by tests
  iproute2 iputils-ping curl dnsutils ethtool tcpdump iptables nftables conntrack bpftool procps
  python3 python3-prometheus-client
  # baselines and load generators used by `cargo xtask bench`
  dnsperf iperf3 wrk haproxy dnsmasq-base nginx-light linux-perf
  # sources of managers' state / real Swarm
  etcd-server docker.io busybox-static openssl
)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  log "Debian packages already present"
fi

# Cargo: prefer rustup's cargo for user space when present.
CARGO_BIN="${CARGO:-}"
if [ -z "$CARGO_BIN" ]; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then CARGO_BIN="$HOME/.cargo/bin/cargo"; else CARGO_BIN="$(command -v cargo || true)"; fi
fi
if [ -z "$CARGO_BIN" ]; then
  echo "no cargo found: install rustup (https://rustup.rs) or Debian's cargo" >&2
  exit 1
fi

BPF_LINKER_VERSION=0.13.0
have_linker=""
if command -v bpf-linker >/dev/null 2>&1; then
  v="$(bpf-linker --version 2>/dev/null | awk '{print $2}')" || true
  [ "$v" = "$BPF_LINKER_VERSION" ] && have_linker=1
fi
if [ -z "$have_linker" ]; then
  log "installing bpf-linker $BPF_LINKER_VERSION (LLVM 22)"
  PATH=/usr/lib/llvm-22/bin:$PATH "$CARGO_BIN" install "bpf-linker@$BPF_LINKER_VERSION" --locked \
    --no-default-features --features llvm-22
else
  log "bpf-linker $BPF_LINKER_VERSION already installed"
fi

# bpffs for pinned maps (the agent mounts it too; tests rely on it).
if ! mountpoint -q /sys/fs/bpf; then
  mount -t bpf bpf /sys/fs/bpf || log "warning: could not mount bpffs on /sys/fs/bpf"
fi

log "done"
