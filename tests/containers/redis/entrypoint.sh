#!/bin/sh
# Runs like the official redis image's entrypoint: `redis-server [options]` (or options alone)
# starts Redis with protected mode off, since the clients are other containers on the
# project's network; anything else is run as given.
set -e
if [ "${1#-}" != "$1" ]; then
    set -- redis-server "$@"
fi
if [ "$1" = "redis-server" ]; then
    shift
    set -- redis-server --protected-mode no "$@"
fi
exec "$@"
