#!/usr/bin/env bash
# A short libFuzzer campaign for every fuzz target, under AddressSanitizer +
# UndefinedBehaviorSanitizer (the `fuzz` preset, clang). The targets are not
# listed here: CMake writes build/fuzz/fuzz/fuzz_targets.tsv with every *_fuzz
# executable of fuzz/CMakeLists.txt and its -max_len, so a new target runs as
# soon as it is defined there.
#
# Each campaign starts from a copy of the committed seeds in
# fuzz/corpus/<name without _fuzz>/ (the repository is never written to),
# and any crash, leak, timeout, out-of-memory or sanitizer report fails the
# script, printing the target, the tail of its log and the reproducer.
#
#   ci/fuzz.sh                      every target
#   ci/fuzz.sh names_fuzz ...       only these
#   FUZZ_SECONDS=30                 per target (default 30)
#   FUZZ_JOBS=2                     campaigns at a time (default 2, one per core)
#   FUZZ_MAX_LEN=N                  -max_len for every target (default: the target's, else 4096)
#   FUZZ_MAX_LEN_<target>=N         -max_len for one target
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
started=$EPOCHREALTIME

FUZZ_SECONDS=${FUZZ_SECONDS:-30}
# http_fuzz allocates through libcrypto (no frame pointers): with the slow
# unwinder its leak reports reach the frames fuzz/lsan.supp names.
FUZZ_ASAN_OPTIONS_http_fuzz=${FUZZ_ASAN_OPTIONS_http_fuzz:-fast_unwind_on_malloc=0}
FUZZ_JOBS=${FUZZ_JOBS:-2}
build="$root/build/fuzz"
list="$build/fuzz/fuzz_targets.tsv"
# Findings are copied here, out of the temporary folder, to be replayed.
findings="$build/findings"

# Whole seconds since $1, an earlier $EPOCHREALTIME.
elapsed() {
  local now=${EPOCHREALTIME/[.,]/} then=${1/[.,]/}
  echo $(((now - then + 500000) / 1000000))
}

bash ci/install-deps.sh
# http_fuzz's set-up runs a custody-full: the dev build's when it is there
# (CI builds it before this step), instead of compiling the CLI again.
setup_bin=""
[[ -x $root/build/dev/tools/custody-full ]] && setup_bin="$root/build/dev/tools/custody-full"
nice -n 5 cmake --preset fuzz -DCUSTODY_FUZZ_SETUP_BIN="$setup_bin" >/dev/null
nice -n 5 cmake --build --preset fuzz --target fuzz_all
build_seconds=$(elapsed "$started")

