// Single pass of the distillation loss over one chunk of bf16 logits, one thread-block cluster
// per row (sm_90+). Compiled at run time with NVRTC (cluster_single_pass.py); no CUDA headers.
//
// A cluster of CLUSTER blocks owns a row at a time. Block r holds vocab segment r of the row
// (student and teacher logits) in shared memory, loaded with cp.async while the cluster works
// on its previous row. The blocks' partial softmax statistics meet through distributed shared
// memory behind a hardware cluster barrier, so the logits cross DRAM exactly once each way
// (read z_S, z_T, write dz over z_S) and nothing is re-read from L2 or polled in global memory.
// Clusters never wait on each other: any number of them may be resident.
//
// Compile-time constants (-D): CLUSTER (blocks per row), THREADS (per block), KIND (0 forward
// KL, 1 reverse KL, 2 JSD), STAGES (row buffers in shared memory: 2 loads the next row while
// this one is computed; 1 leaves that overlap to another block on the multiprocessor),
// MINBLOCKS (blocks per multiprocessor the registers must allow), ONLINE (1: each thread keeps a
// running maximum and sum-exp, one pass over shared memory for the segment's statistics instead
// of two), UNROLL (vectors per loop iteration), FASTRED (1: block reductions alternate between two
// scratch buffers, one __syncthreads each instead of two), PREFETCH (1: at the start of a row, one
// thread asks L2 for the cluster's next row of this segment, so DRAM keeps streaming while the
// block computes and the next row's copy into shared memory is an L2 hit), HOLD_STUDENT (0: only
// the teacher segment is held in shared memory; the student segment is prefetched into L2 and
// read from there by every pass, which halves the shared memory per block and so allows more
// rows in flight), STORE_R (JSD only, 1: the pass that sums KL(p_S || M) leaves each element's
// log2 p_S - log2 M in fp16 over its teacher logit in shared memory, so the dz pass needs one
// exp2 per element instead of two exp2 and a lg2; fp16 keeps 11 significant bits of the
// difference, which is 0 where p_S = M), STORE_P (JSD with STORE_R only, 1: that pass also leaves
// p_S 2^15 in fp16 over the element's student logit, so the dz pass takes no exp2 at all; fp16
// keeps 11 significant bits of p_S down to p_S = 2^-29, and dz is p_S times a row-wide factor, so
// its error stays below a quarter of dz's own bf16 rounding), RELAXED (1: at a cluster meeting only
// the thread that wrote the block's partials fences them; every thread arrives at the cluster
// barrier relaxed instead of with release semantics, a memory barrier per thread and row less),
// PIPE (1: every pass over a segment reads the thread's next 16-byte vectors before it computes on
// the current ones, so the shared-memory latency hides behind the math instead of stalling the
// unpacking), LOAD_BEHIND (STAGES 1 only, 1: the dz pass starts the next row's copy of each vector
// into shared memory as soon as it has written that vector's dz, so the load of the next row
// overlaps the rest of this row's dz pass instead of starting after it; every pass maps vector i to
// the same thread, so the thread that issues the copy is the only reader of the slot it refills),
// OWN_COPIES (1: no block barrier after a row's copy or at the end of a row: every pass reads only
// the vectors its thread copied, and cp.async.wait_group makes a thread's own copies visible to
// it, so a warp starts on its vectors as soon as they have arrived instead of waiting for the
// block's slowest copy), FAST_STATS (1: a segment's maxima are taken on bf16 pairs, one max.bf16x2
// per two elements without unpacking, and the sums' exponents as one fma z c - m c_hi, where c_hi
// is c with its 8 lowest significand bits cleared: m, a bf16 logit, has 8 significant bits, so
// m c_hi is exact and the sums are exactly 2^(m c_lo) times those relative to m (c_lo = c - c_hi),
// a factor the row's log-normalizer takes out once; rounding m c instead would move every
// log-probability of the row by up to |m c| 2^-24, 2e-6 for logits near 50, visible in small
// losses), FMA_LOGP (FAST_STATS only, 1: the later passes take each log-probability, plus a
// row-constant rho, as one fma z c - K, where K is m c_hi + log2 l rounded to a multiple of 2^-8
// (exact in fp32) and rho = m c_hi + log2 l - K (|rho| <= 2^-9) is computed exactly; the factors
// 2^-rho go into each row's constants (dz's scale, JSD's mixture weight, the loss partials), so the
// log-probabilities keep fp32 accuracy (adding 15 to them as well, so that JSD's KL pass would get
// p_S 2^15 for its fp16 store without a product, made the top elements' rounding 4x coarser: not
// done); JSD's dz pass with STORE_P takes one fma less).
// Logarithms are base 2 inside (exp2 / lg2 hardware approximations, as the Triton
// kernels use); losses are returned in nats.

