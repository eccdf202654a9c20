/* llama.cpp's 256-value super-block layouts (ggml-common.h): the K-quant weight blocks,
 * and Q8_K, the 8-bit activations their dot products take. Included once by _kernels.c,
 * before the K-quant quantizers (kernels_kquantize.h) and kernels (kernels_kquants.h). */
#define QK_K 256

enum { T_Q2_K = 10, T_Q3_K = 11, T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14 };

typedef struct { uint8_t scales[16]; uint8_t qs[64]; uint16_t d, dmin; } block_q2_K;
typedef struct { uint8_t hmask[32]; uint8_t qs[64]; uint8_t scales[12]; uint16_t d; } block_q3_K;
typedef struct { uint16_t d, dmin; uint8_t scales[12]; uint8_t qs[128]; } block_q4_K;
typedef struct { uint16_t d, dmin; uint8_t scales[12]; uint8_t qh[32]; uint8_t qs[128]; } block_q5_K;
typedef struct { uint8_t ql[128]; uint8_t qh[64]; int8_t scales[16]; uint16_t d; } block_q6_K;
typedef struct { float d; int8_t qs[QK_K]; int16_t bsums[QK_K / 16]; } block_q8_K;
_Static_assert(sizeof(block_q2_K) == 84, "q2_K block");
_Static_assert(sizeof(block_q3_K) == 110, "q3_K block");
_Static_assert(sizeof(block_q4_K) == 144, "q4_K block");
_Static_assert(sizeof(block_q5_K) == 176, "q5_K block");
_Static_assert(sizeof(block_q6_K) == 210, "q6_K block");
_Static_assert(sizeof(block_q8_K) == 292, "q8_K block");

/* bytes per block of a K-quant type; 0 for any other type */
static size_t kq_block_bytes(int type) {
    switch (type) {
    case T_Q2_K: return sizeof(block_q2_K);
    case T_Q3_K: return sizeof(block_q3_K);
    case T_Q4_K: return sizeof(block_q4_K);
    case T_Q5_K: return sizeof(block_q5_K);
    case T_Q6_K: return sizeof(block_q6_K);
    default: return 0;
    }
}
