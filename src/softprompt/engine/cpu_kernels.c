/* Fused CPU kernels for the engine's decode step (see cpu_kernels.py): float32 arithmetic,
 * over a float32 or bfloat16 KV cache, with float32 or bfloat16 inputs and outputs where they
 * meet the linear layers (the bfloat16 path).
 *
 * A decode step of a small model on a CPU spends a third of its time outside the matrix
 * products: attention over the slot cache as two batched products, a separate strided write of
 * the new key, rotary embeddings and RMSNorm as chains of small elementwise operations. Each
 * kernel here does one of those in a single pass over its data, for all rows at once, on
 * PyTorch's own OpenMP threads (the library links the libgomp PyTorch has already loaded).
 *
 * Plain C, no PyTorch headers: it compiles in about ten seconds (once per machine; measured on a
 * 2-core Zen 5). Loops are written so that the compiler vectorises them (no calls, no branches
 * in the inner loops); exp is computed here for the same reason.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* e^x in float32 to about 1 ulp, branch-free so that loops calling it vectorise: x = n ln2 + r
 * with |r| <= ln2 / 2 (ln2 split in two parts so that n ln2 is exact), a degree-6 polynomial for
 * e^r, and 2^n put straight into the exponent bits. Inputs are clamped to where 2^n is a normal
 * float; callers never rely on the result below e^-87 (masked columns are skipped instead). */
