#!/usr/bin/env bash
# Installs every Debian 12 package custody needs to build, run and test.
# Idempotent: packages already present are skipped, and apt is only asked
# when something is missing, so a second run costs a dpkg query.
set -euo pipefail

packages=(
  # build
  build-essential cmake ninja-build pkg-config
  # crypto and tokens
  libssl-dev openssl softhsm2 libp11-kit-dev p11-kit libp11-dev opensc util-linux
  # the TPM 2.0 backend (tpm2-tss ESAPI), and swtpm + tpm2-tools for its tests
  libtss2-dev swtpm swtpm-tools tpm2-tools
  # storage, logging, formats, CLI
  libsqlite3-dev sqlite3 libspdlog-dev libfmt-dev nlohmann-json3-dev rapidjson-dev libcli11-dev libtomlplusplus-dev
  # the PostgreSQL store: libpq, and a PostgreSQL 15 server that the tests
  # start themselves (initdb + postgres in a temporary folder; the package's
  # own cluster is not used)
  libpq-dev postgresql postgresql-contrib
  # the server: Boost.Beast/Asio (headers), systemd notify; curl for the API examples
  libboost-dev libsystemd-dev curl
  # systemd-analyze, for the test that verifies dist/custodyd.service
  # (systemd_unit_verifies); in a container this only adds the binaries,
  # nothing is started
  systemd
  # packaging (dist/): man pages from --help (help2man) and from prose
  # (scdoc), the .deb's computed Depends (dpkg-shlibdeps, in dpkg-dev), and
  # man-db for the install check's `man -w`
  help2man scdoc dpkg-dev man-db
  # tests and benchmarks; python3-hvac is the real Vault client the
  # Vault-compatible API is tested with (tests/server/vault_hvac_client.py)
  googletest libgtest-dev libgmock-dev libbenchmark-dev python3 python3-hvac
  # fuzzing (ci/fuzz.sh): clang, its libFuzzer and sanitizer runtimes (only
  # recommended by clang, so named here), llvm-symbolizer for readable stacks
  clang libclang-rt-14-dev llvm
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$p")
  fi
done

if ((${#missing[@]} == 0)); then
  echo "install-deps: all ${#packages[@]} packages present"
  exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
  SUDO=sudo
else
  SUDO=
fi
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "install-deps: done"
