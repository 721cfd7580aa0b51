#!/bin/sh
# Makes the certificates of the three-region example with `geokv cert`: the
# cluster CA, one node certificate per node for the host name its peers and
# clients dial (add `--host` for every other name or IP address they use),
# and the `root` user's client certificate. Run it where the CA key is to be
# kept (not on a node), then give each node `ca.crt` and its own
# `node.<region>.<node>.crt` and `.key` only (docs/deploy.md).
#
#   GEOKV=/usr/local/bin/geokv sh make-certs.sh ./certs
set -eu

geokv=${GEOKV:-geokv}
dir=${1:-./certs}

"$geokv" cert create-ca --cluster geokv-example --certs-dir "$dir" </dev/null
while read -r region node host; do
    "$geokv" cert create-node --region "$region" --node-id "$node" --host "$host" --certs-dir "$dir" </dev/null
done <<NODES
us-east-1 n1 geokv-use1.example.internal
eu-west-1 n1 geokv-euw1.example.internal
ap-southeast-1 n1 geokv-apse1.example.internal
NODES
"$geokv" cert create-client --user root --certs-dir "$dir" </dev/null
"$geokv" cert list --certs-dir "$dir" </dev/null
