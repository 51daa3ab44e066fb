#!/bin/bash
# Same-process A/B of whole `gram_update` builds (issue 17): each source tree's csrc/cpu (driver, schedules,
# kernels) is compiled with `-Drankme=rvN`, so up to four trees live side by side in one binary, and `drv`
# runs them alternately round by round on the same matrix (the order reversed every other round). It prints
# each variant's median % of the FMA peak and the median (min, max) of its per-round ratio to v0: ratios from
# the same round survive the host's drift, which moves single numbers by 10-25 % on the shared dev VMs.
# (benchmarks/tiles_ab/ does the same for the tile sweep alone.)
#
#   bash benchmarks/gram_ab/build.sh OUT TREE0 [TREE1 ...]        (a tree: a checkout or a copy with csrc/)
#   [RANKME_FAST_ISA=avx2] [PEAK=58.3e9] OUT D N THREADS ROUNDS NVARIANTS [CHUNK_ROWS0 CHUNK_ROWS1 ...]
#   e.g.  git worktree add /tmp/base HEAD~1 && bash benchmarks/gram_ab/build.sh /tmp/ab /tmp/base . &&
#         /tmp/ab 2048 9536 2 10 2
# PEAK is one core's float64 FMA rate in flop/s (`python benchmarks/fma_peak.py`); CHUNK_ROWS sets
# GramArgs.chunk_rows per variant (0: the default), so one tree listed twice compares chunk sizes.
set -e
O=$1; shift
F="-O3 -DNDEBUG -ffp-contract=fast -fno-math-errno -std=gnu++17 -DRANKME_HAVE_X86_VARIANTS=1 -Wno-psabi"
H=$(cd "$(dirname "$0")" && pwd); W=$(mktemp -d); i=0
for S in "$@"; do
  S=$(cd "$S" && pwd)
  N="-Drankme=rv$i -I$S/csrc/include -I$S/csrc/cpu"
  g++ $F $N -c $S/csrc/cpu/gram.cpp -o $W/g$i.o &
  g++ $F $N -c $S/csrc/cpu/gram_isa_generic.cpp -o $W/gg$i.o &
  g++ $F $N -mavx2 -mfma -c $S/csrc/cpu/gram_isa_avx2.cpp -o $W/g2$i.o &
  g++ $F $N -mavx512f -mavx512dq -mavx2 -mfma -c $S/csrc/cpu/gram_isa_avx512.cpp -o $W/g5$i.o &
  g++ $F $N -DWRAPNAME=run_v$i -c $H/wrap.cpp -o $W/w$i.o &
  wait
  i=$((i+1))
done
while [ $i -lt 4 ]; do  # unused slots
  echo "extern \"C\" double run_v$i(const float*, long, long, int, double*, long, double*, long) { return 1; }" > $W/s$i.cpp
  g++ -c $W/s$i.cpp -o $W/w$i.o
  i=$((i+1))
done
g++ $F $H/drv.cpp $W/*.o -o $O -lpthread
rm -rf $W
