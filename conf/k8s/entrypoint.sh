#!/bin/sh
# Container entry point for forkserver (Docker, Kubernetes). docs/deploy.md shows
# the Dockerfile that installs it as /usr/local/bin/forkserver-entrypoint.
#
# `exec` makes the forkserver master the container's main process (PID 1), with
# no shell in between: the SIGTERM that Kubernetes (or `docker stop`) sends on
# termination reaches the master itself and starts its graceful stop, and the
# master reaps its workers. Settings come from the TOML file (conf/k8s/forkserver.toml,
# baked into the image at /etc/forkserver/forkserver.toml), overridden by
# FORKSERVER_* environment variables from the pod spec, then by the container's
# arguments, e.g. `args: ["--log-level", "debug"]`.
set -eu
FORKSERVER_CONFIG="${FORKSERVER_CONFIG:-/etc/forkserver/forkserver.toml}"
export FORKSERVER_CONFIG
exec forkserver "$@"
