#!/bin/sh
# Make sure a Docker daemon answers on this host; idempotent.
#
# 1. If `docker info` already answers, do nothing.
# 2. If dockerd is not installed, install the distribution's docker.io package (needs root/apt).
# 3. Start dockerd in the background (log: $DOCKERD_LOG, default /var/log/fedmount-dockerd.log),
#    falling back to the vfs storage driver when overlay2 cannot work (nested containers),
#    and wait up to 60 s for it to answer.
# Exit status 0 when the daemon answers, 1 otherwise (with one line saying why).
set -u

log=${DOCKERD_LOG:-/var/log/fedmount-dockerd.log}

answers() { docker info >/dev/null 2>&1; }

wait_answer() {
    i=0
    while [ "$i" -lt 600 ]; do
        answers && return 0
        # dockerd died: no point waiting longer
        kill -0 "$1" 2>/dev/null || return 1
        sleep 0.1
        i=$((i + 1))
    done
    return 1
}

answers && exit 0

if ! command -v dockerd >/dev/null 2>&1; then
    if [ "$(id -u)" != 0 ]; then
        echo "ensure_docker: dockerd is not installed; run as root or install docker.io" >&2
        exit 1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q docker.io >/dev/null || {
        echo "ensure_docker: apt-get install docker.io failed; install Docker by hand" >&2
        exit 1
    }
fi
if [ "$(id -u)" != 0 ]; then
    echo "ensure_docker: dockerd is not running and only root can start it; start it (systemctl start docker)" >&2
    exit 1
fi

# A pid file left by a dead daemon stops a new one from starting.
if [ -f /var/run/docker.pid ] && ! kill -0 "$(cat /var/run/docker.pid)" 2>/dev/null; then
    rm -f /var/run/docker.pid
fi

for driver in "" vfs; do
    if [ -n "$driver" ]; then
        nohup dockerd --storage-driver "$driver" >>"$log" 2>&1 &
    else
        nohup dockerd >>"$log" 2>&1 &
    fi
    pid=$!
    if wait_answer "$pid"; then
        exit 0
    fi
    kill "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
done
echo "ensure_docker: dockerd did not start; see $log" >&2
exit 1
