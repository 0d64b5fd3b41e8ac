#!/bin/sh
# The image's entrypoint: `sms-receiver ARGS`, except that `run` refuses to start without a
# config file. The image ships none, so that it pages nobody until the operator says whom.
set -eu
if [ "${1:-}" = run ]; then
  config=/etc/sms-receiver/config.yaml   # the CMD's; --config FILE or --config=FILE overrides
  prev=
  for arg in "$@"; do
    [ "$prev" = --config ] && config=$arg
    case $arg in --config=*) config=${arg#--config=} ;; esac
    prev=$arg
  done
  if [ ! -f "$config" ]; then
    cat >&2 <<MSG
sms-receiver: no config file at $config: this image ships none, so that it pages nobody
until you say whom. Mount yours (with its secrets in the environment or in mounted files):
  docker run -v "\$PWD/config.yaml:$config:ro" -e CLICKATELL_API_KEY=... sms-receiver
  compose: volumes: ["./config.yaml:$config:ro"] (deploy/compose/docker-compose.yml)
  Kubernetes: a ConfigMap mounted at $(dirname "$config") (deploy/kubernetes/)
Check it first with: sms-receiver check-config config.yaml
MSG
    exit 78  # EX_CONFIG
  fi
fi
exec sms-receiver "$@"
