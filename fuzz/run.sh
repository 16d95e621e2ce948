#!/usr/bin/env bash
# Fuzzing under AddressSanitizer + UndefinedBehaviorSanitizer (clang; Debian: apt-get install clang).
#   fuzz/run.sh [SECONDS_PER_TARGET] [TARGET ...]   default 600 s, every target; .ci/run: 15 s, FUZZ_SEED=1
# Builds the libFuzzer targets (CMake, -DDELTAPACK_FUZZ=ON) in build-fuzz/, runs each from a copy of the
# committed seed corpus (fuzz/corpus, made by fuzz/make_corpus.py) with capped memory, runs the atheris
# targets (fuzz/fuzz_python.py) for the Python entry points, and runs the C++ kernel check under the same
# sanitizers. Exits non-zero on any finding; a crashing input is left in build-fuzz/findings/.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_TARGET=${1:-600}
shift || true
TARGETS=" ${*:-delta_file params record recipes peft checkpoint python_record kernels threads} "
BUILD=build-fuzz
LIMITS=(-rss_limit_mb=2048 -malloc_limit_mb=1024 -timeout=10 -seed="${FUZZ_SEED:-0}")  # seed 0: random
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_BUILD_TYPE=RelWithDebInfo -DDELTAPACK_FUZZ=ON -DDELTAPACK_CUDA=OFF >/dev/null
cmake --build "$BUILD" --target fuzz_delta_file fuzz_params fuzz_record kernel_check_sanitized >/dev/null
mkdir -p "$BUILD/findings"
for target in delta_file params record; do
  [[ $TARGETS == *" $target "* ]] || continue
  work="$BUILD/corpus-$target"
  mkdir -p "$work" && cp -n fuzz/corpus/$target/* "$work/"
  "$BUILD/fuzz_$target" "$work" -max_total_time="$SECONDS_PER_TARGET" -max_len=65536 "${LIMITS[@]}" \
    -artifact_prefix="$BUILD/findings/$target-" -print_final_stats=1 2>"$BUILD/$target.log" ||
    { tail -40 "$BUILD/$target.log"; exit 1; }
  echo "fuzz_$target: $(grep -o 'stat::number_of_executed_units: *[0-9]*' "$BUILD/$target.log" | grep -o '[0-9]*$') runs," \
       "$(grep -oE 'cov: [0-9]+' "$BUILD/$target.log" | tail -1), no findings"
done
for target in recipes peft checkpoint python_record; do
  [[ $TARGETS == *" $target "* ]] || continue
  work="$BUILD/corpus-$target"
  mkdir -p "$work" && cp -n fuzz/corpus/${target#python_}/* "$work/"
  python fuzz/fuzz_python.py "${target#python_}" "$work" -max_total_time="$SECONDS_PER_TARGET" "${LIMITS[@]}" \
    -artifact_prefix="$BUILD/findings/$target-" -print_final_stats=1 >"$BUILD/$target.log" 2>&1 ||
    { tail -40 "$BUILD/$target.log"; exit 1; }
  echo "fuzz_python $target: $(grep -o 'stat::number_of_executed_units: *[0-9]*' "$BUILD/$target.log" | grep -o '[0-9]*$') runs," \
       "$(grep -oE 'cov: [0-9]+' "$BUILD/$target.log" | tail -1), no findings"
done
# Every kernel of every SIMD path (and the 2^31-wide row) under the sanitizers.
if [[ $TARGETS == *" kernels "* ]]; then
  "$BUILD/kernel_check_sanitized" | tail -1
fi
# The threaded rebuilds under ThreadSanitizer.
if [[ $TARGETS == *" threads "* ]]; then
  cmake -S . -B build-tsan -G Ninja -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_BUILD_TYPE=RelWithDebInfo -DDELTAPACK_TSAN=ON -DDELTAPACK_CUDA=OFF >/dev/null
  cmake --build build-tsan --target thread_check >/dev/null
  (cd build-tsan && TSAN_OPTIONS=halt_on_error=1 ./thread_check | tail -1)
fi
