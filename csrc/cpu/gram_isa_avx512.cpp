// Compiled with -mavx512f -mfma: 8 rows x 24 columns = 24 zmm accumulators, 3 loads + 8 broadcasts
// per 24 FMAs, which keeps both FMA ports busy without exhausting the 32 registers.
#define RANKME_ISA_NS avx512
#define RANKME_VL 8
#define RANKME_MR 8
#define RANKME_NJ 3
#include "gram_kernel.inl"
#include "normal_kernel.inl"
#include "rowgram_kernel.inl"
