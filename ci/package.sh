#!/usr/bin/env bash
# The package, as a server admin would meet it: build the .deb, install it
# with dpkg -i, use what got installed (the commands, the man pages, the
# custody user and folders, custodyd on a fresh SoftHSM2 token through
# `custody sandbox`), then purge it and check that the state it used and
# /var/lib/custody are still there.
#
# CI packages the `dev` build its tests use (sanitizer binaries: Depends then
# names libasan and libubsan too); a release package is
#   cmake --preset release && cmake --build --preset release --target package
set -euo pipefail
cd "$(dirname "$0")/.."
preset="${CUSTODY_PACKAGE_PRESET:-dev}"

bash ci/install-deps.sh
cmake --preset "$preset" >/dev/null
cmake --build --preset "$preset" --target package
deb=$(ls -t "build/$preset"/custody_*.deb | head -n 1)
echo "package: $deb"
dpkg-deb --field "$deb" Package Version Depends Recommends
dpkg-deb --contents "$deb" | awk '{print $6}' | sed 's|^\./|/|' | grep -vE '/$' | sort

# A stale install from an earlier run must not hide a missing file.
dpkg --purge custody >/dev/null 2>&1 || true
dpkg -i "$deb"

# What was installed, where Debian expects it.
test -x /usr/bin/custody
test -x /usr/sbin/custodyd
test -x /usr/libexec/custody/custody-full
test -f /usr/lib/systemd/system/custodyd.service
test -f /usr/lib/sysusers.d/custody.conf
test -f /usr/lib/tmpfiles.d/custody.conf
test -f /usr/share/bash-completion/completions/custody
test -f /usr/share/doc/custody/custody.toml.example
test -f /usr/share/doc/custody/examples/policy.toml
/usr/bin/custody --version
/usr/sbin/custodyd --version
for page in custody custodyd custody.toml custody-policy; do man -w "$page"; done
# postinst: the custody user and its folders (nothing started).
id custody
stat -c '%n %U:%G %a' /etc/custody /var/lib/custody
if systemctl is-active --quiet custodyd 2>/dev/null; then
  echo "package: custodyd was started by the package; it must not be" >&2
  exit 1
fi

# The installed tools on a fresh token: custody sandbox finds the installed
# custodyd (/usr/sbin) from the installed custody-full (/usr/libexec).
work=$(mktemp -d)
trap 'custody_stop=1; /usr/bin/custody sandbox "$work/sandbox" --stop >/dev/null 2>&1 || true' EXIT
env -u CUSTODY_CONFIG -u CUSTODY_ADDR /usr/bin/custody sandbox "$work/sandbox" --project pkgcheck --serve > "$work/env"
(
  . "$work/env"
  printf 'installed-%s' "$(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \n')" |
    /usr/bin/custody secret put pkgcheck/test/key
  value=$(/usr/bin/custody secret get pkgcheck/test/key)
  [[ $value == installed-* ]] || { echo "package: the installed custody read back another value" >&2; exit 1; }
  [[ $(readlink "/proc/$CUSTODY_SANDBOX_PID/exe") == /usr/sbin/custodyd ]] ||
    { echo "package: the sandbox did not run the installed custodyd" >&2; exit 1; }
  /usr/bin/custody sandbox "$work/sandbox" --stop
  unset CUSTODY_ADDR
  /usr/bin/custody audit verify
)

# Removal keeps every store, audit log and token.
dpkg --purge custody
test ! -e /usr/bin/custody
test -f "$work/sandbox/state/custody.db"
test -d /var/lib/custody
echo "package: installed, used and purged; $work/sandbox and /var/lib/custody are kept"
