#!/usr/bin/env bash
# Bring up what the container tests need, idempotently: a docker engine on this machine and the local
# base image the x86-cpu validation image is built on (no registry images can be pulled here, so it is
# made with debootstrap from the Debian mirror and imported).
#
#   .ci/docker_up.sh            # then: export EDGELLM_DOCKER_BASE=edgellm-base:bookworm
#
# Environment: EDGELLM_DOCKER_BASE (image name, default edgellm-base:bookworm), DEBIAN_MIRROR
# (default: debootstrap's own default mirror), DOCKERD_LOG (default /var/log/edgellm-dockerd.log).
# Each step is skipped when its result is already there; prints one timing line per step done.
set -euo pipefail

BASE_IMAGE=${EDGELLM_DOCKER_BASE:-edgellm-base:bookworm}
MIRROR=${DEBIAN_MIRROR:-}  # empty: debootstrap picks its default mirror
SUITE=bookworm
LOG=${DOCKERD_LOG:-/var/log/edgellm-dockerd.log}
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

say() { echo "[docker_up] $*" >&2; }
now() { date +%s.%N; }
took() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# 1. packages: the engine (docker.io pulls containerd and runc) and debootstrap
need=()
command -v dockerd >/dev/null 2>&1 || need+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
if [ ${#need[@]} -gt 0 ]; then
    t=$(now)
    say "installing ${need[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    say "apt-get install: $(took "$t") s"
fi

# 2. the daemon: start it unless one already answers
daemon_up() { docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }
start_dockerd() {  # args: extra dockerd flags; returns 0 once the daemon answers (within 45 s)
    # setsid + nohup: the daemon outlives this script and the shell that ran it
    $SUDO setsid nohup dockerd "$@" >>"$LOG" 2>&1 </dev/null &
    dockerd_pid=$!
    for _ in $(seq 1 90); do
        daemon_up && return 0
        kill -0 "$dockerd_pid" 2>/dev/null || return 1
        sleep 0.5
    done
    return 1
}
if ! daemon_up; then
    t=$(now)
    say "starting dockerd (log: $LOG)"
    if ! start_dockerd; then
        # Kernels or sandboxes without iptables/NAT: every build and run here uses the host network anyway.
        say "dockerd did not come up; retrying without iptables and the default bridge"
        kill "$dockerd_pid" 2>/dev/null || true
        sleep 1
        if ! start_dockerd --iptables=false --bridge=none; then
            say "dockerd did not come up; last lines of $LOG:"
            tail -n 30 "$LOG" >&2 || true
            exit 1
        fi
    fi
    say "dockerd up: $(took "$t") s"
fi

# 3. the base image
if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    t=$(now)
    root=$(mktemp -d /tmp/edgellm-debootstrap.XXXXXX)
    trap '$SUDO rm -rf "$root"' EXIT
    say "debootstrap $SUITE into $root"
    # shellcheck disable=SC2086  # $MIRROR: no argument at all when unset
    $SUDO debootstrap --variant=minbase "$SUITE" "$root" $MIRROR >"$root.log" 2>&1 || {
        tail -n 30 "$root.log" >&2
        exit 1
    }
    # Clean apt lists and caches: the image is a base, its users run apt-get update themselves.
    $SUDO rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    $SUDO tar -C "$root" -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["/bin/bash"]' \
        --message "debootstrap --variant=minbase $SUITE ${MIRROR:-(default mirror)}" - "$BASE_IMAGE" >/dev/null
    rm -f "$root.log"
    say "base image $BASE_IMAGE made: $(took "$t") s"
fi
say "ready: docker $(docker version --format '{{.Server.Version}}'), base image $BASE_IMAGE"
