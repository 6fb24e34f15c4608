#!/bin/sh
# The `chaos` profile: every CHAOS_INTERVAL seconds (default 180), SIGKILL the daemon of one random
# block-stage or spare container of this compose project (label swarm-node.chaos=victim; the spare may be
# serving a stage by now), as if its spot VM had been preempted. The container exits with 137 and its
# `restart: on-failure` policy brings it back as a replacement node; meanwhile a waiting node takes over the
# stage. (`docker kill` would count as a manual stop, and Docker does not restart manually stopped
# containers; killing the process inside does not.)
set -eu
interval="${CHAOS_INTERVAL:-180}"
# only this project's containers: another swarm-node project on the same Docker host is not ours to kill
project=$(docker inspect --format '{{ index .Config.Labels "com.docker.compose.project" }}' "$(hostname)")
if [ -z "${project}" ]; then
  echo "chaos: cannot read this container's com.docker.compose.project label; refusing to run" >&2
  exit 1
fi
echo "chaos: SIGKILL one block-stage or spare daemon of project ${project} every ${interval}s"
while true; do
  sleep "${interval}"
  victims=$(docker ps -q --filter "label=swarm-node.chaos=victim" \
    --filter "label=com.docker.compose.project=${project}")
  count=$(echo "${victims}" | wc -w)
  [ "${count}" -gt 0 ] || continue
  pick=$(( $(od -An -N2 -tu2 /dev/urandom) % count + 1 ))
  container=$(echo "${victims}" | tr ' ' '\n' | sed -n "${pick}p")
  name=$(docker inspect --format '{{.Name}}' "${container}")
  echo "chaos: $(date -u +%FT%TZ) SIGKILL the daemon of ${name}"
  # PID 1 is tini (compose `init: true`); `kill -1` signals every other process of the container's user
  # (the daemon, its DHT process and p2pd), and tini then exits with the daemon's status, 137
  docker exec "${container}" sh -c 'kill -KILL -1' || true
done