names=() bins=() lens=()
while IFS=$'\t' read -r name bin max_len; do
  [[ -n $name ]] || continue
  if (($# > 0)) && [[ " $* " != *" $name "* ]]; then continue; fi
  if [[ ! -x $bin ]]; then
    echo "fuzz: $name: $bin was not built" >&2
    exit 1
  fi
  names+=("$name") bins+=("$bin") lens+=("$max_len")
done <"$list"
if ((${#names[@]} == 0)); then
  echo "fuzz: no fuzz targets to run (list: $list${*:+, asked for: $*})" >&2
  exit 1
fi
if (($# > 0)) && ((${#names[@]} != $#)); then
  echo "fuzz: some of '$*' are not fuzz targets; the targets are: $(cut -f1 "$list" | tr '\n' ' ')" >&2
  exit 1
fi

# The work folder goes on a tmpfs when there is one with room: config_fuzz
# runs WriteConfig, whose fsync on a disk makes it some 30 times slower.
tmp=${TMPDIR:-/tmp}
if [[ -d /dev/shm && -w /dev/shm ]] && (($(df -Pk /dev/shm | awk 'NR == 2 { print $4 }') > 512 * 1024)); then
  tmp=/dev/shm
fi
work=$(mktemp -d "$tmp/custody-fuzz.XXXXXX")
# On an early exit, stops the campaigns still running (each job is a
# subshell whose child is the fuzzer) before their folder goes.
cleanup() {
  local pid
  for pid in $(jobs -pr); do
    pkill -TERM -P "$pid" 2>/dev/null || true
    kill "$pid" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Runs one campaign in $work/NAME and leaves its verdict in $work/NAME/result
# as "runs seconds result note".
campaign() {
  local name=$1 bin=$2 max_len=$3
  local dir="$work/$name" seeds="$root/fuzz/corpus/${name%_fuzz}" note=""
  mkdir -p "$dir/corpus" "$dir/artifacts" "$dir/tmp"
  rm -rf "${findings:?}/$name"  # only this run's reproducers stay
  if [[ -d $seeds ]]; then
    cp -R "$seeds/." "$dir/corpus/"
    chmod -R u+w "$dir/corpus"
  else
    note="no seed corpus (fuzz/corpus/${name%_fuzz}/ is missing): started empty"
  fi
  local override="FUZZ_MAX_LEN_$name"
  max_len=${!override:-${FUZZ_MAX_LEN:-$max_len}}

  # More ASan options for one target: FUZZ_ASAN_OPTIONS_<target>.
  local asan_var="FUZZ_ASAN_OPTIONS_$name"
  local asan_extra=${!asan_var:-}
  local t0=$EPOCHREALTIME rc=0
  # TMPDIR: targets that need files (config_fuzz) make them in the work
  # folder. The subshell keeps bash's one-line notice of a crashed child out
  # of the output; the log has the whole story.
  (
    export TMPDIR="$dir/tmp"
    export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1:symbolize=1${asan_extra:+:$asan_extra}"
    # Third-party allocations LSan cannot see the roots of: fuzz/lsan.supp.
    export LSAN_OPTIONS="suppressions=$root/fuzz/lsan.supp:print_suppressions=0"
    export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
    exec nice -n 5 "$bin" -max_total_time="$FUZZ_SECONDS" -max_len="$max_len" -timeout=10 -rss_limit_mb=2048 \
      -print_final_stats=1 -artifact_prefix="$dir/artifacts/" "$dir/corpus" >"$dir/log" 2>&1
  ) 2>/dev/null || rc=$?
  local seconds runs result
  seconds=$(elapsed "$t0")
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$dir/log" | tail -n 1)
  [[ -n $runs ]] || runs=$(grep -o '^#[0-9]*' "$dir/log" | tail -n 1 | tr -d '#' || true)
  [[ -n $runs ]] || runs=0
  # A finding stops libFuzzer with a non-zero exit; a sanitizer report that
  # somehow did not is a finding too.
  if ((rc == 0)) && ! grep -Eq 'ERROR: (AddressSanitizer|LeakSanitizer|UndefinedBehaviorSanitizer|libFuzzer)|runtime error:' "$dir/log"; then
    result=ok
  elif grep -q 'ERROR: libFuzzer: timeout' "$dir/log"; then
    result=timeout
  elif grep -q 'ERROR: libFuzzer: out-of-memory' "$dir/log"; then
    result=out-of-memory
  elif grep -q 'ERROR: LeakSanitizer' "$dir/log"; then
    result=leak
  elif grep -q 'ERROR: AddressSanitizer' "$dir/log"; then
    result=address-sanitizer
  elif grep -q 'runtime error:' "$dir/log"; then
    result=undefined-behaviour
  elif grep -Eq "terminate called|uncaught exception" "$dir/log"; then
    result=uncaught-exception
  else
    result="crash(exit-$rc)"
  fi
  echo "$runs $seconds $result $note" >"$dir/result"
  printf 'fuzz: %-18s %10s runs %5ss  %s%s\n' "$name" "$runs" "$seconds" "$result" "${note:+  ($note)}"
}

# Prints what a failed campaign left: its log's tail and its reproducer.
report() {
  local name=$1 bin=$2 dir="$work/$1"
  echo
  echo "==================== fuzz: $name FAILED ===================="
  echo "---- last 60 lines of its log:"
  tail -n 60 "$dir/log" 2>/dev/null || echo "(no log: the campaign did not start)"
  local artifact
  artifact=$(find "$dir/artifacts" -maxdepth 1 -type f ! -name 'slow-unit-*' 2>/dev/null | head -n 1 || true)
  if [[ -z $artifact ]]; then
    if grep -q '^Done [0-9]* runs' "$dir/log" 2>/dev/null; then
      echo "---- no reproducer was written: the failure came after the last input, while the process exited"
    else
      echo "---- no reproducer was written (the failure came before any input ran, e.g. at start-up)"
    fi
    return
  fi
  mkdir -p "$findings/$name"
  cp "$artifact" "$findings/$name/"
  local kept="$findings/$name/$(basename "$artifact")"
  echo "---- reproducer: $(basename "$artifact"), $(stat -c %s "$artifact") bytes, as hex (xxd -r turns it back):"
  if command -v xxd >/dev/null; then
    head -c 65536 "$artifact" | xxd
  else
    head -c 65536 "$artifact" | od -A x -t x1z -v
  fi
  echo "---- the same, as base64:"
  head -c 65536 "$artifact" | base64 -w 0
  echo
  echo "---- replay it with:"
  echo "  ${bin#"$root"/} ${kept#"$root"/}"
  echo "  # or, from the base64 above: base64 -d > crash <<<'...' && ${bin#"$root"/} crash"
}

echo "fuzz: ${#names[@]} target(s), ${FUZZ_SECONDS}s each, $FUZZ_JOBS at a time"
for i in "${!names[@]}"; do
  while (($(jobs -pr | wc -l) >= FUZZ_JOBS)); do wait -n || true; done
  campaign "${names[$i]}" "${bins[$i]}" "${lens[$i]}" &
done
wait

failed=()
for i in "${!names[@]}"; do
  read -r _ _ result _ <"$work/${names[$i]}/result" || result=missing
  [[ $result == ok ]] || failed+=("$i")
done
for i in "${failed[@]}"; do report "${names[$i]}" "${bins[$i]}"; done

echo
echo "fuzz: summary (${FUZZ_SECONDS}s per target)"
for i in "${!names[@]}"; do
  read -r runs seconds result note <"$work/${names[$i]}/result" || { runs=0 seconds=0 result=missing note=""; }
  printf '  %-18s %10s runs %5ss  %s%s\n' "${names[$i]}" "$runs" "$seconds" "$result" "${note:+  ($note)}"
done
echo "fuzz: build ${build_seconds}s, total $(elapsed "$started")s"
if ((${#failed[@]} > 0)); then
  echo "fuzz: FAILED: ${#failed[@]} of ${#names[@]} targets (reproducers kept in ${findings#"$root"/}/)" >&2
  exit 1
fi
echo "fuzz: all ${#names[@]} targets ran clean"
