#!/bin/bash
# Same-process A/B of exact-Gram tile variants (issue 17). Each variant is a source tree whose
# csrc/cpu/gram_kernel.inl is compiled into its own namespace (v0..v3) next to the checkout's kernels;
# tiles_ab then runs the variants' pack + tiles on one packed 512-row chunk, alternated round by round,
# and prints each one's median % of a 29.2 G FMA/s core and its median ratio to v0 (ratios from the same
# round survive the host's drift, which moves single numbers by 10-20 % on the shared dev VMs).
#
#   bash benchmarks/tiles_ab/build.sh avx2 OUT "TREE0 [-DFLAG...]" "TREE1 [-DFLAG...]" ...   (up to 4)
#   OUT D REPS ROUNDS NVARIANTS          e.g. OUT 2048 4 10 2
#
# The fifth column (z512) is always the checkout's AVX-512 kernel, for reference.
set -e
ISA=$1; O=$2; shift 2
H=$(cd "$(dirname "$0")" && pwd); M=$(cd "$H/../.." && pwd)/csrc
F="-O3 -DNDEBUG -ffp-contract=fast -fno-math-errno -std=gnu++17 -DRANKME_HAVE_X86_VARIANTS=1 -I$M/include -Wno-psabi"
if [ "$ISA" = avx512 ]; then V=$H/variant_avx512.cpp; VF="-mavx512f -mavx512dq -mavx2 -mfma"; else V=$H/variant_avx2.cpp; VF="-mavx2 -mfma"; fi
W=$(mktemp -d); i=0; objs=""
for v in "$@"; do set -- $v; S=$1; shift; g++ $F -I$S/csrc/cpu "$@" $VF -DNSNAME=v$i -c $V -o $W/v$i.o & objs="$objs $W/v$i.o"; i=$((i+1)); done
while [ $i -lt 4 ]; do g++ $F -I$M/cpu $VF -DNSNAME=v$i -c $V -o $W/v$i.o & objs="$objs $W/v$i.o"; i=$((i+1)); done
g++ $F -I$M/cpu -c $M/cpu/gram_isa_generic.cpp -o $W/gg.o &
g++ $F -I$M/cpu -mavx2 -mfma -c $M/cpu/gram_isa_avx2.cpp -o $W/g2.o &
g++ $F -I$M/cpu -mavx512f -mavx512dq -mavx2 -mfma -c $M/cpu/gram_isa_avx512.cpp -o $W/g5.o &
wait
g++ $F -I$M/cpu $H/tiles_ab.cpp $objs $W/g2.o $W/g5.o $W/gg.o $M/cpu/gram.cpp -o $O -lpthread
rm -rf $W