static inline float sp_exp(float x) {
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    float n = x * 1.44269504088896341f;
    n = (n + 12582912.0f) - 12582912.0f; /* round to nearest integer, 2^23 + 2^22 trick */
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* tanh, branch-free: 1 - 2 / (e^2x + 1) from sp_exp, and near 0 (where that cancels) its odd
 * series to x^9 (the next term is below 1e-9 for |x| < 1/4). */
static inline float sp_tanh(float x) {
    const float wide = 1.0f - 2.0f / (sp_exp(2.0f * x) + 1.0f);
    const float s = x * x;
    const float near = x * (1.0f + s * (-0.333333333f + s * (0.133333333f +
                                  s * (-0.0539682540f + s * 0.0218694885f))));
    return fabsf(x) < 0.25f ? near : wide;
}

/* An element of a buffer that is float32, or bfloat16 (`half`; the upper 16 bits of a float32)
 * widened to float32 on reading and rounded to nearest even on writing, as PyTorch rounds: the
 * KV cache, and on the bfloat16 path the inputs and outputs of the linear layers.
 * `half` is a compile-time constant at every call (the callers are inlined into a dispatch on
 * it), so these are a plain load or a widening load in the vectorised loops. */
static inline __attribute__((always_inline)) float sp_get(const void *restrict p, int64_t i,
                                                             const int half) {
    if (half) {
        const uint32_t bits = (uint32_t)((const uint16_t *)p)[i] << 16;
        float x;
        memcpy(&x, &bits, sizeof x);
        return x;
    }
    return ((const float *)p)[i];
}

static inline __attribute__((always_inline)) void sp_set(void *restrict p, int64_t i, float x,
                                                            const int half) {
    if (half) {
        uint32_t bits;
        memcpy(&bits, &x, sizeof bits);
        bits += 0x7fffu + ((bits >> 16) & 1u);
        ((uint16_t *)p)[i] = (uint16_t)(bits >> 16);
    } else {
        ((float *)p)[i] = x;
    }
}

/* One head of `dim` values made ready for attention: RMS-normalised with `norm` (the q/k norm
 * of Qwen3 and Gemma 3, its weight already offset; skipped when NULL), then rotated on its first
 * `rot` values (x * cos + rotate_half(x) * sin; `sin` carries the sign of rotate_half, its first
 * half negated, so the rotation is x[d +- rot/2] * sin[d]), the rest passed through (partial
 * rotary, Phi-3); everything times `factor`. */
static inline void sp_rotate(const float *restrict x, const float *restrict norm, float eps,
                             const float *restrict cos, const float *restrict sin, float factor,
                             int64_t dim, int64_t rot, float *restrict out) {
    float normed[dim];
    if (norm != NULL) {
        float squares = 0.0f;
        for (int64_t d = 0; d < dim; ++d)
            squares += x[d] * x[d];
        const float scale = 1.0f / sqrtf(squares / (float)dim + eps);
        for (int64_t d = 0; d < dim; ++d)
            normed[d] = x[d] * scale * norm[d];
        x = normed;
    }
    const int64_t half = rot / 2;
    for (int64_t d = 0; d < half; ++d)
        out[d] = (x[d] * cos[d] + x[d + half] * sin[d]) * factor;
    for (int64_t d = half; d < rot; ++d)
        out[d] = (x[d] * cos[d] + x[d - half] * sin[d]) * factor;
    for (int64_t d = rot; d < dim; ++d)
        out[d] = x[d] * factor;
}

/* The first column a sliding window of `window` positions lets the new token at `end` see: the
 * newest window - 1 valid columns before it (a row's valid columns hold consecutive positions),
 * never before `first`. window 0: no window. */
static inline int64_t sp_window_first(const uint8_t *ok, int64_t first, int64_t end,
                                      int64_t window) {
    if (window <= 0)
        return first;
    int64_t column = end, seen = 0;
    while (column > first && seen < window - 1) {
        --column;
        seen += ok[column] != 0;
    }
    return column;
}

/* The first valid column of a row (columns before it are never read), at most `end`. */
static inline int64_t sp_first_valid(const uint8_t *ok, int64_t end) {
    int64_t first = 0;
    while (first < end && !ok[first])
        ++first;
    return first;
}

/* Ask for the next (row, head) pair's keys and values in columns first..end to be brought into
 * the cache while the current pair computes (its key rows are `dim` short runs, one per
 * component, a cache row apart). Strides in elements of `size` bytes. */
static inline void sp_prefetch(const char *k_cache, int64_t ks_dim, const char *v_cache,
                               int64_t vs_col, int64_t first, int64_t end, int64_t dim,
                               int64_t size) {
    const int64_t line = 64 / size;
    for (int64_t d = 0; d < dim; ++d) {
        const char *k_row = k_cache + d * ks_dim * size;
        for (int64_t j = first; j <= end; j += line)
            __builtin_prefetch(k_row + j * size, 0, 3);
        __builtin_prefetch(k_row + end * size, 0, 3);
    }
    const char *v_first = v_cache + first * vs_col * size;
    const char *v_end = v_cache + (end * vs_col + dim) * size;
    for (const char *v = v_first; v < v_end; v += 64)
        __builtin_prefetch(v, 0, 3);
}

/* scores[g * n + l] = q_g . k_l for the `width` key columns starting at column `start` of `k`
 * (width 16 or 32). */
static inline __attribute__((always_inline)) void
sp_scores_block(const float *restrict q, const void *restrict k, int64_t start, int64_t ks_dim,
                const int64_t groups, const int64_t dim, const int64_t width,
                float *restrict scores, int64_t n, const int half) {
    float a[groups][width];
    for (int64_t g = 0; g < groups; ++g)
        for (int64_t l = 0; l < width; ++l)
            a[g][l] = 0.0f;
    for (int64_t d = 0; d < dim; ++d) {
        const int64_t at = d * ks_dim + start;
        for (int64_t g = 0; g < groups; ++g)
            for (int64_t l = 0; l < width; ++l)
                a[g][l] += q[g * dim + d] * sp_get(k, at + l, half);
    }
    for (int64_t g = 0; g < groups; ++g)
        for (int64_t l = 0; l < width; ++l)
            scores[g * n + l] = a[g][l];
}

/* What a decoder family changes in a decode step's attention (see sp_decode_attention). */
struct sp_options {
    int64_t rotary_dim;   /* rotated values of each head (the head size unless partial) */
    int64_t window;       /* sliding window in positions, 0 for none */
    float softcap;        /* scores -> softcap * tanh(scores / softcap), 0 for none */
    const float *q_norm;  /* per-head RMSNorm weights of q and k (offset applied), or NULL */
    const float *k_norm;
    float qk_eps;
};

/* Attention of one (row, key/value head) pair: see sp_decode_attention. `groups` and `dim` are
 * compile-time constants in the common cases (the function is inlined into a dispatch on
 * them), so the per-column accumulators below stay in vector registers. */
static inline __attribute__((always_inline)) void
sp_attend_one(const void *restrict row, const float *restrict cos, const float *restrict sin,
              void *restrict k_cache, int64_t ks_dim, void *restrict v_cache, int64_t vs_col,
              const uint8_t *restrict ok, int64_t end, float scaling, int64_t h,
              int64_t heads, int64_t kv_heads, const int64_t groups, const int64_t dim,
              const struct sp_options *restrict opt, float *restrict scores,
              void *restrict out, const int half, const int half_io) {
    float q[groups * dim], key[dim], acc[groups * dim], total[groups];
    float wide[groups * dim], raw_key[dim];
    const int64_t rot = opt->rotary_dim;
    /* This pair's query heads and key head, widened when the projection is bfloat16. */
    for (int64_t i = 0; i < groups * dim; ++i)
        wide[i] = sp_get(row, h * groups * dim + i, half_io);
    for (int64_t d = 0; d < dim; ++d)
        raw_key[d] = sp_get(row, (heads + h) * dim + d, half_io);
    sp_rotate(raw_key, opt->k_norm, opt->qk_eps, cos, sin, 1.0f, dim, rot, key);
    for (int64_t d = 0; d < dim; ++d)
        sp_set(k_cache, d * ks_dim + end, key[d], half);
    for (int64_t d = 0; d < dim; ++d)
        sp_set(v_cache, end * vs_col + d, sp_get(row, (heads + kv_heads + h) * dim + d, half_io),
               half);
    for (int64_t g = 0; g < groups; ++g)
        sp_rotate(wide + g * dim, opt->q_norm, opt->qk_eps, cos, sin, scaling, dim, rot,
                  q + g * dim);

    const int64_t first = sp_window_first(ok, sp_first_valid(ok, end), end, opt->window);
    const int64_t n = end + 1 - first;
    const uint8_t *restrict okn = ok + first;

    /* scores[g, j] = q_g . k_j: 32 columns at a time for every group at once (independent
     * accumulators in vector registers), then 16; the last partial block is computed as the
     * 16 columns ending at n, overlapping the previous ones (the same values again). */
    enum { W = 16 };
    int64_t j0 = 0;
    for (; j0 + 2 * W <= n; j0 += 2 * W)
        sp_scores_block(q, k_cache, first + j0, ks_dim, groups, dim, 2 * W, scores + j0, n, half);
    for (; j0 + W <= n; j0 += W)
        sp_scores_block(q, k_cache, first + j0, ks_dim, groups, dim, W, scores + j0, n, half);
    if (j0 < n && n >= W)
        sp_scores_block(q, k_cache, first + n - W, ks_dim, groups, dim, W, scores + n - W, n,
                        half);
    else
        for (; j0 < n; ++j0)
            for (int64_t g = 0; g < groups; ++g) {
                float a = 0.0f;
                for (int64_t d = 0; d < dim; ++d)
                    a += q[g * dim + d] * sp_get(k_cache, d * ks_dim + first + j0, half);
                scores[g * n + j0] = a;
            }

    /* Softmax over the valid columns; masked ones get weight exactly 0. Maxima and sums in
     * sixteen lanes (vectorised without reassociating a single running value). */
    if (opt->softcap > 0.0f) {
        const float cap = opt->softcap, inverse = 1.0f / opt->softcap;
        for (int64_t j = 0; j < groups * n; ++j)
            scores[j] = cap * sp_tanh(scores[j] * inverse);
    }
    for (int64_t g = 0; g < groups; ++g) {
        float *restrict sg = scores + g * n;
        float lane[W];
        for (int64_t l = 0; l < W; ++l)
            lane[l] = -INFINITY;
        int64_t j = 0;
        for (; j + W <= n; j += W)
            for (int64_t l = 0; l < W; ++l) {
                const float x = okn[j + l] || j + l == n - 1 ? sg[j + l] : -INFINITY;
                lane[l] = x > lane[l] ? x : lane[l];
            }
        for (int64_t l = 0; j + l < n; ++l) {
            const float x = okn[j + l] || j + l == n - 1 ? sg[j + l] : -INFINITY;
            lane[l] = x > lane[l] ? x : lane[l];
        }
        float top = -INFINITY;
        for (int64_t l = 0; l < W; ++l)
            top = lane[l] > top ? lane[l] : top;
        for (j = 0; j < n; ++j) {
            const float e = sp_exp(sg[j] - top);
            sg[j] = okn[j] || j == n - 1 ? e : 0.0f;
        }
        for (int64_t l = 0; l < W; ++l)
            lane[l] = 0.0f;
        for (j = 0; j + W <= n; j += W)
            for (int64_t l = 0; l < W; ++l)
                lane[l] += sg[j + l];
        for (int64_t l = 0; j + l < n; ++l)
            lane[l] += sg[j + l];
        float sum = 0.0f;
        for (int64_t l = 0; l < W; ++l)
            sum += lane[l];
        total[g] = sum;
    }

    /* out_g = sum_j w_gj v_j / total_g, each value row read once for every group. */
    for (int64_t i = 0; i < groups * dim; ++i)
        acc[i] = 0.0f;
    for (int64_t j = 0; j < n; ++j) {
        const int64_t at = (first + j) * vs_col;
        for (int64_t g = 0; g < groups; ++g) {
            const float w = scores[g * n + j];
            for (int64_t d = 0; d < dim; ++d)
                acc[g * dim + d] += w * sp_get(v_cache, at + d, half);
        }
    }
    for (int64_t g = 0; g < groups; ++g) {
        const float inverse = 1.0f / total[g];
        const int64_t at = (h * groups + g) * dim;
        for (int64_t d = 0; d < dim; ++d)
            sp_set(out, at + d, acc[g * dim + d] * inverse, half_io);
    }
}

/* One decode step of grouped-query attention for `batch` rows over their cache slots.
 *
 * qkv: (batch, (heads + 2 kv_heads) * dim), the fused q/k/v projection of the new token, before
 *   rotary embeddings. cos, sin: (batch, rotary_dim) for each row's position (sin signed,
 *   above).
 * keys: row b's key for head h, cache column c, component d is at
 *   keys[b * ks_slot + h * ks_head + d * ks_dim + c] (keys stored transposed, columns
 *   contiguous); values: values[b * vs_slot + h * vs_head + c * vs_col + d]; both float32, or
 *   bfloat16 with `half` (read widened, written rounded; the arithmetic is float32's).
 * half_io: qkv and out are bfloat16 (the bfloat16 path's linear layers read and write it). 
 * valid: valid[b * valid_stride + c] != 0 where row b holds a real key/value in column c.
 * The rotated key and the value of the new token are written at column `end`; each query head
 * then attends to the valid columns of its row before `end`, and to `end` itself (a new token
 * always sees itself, as the engine's attention mask has it).
 * The family's options: q_norm, k_norm (dim,) each or NULL, with qk_eps; rotary_dim <= dim;
 * window (the newest `window` positions, the new one included; 0: all); softcap (0: none).
 * out: (batch, heads * dim).
 */
void sp_decode_attention(const void *restrict qkv, int64_t batch, int64_t heads,
                         int64_t kv_heads, int64_t dim, const float *restrict cos,
                         const float *restrict sin, void *restrict keys, int64_t ks_slot,
                         int64_t ks_head, int64_t ks_dim, void *restrict values,
                         int64_t vs_slot, int64_t vs_head, int64_t vs_col,
                         const uint8_t *restrict valid, int64_t valid_stride, int64_t end,
                         float scaling, int64_t rotary_dim, int64_t window, float softcap,
                         const float *restrict q_norm, const float *restrict k_norm,
                         float qk_eps, void *restrict out, int half, int half_io,
                         int threads) {
    const struct sp_options options = {rotary_dim, window, softcap, q_norm, k_norm, qk_eps};
    const int64_t groups = heads / kv_heads;
    const int64_t width = (heads + 2 * kv_heads) * dim;
    const int64_t items = batch * kv_heads;
    const int64_t size = half ? 2 : 4, io_size = half_io ? 2 : 4;
#pragma omp parallel num_threads(threads)
    {
        float *scores = malloc(sizeof(float) * (size_t)(groups * (end + 1)));
        /* Contiguous shares, so that each thread knows its next pair and prefetches it. */
        const int64_t count = omp_get_num_threads(), me = omp_get_thread_num();
        const int64_t begin = items * me / count, stop = items * (me + 1) / count;
        for (int64_t item = begin; item < stop; ++item) {
            const int64_t b = item / kv_heads, h = item % kv_heads;
            if (item + 1 < stop) {
                const int64_t nb = (item + 1) / kv_heads, nh = (item + 1) % kv_heads;
                sp_prefetch((const char *)keys + (nb * ks_slot + nh * ks_head) * size, ks_dim,
                            (const char *)values + (nb * vs_slot + nh * vs_head) * size, vs_col,
                            sp_first_valid(valid + nb * valid_stride, end), end, dim, size);
            }
            const char *row = (const char *)qkv + b * width * io_size;
            const float *c = cos + b * rotary_dim, *s = sin + b * rotary_dim;
            const uint8_t *ok = valid + b * valid_stride;
            char *k_cache = (char *)keys + (b * ks_slot + h * ks_head) * size;
            char *v_cache = (char *)values + (b * vs_slot + h * vs_head) * size;
            char *o = (char *)out + b * heads * dim * io_size;
#define SP_ATTEND(G, D, HALF, IO)                                                              \
    sp_attend_one(row, c, s, k_cache, ks_dim, v_cache, vs_col, ok, end, scaling, h, heads,     \
                  kv_heads, G, D, &options, scores, o, HALF, IO)
#define SP_DISPATCH(HALF, IO)                                                                  \
    if (dim == 64 && groups == 3)                                                              \
        SP_ATTEND(3, 64, HALF, IO);                                                            \
    else if (dim == 64 && groups == 4)                                                         \
        SP_ATTEND(4, 64, HALF, IO);                                                            \
    else if (dim == 64 && groups == 1)                                                         \
        SP_ATTEND(1, 64, HALF, IO);                                                            \
    else if (dim == 128 && groups == 4)                                                        \
        SP_ATTEND(4, 128, HALF, IO);                                                           \
    else                                                                                       \
        SP_ATTEND(groups, dim, HALF, IO)
            /* Specialised for the engine's two paths (all float32; all bfloat16: for the two
             * commonest head layouts), the rest in the general form: each specialisation
             * costs about 1.5 s of compile time. */
            if (half && half_io && dim == 64 && groups == 3) {
                SP_ATTEND(3, 64, 1, 1);
            } else if (half && half_io && dim == 128 && groups == 4) {
                SP_ATTEND(4, 128, 1, 1);
            } else if (half && half_io) {
                SP_ATTEND(groups, dim, 1, 1);
            } else if (!half && !half_io) {
                SP_DISPATCH(0, 0);
            } else {
                SP_ATTEND(groups, dim, half, half_io);
            }
#undef SP_DISPATCH
#undef SP_ATTEND
        }
        free(scores);
    }
}

/* RMS normalisation, optionally after a residual add: h += delta (when delta is not NULL), then
 * out = h / sqrt(mean(h^2) + eps), times `weight` (dim,) when it is not NULL (a norm feeding a
 * linear layer has its weight folded into that layer instead; Gemma's norms after attention and
 * the MLP feed the residual). h, delta, out: (rows, dim), contiguous; row r of them here. */
static inline __attribute__((always_inline)) void
sp_add_normalise_row(float *restrict x, const void *restrict delta, void *restrict out,
                     int64_t r, int64_t dim, float eps, const float *restrict weight,
                     const int half_delta, const int half_out) {
    if (delta != NULL)
        for (int64_t i = 0; i < dim; ++i)
            x[i] += sp_get(delta, r * dim + i, half_delta);
    /* Sixteen partial sums: a vectorised reduction without reassociation flags. */
    float part[16] = {0};
    int64_t i = 0;
    for (; i + 16 <= dim; i += 16)
        for (int64_t l = 0; l < 16; ++l)
            part[l] += x[i + l] * x[i + l];
    for (; i < dim; ++i)
        part[0] += x[i] * x[i];
    float squares = 0.0f;
    for (int64_t l = 0; l < 16; ++l)
        squares += part[l];
    const float scale = 1.0f / sqrtf(squares / (float)dim + eps);
    if (weight != NULL)
        for (int64_t j = 0; j < dim; ++j)
            sp_set(out, r * dim + j, x[j] * scale * weight[j], half_out);
    else
        for (int64_t j = 0; j < dim; ++j)
            sp_set(out, r * dim + j, x[j] * scale, half_out);
}

/* half_delta, half_out: delta, out are bfloat16 (h is always float32). */
void sp_add_normalise(float *restrict h, const void *restrict delta, void *restrict out,
                      int64_t rows, int64_t dim, float eps, const float *restrict weight,
                      int half_delta, int half_out, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        float *x = h + r * dim;
        if (half_delta && half_out)
            sp_add_normalise_row(x, delta, out, r, dim, eps, weight, 1, 1);
        else if (half_out)
            sp_add_normalise_row(x, delta, out, r, dim, eps, weight, 0, 1);
        else if (half_delta)
            sp_add_normalise_row(x, delta, out, r, dim, eps, weight, 1, 0);
        else
            sp_add_normalise_row(x, delta, out, r, dim, eps, weight, 0, 0);
    }
}

