// One variant of the exact-Gram kernel (AVX-512 shape) in its own namespace NSNAME, for tiles_ab (build.sh).
#define RANKME_ISA_NS NSNAME
#define RANKME_VL 8
#define RANKME_MR 8
#define RANKME_NJ 3
#include "gram_kernel.inl"
