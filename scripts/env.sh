# Sourced by the scripts in this folder: one target directory outside the
# clone, shared by runs, tests and CI, so RocksDB (~15 min cold) builds once.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/geokv-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
GEOKV_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export GEOKV_ROOT
GEOKV_BIN="$CARGO_TARGET_DIR/debug/geokv"
export GEOKV_BIN