/* A gated MLP's activation: out[r, i] = act(gate[r, i]) * up[r, i], where each row of gate_up
 * (rows, 2 * width) holds the gate then the up projection; act is SiLU (SwiGLU, `gelu` 0) or
 * GELU's tanh approximation (GeGLU, Gemma; `gelu` 1). out: (rows, width). */
static inline __attribute__((always_inline)) void
sp_silu_mul_row(const void *restrict gate_up, void *restrict out, int64_t r, int64_t width,
                int gelu, const int half) {
    const int64_t g = r * 2 * width, u = g + width, o = r * width;
    if (gelu)
        for (int64_t i = 0; i < width; ++i) {
            const float x = sp_get(gate_up, g + i, half);
            /* 0.5 (1 + tanh(y)) = 1 / (1 + e^-2y): no cancellation where tanh is near -1 */
            const float inner = 1.5957691216057308f * (x + 0.044715f * x * x * x);
            sp_set(out, o + i, x / (1.0f + sp_exp(-inner)) * sp_get(gate_up, u + i, half), half);
        }
    else
        for (int64_t i = 0; i < width; ++i) {
            const float x = sp_get(gate_up, g + i, half);
            sp_set(out, o + i, x / (1.0f + sp_exp(-x)) * sp_get(gate_up, u + i, half), half);
        }
}

