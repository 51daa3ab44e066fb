// Compiled with -mavx2 -mfma: 4 rows x 8 columns = 8 ymm accumulators.
#define RANKME_ISA_NS avx2
#define RANKME_VL 4
#define RANKME_MR 4
#define RANKME_NJ 1
#include "gram_kernel.inl"
#include "normal_kernel.inl"
#include "rowgram_kernel.inl"
