#!/bin/sh
# As the official image's entrypoint: a redis-server started without a config file gets
# --protected-mode no (the container's network is the boundary).
if [ "${1:-}" = "redis-server" ]; then
  shift
  exec redis-server --protected-mode no --bind 0.0.0.0 "$@"
fi
exec "$@"