/* half: gate_up and out are bfloat16 (the arithmetic is float32's). */
void sp_silu_mul(const void *restrict gate_up, void *restrict out, int64_t rows,
                 int64_t width, int gelu, int half, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        if (half)
            sp_silu_mul_row(gate_up, out, r, width, gelu, 1);
        else
            sp_silu_mul_row(gate_up, out, r, width, gelu, 0);
    }
}

/* ---- Linear layers on weights laid out in panels of 16 output columns ----
 *
 * out (M, N) = x (M, K) @ W^T for W (N, K), with W stored as `panels`: panel p holds output
 * columns 16p .. 16p+15 as K rows of 16 floats (zero columns pad N up to a multiple of 16).
 * A 6 x 16 tile of the output keeps its sums in 12 eight-wide registers while it walks K:
 * each step loads 16 weights (two vectors, in the order they are stored) and broadcasts one
 * value of each of the 6 rows of x, 12 fused multiply-adds. Threads split the panels; each
 * reads every row of x (small: it stays in cache) and its panels once.
 *
 * Written for AVX2 + FMA (16 vector registers): oneDNN's float32 inner product reached about
 * 85 GFLOP/s over the embedded model's layers at 64 rows on a 2-core AMD EPYC (Zen 3), this
 * about 115 (see the engine benchmark page). Whether it wins on a given CPU is measured at
 * start-up (autotune.py), not assumed. */