#ifndef CLUSTER
#define CLUSTER 8
#endif
#ifndef THREADS
#define THREADS 256
#endif
#ifndef KIND
#define KIND 0
#endif
#ifndef STAGES
#define STAGES 2
#endif
#ifndef MINBLOCKS
#define MINBLOCKS 1
#endif
#ifndef ONLINE
#define ONLINE 0
#endif
#ifndef UNROLL
#define UNROLL 1
#endif
#ifndef FASTRED
#define FASTRED 0
#endif
#ifndef PREFETCH
#define PREFETCH 0
#endif
#ifndef HOLD_STUDENT
#define HOLD_STUDENT 1
#endif
#define ROWS_HELD (HOLD_STUDENT ? 2 : 1)
#ifndef STORE_R
#define STORE_R 0
#endif
#ifndef STORE_P
#define STORE_P 0
#endif
#define KEEP_P (KIND == 2 && STORE_R && STORE_P && HOLD_STUDENT)
#define P_SCALE 32768.0f  // 2^15: p_S <= 1 stays below fp16's largest finite value
#ifndef RELAXED
#define RELAXED 0
#endif
#ifndef PIPE
#define PIPE 0
#endif
#ifndef LOAD_BEHIND
#define LOAD_BEHIND 0
#endif
#ifndef OWN_COPIES
#define OWN_COPIES 0
#endif
#ifndef FAST_STATS
#define FAST_STATS 0
#endif
#ifndef FMA_LOGP
#define FMA_LOGP 0
#endif
#if FMA_LOGP && !FAST_STATS
#error "FMA_LOGP needs the exact segment bases of FAST_STATS"
#endif
#if LOAD_BEHIND && STAGES != 1
#error "LOAD_BEHIND refills the one row stage: it needs STAGES 1"
#endif
constexpr int kUnroll = UNROLL;

#define WARPS (THREADS / 32)
#define LN2 0.6931471805599453f
#define NEG_INF __int_as_float(0xff800000)

typedef unsigned short bf16;

