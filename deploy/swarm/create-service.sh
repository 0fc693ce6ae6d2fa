#!/usr/bin/env bash
# The `docker service create` equivalent of mesh-stack.yml (same defaults and overrides).
set -euo pipefail
: "${MESH_IMAGE:=mesh-agent:0.1.0}"
: "${DOCKER_SOCK:=/var/run/docker.sock}"
: "${DOCKER_NETNS_DIR:=/var/run/docker/netns}"
: "${CGROUP2:=/sys/fs/cgroup/unified}"
exec docker service create --name mesh --mode global \
  --network host \
  --cap-add NET_ADMIN --cap-add SYS_ADMIN \
  --env MESH_RUNTIME=docker \
  --env "MESH_DOCKER_HOST=$DOCKER_SOCK" \
  --env 'MESH_SWARM_SERVICE={{.Service.Name}}' \
  --env MESH_CGROUP=/host/cgroup2 \
  --env MESH_NO_DNS=true \
  --env MESH_METRICS_ADDR=127.0.0.1:9464 \
  --env MESH_LOG_FORMAT=json \
  --mount type=bind,source=/sys/fs/bpf,target=/sys/fs/bpf \
  --mount "type=bind,source=$DOCKER_SOCK,target=$DOCKER_SOCK" \
  --mount "type=bind,source=$DOCKER_NETNS_DIR,target=$DOCKER_NETNS_DIR,bind-propagation=rslave" \
  --mount "type=bind,source=$CGROUP2,target=/host/cgroup2,readonly" \
  --stop-grace-period 30s \
  --restart-condition on-failure --restart-delay 2s \
  --update-parallelism 1 --update-order stop-first \
  "$MESH_IMAGE" run