typedef float sp_v8 __attribute__((vector_size(32)));
typedef float sp_v8u __attribute__((vector_size(32), aligned(4)));

#define SP_TILE_ROWS 6
#define SP_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5)

/* One tile of `rows` (<= 6, a constant after inlining) rows of x against one panel; `cols`
 * (<= 16) of its columns are written. */
static inline __attribute__((always_inline)) void
sp_tile(const int rows, const float *restrict x, int64_t k_size, const float *restrict panel,
        float *restrict out, int64_t ldo, int64_t cols) {
#define SP_DECLARE(r) sp_v8 c##r##a = {0}, c##r##b = {0};
    SP_ROWS(SP_DECLARE)
    for (int64_t k = 0; k < k_size; ++k) {
        const sp_v8 wa = *(const sp_v8u *)(panel + k * 16);
        const sp_v8 wb = *(const sp_v8u *)(panel + k * 16 + 8);
#define SP_MULTIPLY_ADD(r)                                                                     \
    if (r < rows) {                                                                            \
        const float s = x[r * k_size + k];                                                     \
        c##r##a += s * wa;                                                                     \
        c##r##b += s * wb;                                                                     \
    }
        SP_ROWS(SP_MULTIPLY_ADD)
    }
    float spill[16];
#define SP_STORE(r)                                                                            \
    if (r < rows) {                                                                            \
        if (cols == 16) {                                                                      \
            *(sp_v8u *)(out + r * ldo) = c##r##a;                                              \
            *(sp_v8u *)(out + r * ldo + 8) = c##r##b;                                          \
        } else {                                                                               \
            *(sp_v8u *)spill = c##r##a;                                                        \
            *(sp_v8u *)(spill + 8) = c##r##b;                                                  \
            for (int64_t j = 0; j < cols; ++j)                                                 \
                out[r * ldo + j] = spill[j];                                                   \
        }                                                                                      \
    }
    SP_ROWS(SP_STORE)
#undef SP_DECLARE
#undef SP_MULTIPLY_ADD
#undef SP_STORE
}

