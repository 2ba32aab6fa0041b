#!/usr/bin/env bash
# Builds the four man pages from one source each, at build time:
#   custody(1)         help2man on `custody --help`, with every subcommand's
#                      own --help below it (the CLI's definitions: they
#                      cannot drift) and custody.1.include for the prose;
#   custodyd(8)        help2man on `custodyd --help` and custodyd.8.include;
#   custody.toml(5)    scdoc from custody.toml.5.scd;
#   custody-policy(5)  scdoc from custody-policy.5.scd.
# Usage: gen-man.sh CUSTODY CUSTODYD OUTDIR SOURCEDIR
set -euo pipefail
custody=$1 custodyd=$2 out=$3 src=$4
mkdir -p "$out"
include=$(mktemp)
trap 'rm -f "$include"' EXIT

# The binaries are run only to print their help: under the sanitizer build
# a leak check at each exit would cost more than the rest of this script.
export ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=0"

# Each subcommand's help, depth first, as roff that shows it verbatim. One
# `custody WORDS... --help` per command: its output is printed and also
# gives the subcommands to walk into.
walk() {
  local help sub
  # (The x keeps the help's trailing blank lines, which $(...) would drop.)
  help=$("$custody" "$@" --help && echo x) || return
  help=${help%x}
  if (($# > 0)); then
    printf '.SS "custody %s"\n.nf\n' "$*"
    sed -e 's/\\/\\e/g' -e "s/^\\./\\\\\\&./" -e "s/^'/\\\\\\&'/" <<< "${help%$'\n'}"
    printf '.fi\n'
  fi
  for sub in $(awk '/^Subcommands:/ { on = 1; next } on && /^  [a-z]/ { print $1 } on && /^$/ { on = 0 }' <<< "$help"); do
    walk "$@" "$sub"
  done
}
{
  echo "[COMMANDS]"
  walk
  cat "$src/dist/man/custody.1.include"
} > "$include"
help2man --no-info --section 1 --name "hardware-backed key custody for projects and environments" \
  --include "$include" --output "$out/custody.1" "$custody"
help2man --no-info --section 8 --name "the custody key server" \
  --include "$src/dist/man/custodyd.8.include" --output "$out/custodyd.8" "$custodyd"
scdoc < "$src/dist/man/custody.toml.5.scd" > "$out/custody.toml.5"
scdoc < "$src/dist/man/custody-policy.5.scd" > "$out/custody-policy.5"
