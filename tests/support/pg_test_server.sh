#!/usr/bin/env bash
# One PostgreSQL server shared by every test process of a CTest run (the
# `postgres` fixture in tests/CMakeLists.txt): started before the first test
# that needs it, stopped after the last. Each test still takes a database of
# its own (tests/support/pg_server.cc, CUSTODY_TEST_PG_DIR). Without it each
# test process starts a server of its own, which costs about a second.
#   pg_test_server.sh start DIR | stop DIR
set -euo pipefail
cmd=$1 dir=$2
bindir=${CUSTODY_PG_BINDIR:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}
# The tests crash PostgreSQL's processes, never the machine: the WAL a
# commit has written to the kernel (synchronous_commit stays on) survives
# them, so fsync buys the tests nothing and costs each CREATE DATABASE and
# commit a sync of its own. (The benches
# start their server with the defaults: bench/server_support.h.)
no_sync="-c fsync=off -c full_page_writes=off"
as_user() { if [[ $(id -u) == 0 ]]; then setpriv --reuid=65534 --regid=65534 --clear-groups "$@"; else "$@"; fi; }
case $cmd in
  start)
    if [[ -z $bindir || ! -x $bindir/initdb ]]; then
      echo "pg_test_server: no PostgreSQL server under /usr/lib/postgresql (ci/install-deps.sh installs it)" >&2
      exit 1
    fi
    if [[ -d $dir ]]; then "$0" stop "$dir" || true; fi
    rm -rf "$dir" && mkdir -p "$dir" && chmod 0700 "$dir"
    [[ $(id -u) == 0 ]] && chown 65534:65534 "$dir"
    as_user "$bindir/initdb" -D "$dir/data" --no-locale -E UTF8 -U custody --auth=trust --no-sync >"$dir/initdb.log" 2>&1
    as_user "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 30 \
      -o "-k $dir -c listen_addresses= -c port=5432 -c max_connections=300 -c shared_buffers=32MB $no_sync" start >/dev/null
    echo "pg_test_server: started in $dir"
    ;;
  stop)
    # immediate: no shutdown checkpoint, since the folder goes next.
    if [[ -f $dir/data/postmaster.pid ]]; then as_user "$bindir/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null; fi
    rm -rf "$dir"
    echo "pg_test_server: stopped"
    ;;
  *) echo "usage: $0 start|stop DIR" >&2; exit 64 ;;
esac