void sp_panel_linear(const float *restrict x, int64_t m_size, int64_t k_size,
                     const float *restrict panels, int64_t n_size, float *restrict out,
                     int threads) {
    const int64_t count = (n_size + 15) / 16;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t p = 0; p < count; ++p) {
        const float *panel = panels + p * k_size * 16;
        const int64_t cols = n_size - p * 16 < 16 ? n_size - p * 16 : 16;
        float *o = out + p * 16;
        int64_t m = 0;
        for (; m + SP_TILE_ROWS <= m_size; m += SP_TILE_ROWS)
            sp_tile(SP_TILE_ROWS, x + m * k_size, k_size, panel, o + m * n_size, n_size, cols);
        const float *xm = x + m * k_size;
        switch (m_size - m) {
        case 5: sp_tile(5, xm, k_size, panel, o + m * n_size, n_size, cols); break;
        case 4: sp_tile(4, xm, k_size, panel, o + m * n_size, n_size, cols); break;
        case 3: sp_tile(3, xm, k_size, panel, o + m * n_size, n_size, cols); break;
        case 2: sp_tile(2, xm, k_size, panel, o + m * n_size, n_size, cols); break;
        case 1: sp_tile(1, xm, k_size, panel, o + m * n_size, n_size, cols); break;
        default: break;
        }
    }
}

/* Soft-capping in place: x = cap * tanh(x / cap) over n values (Gemma 2's logits: a full decode
 * batch's are 64 x the vocabulary, where PyTorch's tanh took 6% of a step). */
void sp_softcap(float *restrict x, int64_t n, float cap, int threads) {
    const float inverse = 1.0f / cap;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t block = 0; block < (n + 4095) / 4096; ++block) {
        const int64_t stop = (block + 1) * 4096 < n ? (block + 1) * 4096 : n;
        for (int64_t i = block * 4096; i < stop; ++i)
            x[i] = cap * sp_tanh(x[i] * inverse);
    }
}
