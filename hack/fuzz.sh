#!/usr/bin/env bash
# Builds tproxy-cni's fuzz targets (fuzz/) with libFuzzer on the stable toolchain and runs them.
#
#   hack/fuzz.sh [-t SECONDS | -n RUNS] [--merge] [TARGET...]
#
#   -t SECONDS   run each target this long (default 10)
#   -n RUNS      run each target this many executions instead
#   --merge      afterwards, minimise each target's corpus in fuzz/corpus/TARGET (commit the result)
#   TARGET...    default: every target in fuzz/fuzz_targets
#   FUZZ_TIMEOUT=S  seconds one input may take before it counts as a hang (default 10; wall-clock
#                   time, so raise it for a nice'd run on a busy machine)
#
# The committed corpus fuzz/corpus/TARGET seeds each run; what a run finds goes to
# fuzz/target/corpus/TARGET, so a run leaves the repository clean. A crash, a failed invariant or a
# timeout writes the input to fuzz/artifacts/TARGET/ and makes this script fail. One summary line per
# target gives executions, seconds, coverage (edges), features and corpus size.
#
# fuzz/Cargo.lock is not --locked: when the plugin gains a dependency, cargo adds it there (commit
# the change). No cargo-fuzz and no nightly toolchain are needed: this passes cargo the instrumentation flags
# cargo-fuzz would (they are stable flags). FUZZ_SANITIZER=address adds AddressSanitizer, which is
# a nightly flag: RUSTC_BOOTSTRAP=1 is set for that build only. With cargo-fuzz installed,
# `cd fuzz && cargo fuzz run -s none TARGET` works on the same layout.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

seconds=10 runs= merge=0 targets=()
while (($#)); do
  case "$1" in
    -t) seconds="$2"; shift 2 ;;
    -n) runs="$2"; shift 2 ;;
    --merge) merge=1; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) targets+=("$1"); shift ;;
  esac
done
if ((${#targets[@]} == 0)); then
  for f in fuzz_targets/*.rs; do targets+=("$(basename "$f" .rs)"); done
fi

triple="$(rustc -vV | sed -n 's/^host: //p')"
flags="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4"
flags+=" -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table"
flags+=" -Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
target_dir=target
if [[ "${FUZZ_SANITIZER:-none}" == address ]]; then
  flags+=" -Zsanitizer=address"
  target_dir=target/asan
  export RUSTC_BOOTSTRAP=1
fi
echo "== building fuzz targets (${FUZZ_SANITIZER:-no} sanitizer)"
RUSTFLAGS="$flags" cargo build -q --release --target "$triple" --target-dir "$target_dir" \
  $(printf -- '--bin %s ' "${targets[@]}")

failed=0
printf '%-20s %12s %8s %8s %8s %8s  %s\n' target execs seconds edges features corpus result
for t in "${targets[@]}"; do
  bin="$target_dir/$triple/release/$t"
  scratch="target/corpus/$t"
  mkdir -p "corpus/$t" "$scratch" "artifacts/$t"
  opts=(-artifact_prefix="artifacts/$t/" -max_len=16384 -timeout="${FUZZ_TIMEOUT:-10}" -rss_limit_mb=2048 -print_final_stats=1)
  [[ -f "dicts/$t.dict" ]] && opts+=(-dict="dicts/$t.dict")
  if [[ -n "$runs" ]]; then opts+=(-runs="$runs"); else opts+=(-max_total_time="$seconds"); fi
  log="target/$t.log"
  start=$(date +%s%N)
  if "$bin" "${opts[@]}" "$scratch" "corpus/$t" >"$log" 2>&1; then result=ok; else result=FAILED; failed=1; fi
  ms=$((($(date +%s%N) - start) / 1000000))
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  last=$(grep -E '^#[0-9]+' "$log" | tail -1 || true)
  edges=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
  features=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
  corpus=$(sed -n 's/.* corp: \([0-9]*\).*/\1/p' <<<"$last")
  printf '%-20s %12s %6d.%d %8s %8s %8s  %s\n' "$t" "${execs:-?}" $((ms / 1000)) $((ms % 1000 / 100)) "${edges:-?}" "${features:-?}" "${corpus:-?}" "$result"
  if [[ "$result" == FAILED ]]; then
    grep -E -A30 'panicked|ERROR: libFuzzer|==[0-9]+==' "$log" | head -60
    ls "artifacts/$t" >&2
  fi
  if ((merge)) && [[ "$result" == ok ]]; then
    rm -rf "target/merged/$t" && mkdir -p "target/merged/$t"
    "$bin" -merge=1 -max_len=16384 "target/merged/$t" "corpus/$t" "$scratch" >"target/$t.merge.log" 2>&1
    rm -rf "corpus/$t" && mv "target/merged/$t" "corpus/$t"
    echo "   corpus/$t minimised to $(ls "corpus/$t" | wc -l) inputs"
  fi
done
exit "$failed"
