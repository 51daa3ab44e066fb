// Compiled with -mavx2 -mfma: 4 rows x 12 columns (3 vectors) = 12 ymm accumulators (micro43).
#define RANKME_ISA_NS avx2
#define RANKME_VL 4
#define RANKME_MR 4
#define RANKME_NJ 3
#include "gram_kernel.inl"
#include "normal_kernel.inl"
#include "rowgram_kernel.inl"