__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ float lg2(float x) {
    float y;
    asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ void unpack8(uint4 v, float* out) {
    const unsigned w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        out[2 * i] = __uint_as_float(w[i] << 16);
        out[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}

// Two floats as fp16x2 (round to nearest even), and eight fp16 of a vector back to floats.
__device__ __forceinline__ unsigned pack_half2(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

__device__ __forceinline__ void unpack_half8(uint4 v, float* out) {
    const unsigned w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const unsigned short lo = (unsigned short)(w[i] & 0xffffu), hi = (unsigned short)(w[i] >> 16);
        asm("cvt.f32.f16 %0, %1;" : "=f"(out[2 * i]) : "h"(lo));
        asm("cvt.f32.f16 %0, %1;" : "=f"(out[2 * i + 1]) : "h"(hi));
    }
}

__device__ __forceinline__ unsigned pack2(float lo, float hi) {
    unsigned r;  // round to nearest even, as torch's .to(bfloat16)
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// The factor 2^((m_part - m) c) that moves sums relative to the maximum m_part to the maximum
// m >= m_part; 0 for an empty part (m_part = -inf), which weighs nothing.
__device__ __forceinline__ float rescale(float m_part, float m, float scale2) {
    return m_part == NEG_INF ? 0.0f : ex2((m_part - m) * scale2);
}

// A segment maximum as the base of exp2: an all -inf segment (every logit weighs 0) takes 0, so
// that no (-inf) - (-inf) appears.
__device__ __forceinline__ float exp_base(float m) { return m == NEG_INF ? 0.0f : m; }

// Adds one vector's sums of 2^((z - base) c) of both rows to acc[0..1] and, for reverse KL, the
// cross term sum 2^((s - base_s) c) (s - t) c to acc[2]; FAST_STATS: 2^(z c - base c_hi), base_c
// being c_hi (the exact product of a bf16 base and c_hi).
__device__ __forceinline__ void add_exp_sums(const float* s, const float* t, float base_s, float base_t,
                                             float scale2, float base_c, float* acc) {
    [[maybe_unused]] const float bs = base_s * base_c, bt = base_t * base_c;  // FAST_STATS: exact
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        const float es = FAST_STATS ? ex2(fmaf(s[j], scale2, -bs)) : ex2((s[j] - base_s) * scale2);
        acc[0] += es;
        acc[1] += FAST_STATS ? ex2(fmaf(t[j], scale2, -bt)) : ex2((t[j] - base_t) * scale2);
        if (KIND == 1) acc[2] += es * (s[j] - t[j]) * scale2;
    }
}

// Vector i of the student segment: from shared memory, or (HOLD_STUDENT 0) from global memory
// through L2 only, where the row start's prefetch put it.
__device__ __forceinline__ uint4 student_vec(const uint4* vs, int i) {
#if HOLD_STUDENT
    return vs[i];
#else
    uint4 v;
    asm("ld.global.cg.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(vs + i));
    return v;
#endif
}

// Eight bf16 (HALF false) or fp16 (HALF true) values of a vector as floats.
template <bool HALF>
__device__ __forceinline__ void unpack(uint4 v, float* out) {
    if (HALF) {
        unpack_half8(v, out);
    } else {
        unpack8(v, out);
    }
}

// This thread's 16-byte vectors i = threadIdx.x, + THREADS, ... of both rows' segments (the
// teacher's in shared memory), in that order, one pass over the segment per object, as floats
// (bf16 logits, or fp16 where a pass left JSD's p_S or log-ratio: S_HALF / T_HALF). PIPE: vector
// i + THREADS is read when vector i is handed out, before the caller computes on it; a caller may
// overwrite vector i (the next read is of another vector).
struct Vectors {
    const uint4 *vs, *vt;
    int n_vec;
    uint4 s_next, t_next;  // PIPE: the vectors of the next call
    __device__ __forceinline__ Vectors(const uint4* vs_, const uint4* vt_, int n_vec_)
        : vs(vs_), vt(vt_), n_vec(n_vec_) {
#if PIPE
        if ((int)threadIdx.x < n_vec) read(threadIdx.x);
#endif
    }
    __device__ __forceinline__ void read(int i) {
        s_next = student_vec(vs, i);
        t_next = vt[i];
    }
    // vector i of both rows as read (bf16 pairs)
    __device__ __forceinline__ void raw(int i, uint4& s, uint4& t) {
#if PIPE
        s = s_next;
        t = t_next;
        if (i + THREADS < n_vec) read(i + THREADS);
#else
        s = student_vec(vs, i);
        t = vt[i];
#endif
    }
    template <bool S_HALF = false, bool T_HALF = false>
    __device__ __forceinline__ void pair(int i, float* s, float* t) {
#if PIPE
        uint4 a, b;
        raw(i, a, b);
        unpack<S_HALF>(a, s);
        unpack<T_HALF>(b, t);
#else
        unpack<S_HALF>(student_vec(vs, i), s);
        unpack<T_HALF>(vt[i], t);
#endif
    }
};

// Elementwise maxima of two bf16 pairs (a NaN loses to a number, as in fmaxf).
__device__ __forceinline__ unsigned max_bf16x2(unsigned a, unsigned b) {
    unsigned r;
    asm("max.bf16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
    return r;
}

// The larger of a bf16 pair's two values, as a float.
__device__ __forceinline__ float max_of_pair(unsigned m) {
    return fmaxf(__uint_as_float(m << 16), __uint_as_float(m & 0xffff0000u));
}

// Asks L2 for `bytes` (a multiple of 16) of global memory at p (16-byte aligned); no wait.
__device__ __forceinline__ void prefetch_l2(const void* p, unsigned bytes) {
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(bytes) : "memory");
}

// Eight floats as 16-byte vector i of `out`: bf16 (dz, to global memory) or fp16 (HALF: JSD's
// log-ratio, over the teacher's segment in shared memory).
template <bool HALF = false>
__device__ __forceinline__ void store8(void* out, int i, const float* x) {
    auto pack = [](float lo, float hi) { return HALF ? pack_half2(lo, hi) : pack2(lo, hi); };
    uint4 v;
    v.x = pack(x[0], x[1]);
    v.y = pack(x[2], x[3]);
    v.z = pack(x[4], x[5]);
    v.w = pack(x[6], x[7]);
    ((uint4*)out)[i] = v;
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
    unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(gmem) : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

// `wrote`: this thread wrote shared memory that peers read after the barrier (the partials).
__device__ __forceinline__ void cluster_sync(bool wrote) {
#if RELAXED
    // the writer's fence and the others' relaxed arrive: the same visibility, one fence per block
    if (wrote) asm volatile("fence.acq_rel.cluster;" ::: "memory");
    asm volatile("barrier.cluster.arrive.relaxed.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
#else
    // release this block's shared-memory writes to the cluster, acquire the peers'
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
#endif
}

__device__ __forceinline__ unsigned cluster_rank() {
    unsigned r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
    return r;
}

// A float of block `rank`'s shared memory at the address this block has for `p`.
__device__ __forceinline__ float peer_load(const float* p, unsigned rank) {
    unsigned local = (unsigned)__cvta_generic_to_shared(p), remote;
    float v;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(local), "r"(rank));
    asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(remote) : "memory");
    return v;
}

// Sum (MAX false) or maximum (MAX true) of two values.
template <bool MAX>
__device__ __forceinline__ float combine(float a, float b) {
    return MAX ? fmaxf(a, b) : a + b;
}

template <bool MAX>
__device__ __forceinline__ float warp_reduce(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = combine<MAX>(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Block-wide sums (MAX false) or maxima (MAX true) of N values; every thread gets the results.
// `scratch`: WARPS * N floats, free once every thread has left the reduction before the last one
// that used it (FASTRED: the caller alternates two buffers, so the barrier between two
// reductions frees it).
template <int N, bool MAX>
__device__ __forceinline__ void block_reduce(float* v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = warp_reduce<MAX>(v[i]);
#if !FASTRED
    __syncthreads();  // scratch is free (its previous readers are done)
#endif
    if (lane == 0)
#pragma unroll
        for (int i = 0; i < N; ++i) scratch[i * WARPS + warp] = v[i];
    __syncthreads();
#pragma unroll
    for (int i = 0; i < N; ++i) {
        float x = lane < WARPS ? scratch[i * WARPS + lane] : (MAX ? NEG_INF : 0.0f);
        v[i] = warp_reduce<MAX>(x);
    }
}

// Partial statistics a block publishes to its cluster, per meeting parity.
struct Partials {
    float m_s, m_t, l_s, l_t, a;  // maxima (logit units), sums of 2^((z - m) c), cross term
    float kl_s;                    // JSD: this segment's sum of p_S (log p_S - log M)
};

extern "C" __global__ void __cluster_dims__(CLUSTER, 1, 1) __launch_bounds__(THREADS, MINBLOCKS)
    distill_cluster_single_pass(bf16* zs, const bf16* zt, int stride_s, int stride_t, float* loss_out,
                                int loss_stride, int n_rows, int n_cols, int seg_len, double scale2_d,
                                double beta_d, double grad_scale_d) {
    // seg_len: elements per block, a multiple of 8; dynamic shared memory: STAGES x (student,
    // teacher; teacher only without HOLD_STUDENT) x seg_len bf16.
    extern __shared__ __align__(16) unsigned char smem_raw[];
    __shared__ Partials parts[2][2];  // [meeting: stats, JSD sums][row parity p]
    __shared__ float scratch_bufs[FASTRED ? 2 : 1][6 * WARPS];
    int n_reductions = 0;  // the same sequence in every thread
    auto scratch_next = [&]() { return scratch_bufs[FASTRED ? (n_reductions++ & 1) : 0]; };

    const float scale2 = (float)scale2_d, beta = (float)beta_d, grad_scale = (float)grad_scale_d;
    // FAST_STATS: exponents relative to bases m c_hi (exact); otherwise relative to m, times c
    [[maybe_unused]] const float c_hi = __int_as_float(__float_as_int(scale2) & 0xffffff00);
    const float base_c = FAST_STATS ? c_hi : scale2;
    const unsigned rank = cluster_rank();
    const int cluster = blockIdx.x / CLUSTER, n_clusters = gridDim.x / CLUSTER;
    const int col0 = min((int)rank * seg_len, n_cols), col1 = min(col0 + seg_len, n_cols);
    const int n_vec = (col1 - col0) / 8;  // 16-byte vectors of this block's segment
    // stage k, tensor w (0 student, 1 teacher; the teacher only without HOLD_STUDENT)
    auto stage = [&](int k, int w) {
        return (bf16*)smem_raw + (size_t)(ROWS_HELD * k + w - (HOLD_STUDENT ? 0 : 1)) * seg_len;
    };
    auto student_at = [&](int row) { return zs + (long long)row * stride_s + col0; };
    auto teacher_at = [&](int row) { return zt + (long long)row * stride_t + col0; };
    [[maybe_unused]] const unsigned seg_bytes = 16u * n_vec;

    // a row's copy into stage k: the student segment into L2 (without HOLD_STUDENT; a no-op where
    // PREFETCH put it), each thread's vectors (copy_vec), then cp_async_commit
    auto prefetch_student = [&](const bf16* gs) {
#if !HOLD_STUDENT
        if (threadIdx.x == 0 && n_vec > 0) prefetch_l2(gs, seg_bytes);
#endif
    };
    auto copy_vec = [&](const bf16* gs, const bf16* gt, int k, int i) {
        if (HOLD_STUDENT) cp_async16(stage(k, 0) + 8 * i, gs + 8 * i);
        cp_async16(stage(k, 1) + 8 * i, gt + 8 * i);
    };
    auto load_row = [&](int row, int k) {
        const bf16* gs = student_at(row);
        const bf16* gt = teacher_at(row);
        prefetch_student(gs);
        for (int i = threadIdx.x; i < n_vec; i += THREADS) copy_vec(gs, gt, k, i);
        cp_async_commit();
    };

    // k: this row's shared-memory stage; p: the parity of its partials, which alternates every
    // row so that a block never overwrites partials a slower peer may still be reading
    int row = cluster, k = 0, p = 0;
#if STAGES == 2 || LOAD_BEHIND
    if (row < n_rows) load_row(row, 0);
#endif
    for (; row < n_rows; row += n_clusters, k = (k + 1) % STAGES, p ^= 1) {
        [[maybe_unused]] const int next = row + n_clusters;
#if PREFETCH
        // the row after the one loading now: with two stages or LOAD_BEHIND that is two rows ahead
        const int ahead = next + (STAGES == 2 || LOAD_BEHIND ? n_clusters : 0);
        if (threadIdx.x == 0 && ahead < n_rows && n_vec > 0) {
            prefetch_l2(student_at(ahead), seg_bytes);
            prefetch_l2(teacher_at(ahead), seg_bytes);
        }
#endif
#if STAGES == 2
        if (next < n_rows) {
            load_row(next, k ^ 1);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
#elif LOAD_BEHIND
        cp_async_wait<0>();  // the copy the previous row's dz pass started
#else
        load_row(row, 0);
        cp_async_wait<0>();
#endif
#if !OWN_COPIES
        __syncthreads();  // this row's segment is in shared memory for every thread
#endif
        const uint4* vs = (const uint4*)(HOLD_STUDENT ? stage(k, 0) : student_at(row));
        const uint4* vt = (const uint4*)stage(k, 1);

        // --- this segment's statistics: maxima, then sums of exp2 relative to them -----------
#if ONLINE
        // running maxima and sums relative to them, rescaled when a vector raises the maximum
        float mx[2] = {NEG_INF, NEG_INF}, run[3] = {0.0f, 0.0f, 0.0f};
        Vectors stats_vecs(vs, vt, n_vec);
#pragma unroll kUnroll
        for (int i = threadIdx.x; i < n_vec; i += THREADS) {
            float s[8], t[8];
            stats_vecs.pair(i, s, t);
            float gs = s[0], gt = t[0];
#pragma unroll
            for (int j = 1; j < 8; ++j) {
                gs = fmaxf(gs, s[j]);
                gt = fmaxf(gt, t[j]);
            }
            const float ns = fmaxf(mx[0], gs), nt = fmaxf(mx[1], gt);
            const float rs = rescale(mx[0], ns, base_c), rt = rescale(mx[1], nt, base_c);
            run[0] *= rs;
            run[1] *= rt;
            if (KIND == 1) run[2] *= rs;
            add_exp_sums(s, t, exp_base(ns), exp_base(nt), scale2, base_c, run);
            mx[0] = ns;
            mx[1] = nt;
        }
        const float own_s = mx[0], own_t = mx[1];
        block_reduce<2, true>(mx, scratch_next());
        const float ws = rescale(own_s, mx[0], base_c), wt = rescale(own_t, mx[1], base_c);
        float sums[3] = {run[0] * ws, run[1] * wt, run[2] * ws};
        block_reduce<3, false>(sums, scratch_next());
#else
        float mx[2] = {NEG_INF, NEG_INF};
        Vectors max_vecs(vs, vt, n_vec);
#if FAST_STATS
        unsigned pm[2] = {0xff80ff80u, 0xff80ff80u};  // bf16 pairs of -inf
#pragma unroll kUnroll
        for (int i = threadIdx.x; i < n_vec; i += THREADS) {
            uint4 a, b;
            max_vecs.raw(i, a, b);
            pm[0] = max_bf16x2(max_bf16x2(pm[0], a.x), max_bf16x2(a.y, max_bf16x2(a.z, a.w)));
            pm[1] = max_bf16x2(max_bf16x2(pm[1], b.x), max_bf16x2(b.y, max_bf16x2(b.z, b.w)));
        }
        mx[0] = max_of_pair(pm[0]);
        mx[1] = max_of_pair(pm[1]);
#else
#pragma unroll kUnroll
        for (int i = threadIdx.x; i < n_vec; i += THREADS) {
            float s[8], t[8];
            max_vecs.pair(i, s, t);
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                mx[0] = fmaxf(mx[0], s[j]);
                mx[1] = fmaxf(mx[1], t[j]);
            }
        }
#endif
        block_reduce<2, true>(mx, scratch_next());
        const float ms_loc = exp_base(mx[0]), mt_loc = exp_base(mx[1]);
        float sums[3] = {0.0f, 0.0f, 0.0f};
        Vectors sum_vecs(vs, vt, n_vec);
#pragma unroll kUnroll
        for (int i = threadIdx.x; i < n_vec; i += THREADS) {
            float s[8], t[8];
            sum_vecs.pair(i, s, t);
            add_exp_sums(s, t, ms_loc, mt_loc, scale2, base_c, sums);
        }
        block_reduce<3, false>(sums, scratch_next());
#endif
        if (threadIdx.x == 0) {
            parts[0][p] = Partials{mx[0], mx[1], sums[0], sums[1], sums[2], 0.0f};
        }
        cluster_sync(threadIdx.x == 0);

        // --- the row's statistics from the cluster's partials ------------------------------
        float m_s = NEG_INF, m_t = NEG_INF;
        float pm_s[CLUSTER], pm_t[CLUSTER];
#pragma unroll
        for (int r = 0; r < CLUSTER; ++r) {
            pm_s[r] = peer_load(&parts[0][p].m_s, r);
            pm_t[r] = peer_load(&parts[0][p].m_t, r);
            m_s = fmaxf(m_s, pm_s[r]);
            m_t = fmaxf(m_t, pm_t[r]);
        }
        float l_s = 0.0f, l_t = 0.0f, a = 0.0f;
#pragma unroll
        for (int r = 0; r < CLUSTER; ++r) {
            const float ws = rescale(pm_s[r], m_s, base_c), wt = rescale(pm_t[r], m_t, base_c);
            l_s += ws * peer_load(&parts[0][p].l_s, r);
            l_t += wt * peer_load(&parts[0][p].l_t, r);
            if (KIND == 1) a += ws * peer_load(&parts[0][p].a, r);
        }
        // log2 of the sums relative to the bases m base_c; lg: relative to m c
        const float lgb_s = log2f(l_s), lgb_t = log2f(l_t);
        [[maybe_unused]] const float c_lo = scale2 - c_hi;  // exact
        const float lg_s = FAST_STATS ? lgb_s - m_s * c_lo : lgb_s;
        const float lg_t = FAST_STATS ? lgb_t - m_t * c_lo : lgb_t;
        // FMA_LOGP: log2 p + rho = z c - K with K exact, rho = m c_hi + lgb - K exact to fp32
        [[maybe_unused]] float ks = 0.0f, kt = 0.0f, rho_s = 0.0f, rho_t = 0.0f;
#if FMA_LOGP
        {
            auto grid = [](float x) { return rintf(x * 256.0f) * (1.0f / 256.0f); };
            const float bs = m_s * c_hi, bt = m_t * c_hi;  // exact
            ks = grid(bs + lgb_s);
            kt = grid(bt + lgb_t);
            rho_s = (bs - ks) + lgb_s;  // bs - ks is exact, and so nearly is the small sum
            rho_t = (bt - kt) + lgb_t;
        }
#endif
        // the row's constants with the factors 2^-rho taken out (FMA_LOGP; else as they are)
        [[maybe_unused]] const float unrho_s = FMA_LOGP ? exp2f(-rho_s) : 1.0f;
        [[maybe_unused]] const float unrho_t = FMA_LOGP ? exp2f(-rho_t) : 1.0f;
        const float beta_t = FMA_LOGP ? beta * exp2f(rho_s - rho_t) : beta;  // JSD's weight of p_T 2^rho_s

        // log2 p = (z - m) c - log2 l: z - m is exact for bf16 logits, which keeps JSD's gradient
        // (a difference of nearly equal log-probabilities) accurate. FMA_LOGP: log2 p + rho, one fma
        auto log2p_s = [&](float z) { return FMA_LOGP ? fmaf(z, scale2, -ks) : (z - m_s) * scale2 - lg_s; };
        auto log2p_t = [&](float z) { return FMA_LOGP ? fmaf(z, scale2, -kt) : (z - m_t) * scale2 - lg_t; };
        const long long loss_at = (long long)rank * loss_stride + row;

        // the row-wide term of dz: reverse KL's divergence, or JSD's KL(p_S || M), which needs a
        // pass of its own and a second meeting before any dz
        float row_term = 0.0f;
        if (KIND == 1) {
            row_term = (a / l_s - ((m_s - m_t) * scale2 + lg_s - lg_t)) * LN2;  // E_pS[s - t] c ln2 - lse diff
            if (FMA_LOGP) row_term += (rho_s - rho_t) * LN2;  // dz's ls - lt carries rho_s - rho_t
        } else if (KIND == 2) {
            float kl[2] = {0.0f, 0.0f};
            // FMA_LOGP: log-probabilities + rho, so ps = p_S 2^rho_s, pt = p_T 2^rho_t, mix = M 2^rho_s
            // (through beta_t), ls - lm = log2 p_S - log2 M exactly and lt - lm = log2 p_T - log2 M +
            // rho_t - rho_s
            Vectors kl_vecs(vs, vt, n_vec);
#pragma unroll kUnroll
            for (int i = threadIdx.x; i < n_vec; i += THREADS) {
                float s[8], t[8], r[8], q[8];
                kl_vecs.pair(i, s, t);
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    const float ls = log2p_s(s[j]), lt = log2p_t(t[j]);
                    const float ps = ex2(ls), pt = ex2(lt);
                    const float mix = beta_t * pt + (1.0f - beta) * ps;
                    q[j] = ps * P_SCALE;
                    r[j] = 0.0f;  // both underflowed: contributes nothing (no 0 * -inf), and dz is 0
                    if (mix > 0.0f) {
                        const float lm = lg2(mix);
                        r[j] = ls - lm;
                        kl[0] += ps * r[j];
                        kl[1] += pt * (lt - lm);
                    }
                }
                if (STORE_R) store8<true>((void*)vt, i, r);  // this thread's own vector: only it reads it again
                if (KEEP_P) store8<true>((void*)vs, i, q);
            }
            block_reduce<2, false>(kl, scratch_next());
            if (FMA_LOGP) {
                // the factors out; sum p_T (rho_s - rho_t) over the row is rho_s - rho_t (to the
                // statistics' ~1e-6 times |rho_s - rho_t| <= 2^-8): the first block adds it
                kl[0] *= unrho_s;
                kl[1] = kl[1] * unrho_t + (rank == 0 ? rho_s - rho_t : 0.0f);
            }
            if (threadIdx.x == 0) {
                parts[1][p].kl_s = kl[0];
                loss_out[loss_at] = (beta * kl[1] + (1.0f - beta) * kl[0]) * LN2;
            }
            cluster_sync(threadIdx.x == 0);
#pragma unroll
            for (int r = 0; r < CLUSTER; ++r) row_term += peer_load(&parts[1][p].kl_s, r);
            row_term *= LN2;
        }

        // dz over the student row (and the KL kinds' loss terms)
        bf16* out = student_at(row);
        const float g = KIND == 2 ? (1.0f - beta) * grad_scale : grad_scale;
        // dz's scale for ps and pt as computed (FMA_LOGP: p 2^rho)
        const float g_s = FMA_LOGP ? g * unrho_s : g;
        [[maybe_unused]] const float g_t = FMA_LOGP ? g * unrho_t : g;
        // KEEP_P: dz = q (r ln2 - row term) g_kept = q (r a + b)
        [[maybe_unused]] const float g_kept = g_s / P_SCALE;
        [[maybe_unused]] const float a_kept = LN2 * g_kept, b_kept = -row_term * g_kept;
        float term = 0.0f;
        const bool refill = LOAD_BEHIND && next < n_rows;
        const bf16 *next_s = student_at(next), *next_t = teacher_at(next);
        if (refill) prefetch_student(next_s);
        Vectors dz_vecs(vs, vt, n_vec);
#pragma unroll kUnroll
        for (int i = threadIdx.x; i < n_vec; i += THREADS) {
            float s[8], t[8];
            if (KEEP_P) {
                dz_vecs.pair<true, true>(i, s, t);  // s holds p_S 2^15 here, t log2 p_S - log2 M
            } else if (KIND == 2 && STORE_R) {
                dz_vecs.pair<false, true>(i, s, t);  // t holds log2 p_S - log2 M here
            } else {
                dz_vecs.pair(i, s, t);
            }
            float dz[8];
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                if (KEEP_P) {
                    dz[j] = FMA_LOGP ? s[j] * fmaf(t[j], a_kept, b_kept) : s[j] * (t[j] * LN2 - row_term) * g_kept;
                    continue;
                }
                const float ls = log2p_s(s[j]), lt = log2p_t(t[j]);
                const float ps = ex2(ls);
                if (KIND == 0) {
                    const float pt = ex2(lt);
                    dz[j] = FMA_LOGP ? fmaf(ps, g_s, -pt * g_t) : (ps - pt) * g;
                    term += pt * (lt - ls);
                } else if (KIND == 1) {
                    dz[j] = ps * ((ls - lt) * LN2 - row_term) * g_s;
                    term += ps * (ls - lt);
                } else if (STORE_R) {
                    dz[j] = ps * (t[j] * LN2 - row_term) * g_s;
                } else {
                    const float mix = beta_t * ex2(lt) + (1.0f - beta) * ps;
                    dz[j] = mix > 0.0f ? ps * ((ls - lg2(mix)) * LN2 - row_term) * g_s : 0.0f;
                }
            }
            store8(out, i, dz);
            // vector i's values are in registers and used (dz is stored): its slot may be refilled
            if (refill) copy_vec(next_s, next_t, 0, i);
        }
        if (refill) cp_async_commit();
        if (KIND < 2) {
            float v[1] = {term};
            block_reduce<1, false>(v, scratch_next());
            if (FMA_LOGP) {
                // the factor out, and the rho terms of lt - ls summed over the row with weights
                // summing to 1 (as for JSD's KL pass): forward KL's + (rho_s - rho_t), reverse's -
                const float corr = rank == 0 ? rho_s - rho_t : 0.0f;
                v[0] = KIND == 0 ? v[0] * unrho_t + corr : v[0] * unrho_s - corr;
            }
            if (threadIdx.x == 0) loss_out[loss_at] = v[0] * LN2;
        }
#if !OWN_COPIES
        __syncthreads();  // every thread is done with stage k before a later row's load reuses it
#endif
    }
    // peers may still read this block's partials: stay until the whole cluster is done
    cluster_sync(false);
}
