#!/usr/bin/env bash
# Citus 13.0.5 for PostgreSQL 15, for make test-citus: built once per machine from the shared source
# (../shared/peers/citus-13.0.5.tar.gz, see its README) into a cache, then installed into Debian's PostgreSQL 15
# from the cache. Needs Debian's postgresql-15 and postgresql-server-dev-15 and Citus's build dependencies
# (.ci/run installs them as root); installing into /usr/lib/postgresql/15 needs root.
# Prints nothing but what it did; exits 3 with the line saying how to get Citus when it cannot.
set -euo pipefail
VERSION=13.0.5
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
SOURCE=${CITUS_SOURCE:-$(cd "$(dirname "$0")/../.." && pwd)/../shared/peers/citus-$VERSION.tar.gz}
CACHE=${RUNBOOK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tenancy-runbook}
HOW="Citus $VERSION: as root, apt-get install postgresql-15 postgresql-server-dev-15 build-essential autoconf flex bison libcurl4-openssl-dev liblz4-dev libzstd-dev libkrb5-dev libssl-dev libselinux1-dev libxslt1-dev libpam0g-dev libreadline-dev, then tests/citus/build.sh (or .ci/run)"

if [ ! -x "$PG_CONFIG" ]; then echo "no PostgreSQL 15 at $PG_CONFIG. $HOW" >&2; exit 3; fi
LIBDIR=$("$PG_CONFIG" --pkglibdir)
SHAREDIR=$("$PG_CONFIG" --sharedir)
installed() { [ -f "$LIBDIR/citus.so" ] && compgen -G "$SHAREDIR/extension/citus--*--13.0-1.sql" >/dev/null \
  && grep -q "^default_version = '13.0-1'" "$SHAREDIR/extension/citus.control"; }
installed && exit 0
mkdir -p "$CACHE"
exec 9>"$CACHE/citus-build.lock"
flock 9  # one build at a time (the suite's workers all ask)
installed && exit 0

PG_VERSION=$("$PG_CONFIG" --version | awk '{print $2}')
ARTIFACT="$CACHE/citus-$VERSION-pg$PG_VERSION-$(uname -m).tar.gz"
if [ ! -f "$ARTIFACT" ]; then
  [ -f "$SOURCE" ] || { echo "no Citus source at $SOURCE. $HOW" >&2; exit 3; }
  [ -f "$("$PG_CONFIG" --pgxs)" ] || { echo "no PGXS (postgresql-server-dev-15). $HOW" >&2; exit 3; }
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  echo "building Citus $VERSION against PostgreSQL $PG_VERSION (about 3 minutes on 2 cores; once per machine)"
  tar -xzf "$SOURCE" -C "$work"
  (cd "$work/citus-$VERSION" && ./configure --quiet PG_CONFIG="$PG_CONFIG" >"$work/configure.log" 2>&1 \
     && make -s -j"$(nproc)" with_llvm=no >"$work/make.log" 2>&1 \
     && make -s install with_llvm=no DESTDIR="$work/stage" >"$work/install.log" 2>&1) || {
    echo "the Citus build failed; the last lines of its logs:" >&2
    tail -n 20 "$work"/*.log >&2; exit 1; }
  tar -czf "$ARTIFACT.tmp" -C "$work/stage" . && mv "$ARTIFACT.tmp" "$ARTIFACT"
  echo "cached $ARTIFACT"
fi
if [ "$(id -u)" != 0 ]; then echo "installing Citus into $LIBDIR needs root: tar -xzf $ARTIFACT -C / (as root). $HOW" >&2; exit 3; fi
tar -xzf "$ARTIFACT" -C /
installed || { echo "Citus installed from $ARTIFACT but not found in $LIBDIR" >&2; exit 1; }
echo "installed Citus $VERSION into $LIBDIR"
