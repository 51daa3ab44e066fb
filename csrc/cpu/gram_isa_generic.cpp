#define RANKME_ISA_NS generic
#define RANKME_VL 2
#define RANKME_MR 4
#define RANKME_NJ 1
#include "gram_kernel.inl"
#include "normal_kernel.inl"
#include "rowgram_kernel.inl"
