// BLAKE3 block chaining values and a gather copy, on the GPU where the live weights are.
//
// Compiled to PTX by scripts/build_ptx.py (NVRTC; no CUDA toolkit needed at build time) into
// src/live/blake3.ptx, which the crate embeds and the driver JIT-compiles at run time. The same
// source compiles as plain C++ (without __CUDACC__): tests/integration/gpu_kernel.rs builds it
// with the host compiler and checks every block hash against the blake3 crate, so the hashing
// logic is tested in CI, on machines without a GPU.
//
// A block's hash is the BLAKE3 chaining value of the subtree covering the block's bytes when the
// whole tensor is one BLAKE3 input (non-root finalization): its chunks (1 KiB, counter = the
// chunk's index in the tensor) hashed and merged as parent nodes bottom-up, an odd node carried
// to the next level (that is BLAKE3's "largest power of two on the left" tree). See
// src/blockhash.rs.

#if defined(__CUDACC__)
#define DEV __device__ __forceinline__
#define GLOBAL extern "C" __global__
#else
#define DEV static inline
#define GLOBAL static
#endif

typedef unsigned int u32;
typedef unsigned long long u64;
typedef unsigned char u8;

// One contiguous run of a tensor's bytes to hash block by block.
struct Job {
    u64 ptr;        // device address of the run's first byte
    u64 len;        // bytes in the run
    u64 offset;     // offset of the run's first byte in its tensor (a multiple of block_size)
    u64 first;      // index of the run's first block in the output
    u64 block_size; // a power of two, at least 1024
};

// One run of bytes copied into the staging buffer.
struct Run {
    u64 src; // device address
    u64 len;
    u64 dst; // offset in the staging buffer
};

#define CHUNK_LEN 1024
#define BLOCK_LEN 64
#define CHUNK_START 1u
#define CHUNK_END 2u
#define PARENT 4u

#if defined(__CUDACC__)
__constant__ u32 IV[8] = {0x6A09E667u, 0xBB67AE85u, 0x3C6EF372u, 0xA54FF53Au,
                          0x510E527Fu, 0x9B05688Cu, 0x1F83D9ABu, 0x5BE0CD19u};
#else
static const u32 IV[8] = {0x6A09E667u, 0xBB67AE85u, 0x3C6EF372u, 0xA54FF53Au,
                          0x510E527Fu, 0x9B05688Cu, 0x1F83D9ABu, 0x5BE0CD19u};
#endif

DEV u32 rotr(u32 x, u32 n) { return (x >> n) | (x << (32 - n)); }

#define G(a, b, c, d, x, y)                                                                      \
    do {                                                                                         \
        s[a] = s[a] + s[b] + (x);                                                                \
        s[d] = rotr(s[d] ^ s[a], 16);                                                            \
        s[c] = s[c] + s[d];                                                                      \
        s[b] = rotr(s[b] ^ s[c], 12);                                                            \
        s[a] = s[a] + s[b] + (y);                                                                \
        s[d] = rotr(s[d] ^ s[a], 8);                                                             \
        s[c] = s[c] + s[d];                                                                      \
        s[b] = rotr(s[b] ^ s[c], 7);                                                             \
    } while (0)

// One round with the message words in the order of the round's schedule.
#define ROUND(m0, m1, m2, m3, m4, m5, m6, m7, m8, m9, m10, m11, m12, m13, m14, m15)              \
    do {                                                                                         \
        G(0, 4, 8, 12, m[m0], m[m1]);                                                            \
        G(1, 5, 9, 13, m[m2], m[m3]);                                                            \
        G(2, 6, 10, 14, m[m4], m[m5]);                                                           \
        G(3, 7, 11, 15, m[m6], m[m7]);                                                           \
        G(0, 5, 10, 15, m[m8], m[m9]);                                                           \
        G(1, 6, 11, 12, m[m10], m[m11]);                                                         \
        G(2, 7, 8, 13, m[m12], m[m13]);                                                          \
        G(3, 4, 9, 14, m[m14], m[m15]);                                                          \
    } while (0)

// The compression function, truncated to the 8 chaining-value words: cv <- compress(cv, m).
DEV void compress(u32 cv[8], const u32 m[16], u64 counter, u32 block_len, u32 flags) {
    u32 s[16] = {cv[0], cv[1], cv[2], cv[3], cv[4], cv[5], cv[6], cv[7],
                 IV[0], IV[1], IV[2], IV[3], (u32)counter, (u32)(counter >> 32), block_len, flags};
    ROUND(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    ROUND(2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8);
    ROUND(3, 4, 10, 12, 13, 2, 7, 14, 6, 5, 9, 0, 11, 15, 8, 1);
    ROUND(10, 7, 12, 9, 14, 3, 13, 15, 4, 0, 11, 2, 5, 8, 1, 6);
    ROUND(12, 13, 9, 11, 15, 10, 14, 8, 7, 2, 5, 3, 0, 1, 6, 4);
    ROUND(9, 14, 11, 5, 8, 12, 15, 1, 13, 3, 0, 10, 2, 6, 4, 7);
    ROUND(11, 15, 5, 0, 1, 9, 8, 6, 14, 10, 2, 12, 3, 4, 7, 13);
    for (int i = 0; i < 8; i++) cv[i] = s[i] ^ s[i + 8];
}

// Loads `n` (<= 64) bytes at `p` as 16 little-endian message words, zero-padded.
DEV void load_block(const u8* p, u32 n, u32 m[16]) {
#if defined(__CUDACC__)
    // Four 16-byte loads instead of sixteen 4-byte ones (a quarter of the load instructions).
    if (n == BLOCK_LEN && (((u64)p) & 15) == 0) {
        const uint4* w = (const uint4*)p;
        for (int i = 0; i < 4; i++) {
            const uint4 v = w[i];
            m[4 * i] = v.x;
            m[4 * i + 1] = v.y;
            m[4 * i + 2] = v.z;
            m[4 * i + 3] = v.w;
        }
        return;
    }
#endif
    if (n == BLOCK_LEN && (((u64)p) & 3) == 0) {
        const u32* w = (const u32*)p;
        for (int i = 0; i < 16; i++) m[i] = w[i];
        return;
    }
    for (int i = 0; i < 16; i++) {
        u32 v = 0;
        for (u32 k = 0; k < 4; k++) {
            u32 at = (u32)i * 4 + k;
            if (at < n) v |= ((u32)p[at]) << (8 * k);
        }
        m[i] = v;
    }
}

// The chaining value of one chunk of `len` (1..=1024) bytes with chunk counter `counter`.
DEV void chunk_cv(const u8* p, u32 len, u64 counter, u32 cv[8]) {
    for (int i = 0; i < 8; i++) cv[i] = IV[i];
    u32 blocks = (len + BLOCK_LEN - 1) / BLOCK_LEN;
    u32 m[16];
    for (u32 b = 0; b < blocks; b++) {
        u32 n = len - b * BLOCK_LEN;
        if (n > BLOCK_LEN) n = BLOCK_LEN;
        load_block(p + (u64)b * BLOCK_LEN, n, m);
        u32 flags = (b == 0 ? CHUNK_START : 0u) | (b + 1 == blocks ? CHUNK_END : 0u);
        compress(cv, m, counter, n, flags);
    }
}

// left <- parent(left, right).
DEV void parent_cv(u32 left[8], const u32 right[8]) {
    u32 m[16];
    for (int i = 0; i < 8; i++) {
        m[i] = left[i];
        m[i + 8] = right[i];
    }
    for (int i = 0; i < 8; i++) left[i] = IV[i];
    compress(left, m, 0, BLOCK_LEN, PARENT);
}

// Most chunks on a merge stack: 16 MiB blocks have 2^14 chunks.
#define MAX_DEPTH 16

// The chaining value of the subtree of `len` (>= 1) bytes at `p` whose first chunk has counter
// `counter` (the subtree is aligned: its size rounded up to a power of two divides its offset).
DEV void subtree_cv(const u8* p, u64 len, u64 counter, u32 out[8]) {
    u32 stack[MAX_DEPTH][8];
    u32 depth = 0;
    u64 chunks = (len + CHUNK_LEN - 1) / CHUNK_LEN;
    for (u64 c = 0; c < chunks; c++) {
        u64 n = len - c * CHUNK_LEN;
        if (n > CHUNK_LEN) n = CHUNK_LEN;
        u32 cv[8];
        chunk_cv(p + c * CHUNK_LEN, (u32)n, counter + c, cv);
        // Merge every completed pair: as many times as `c + 1` has trailing zero bits.
        for (u64 total = c + 1; (total & 1) == 0 && depth > 0; total >>= 1) {
            depth--;
            u32 right[8];
            for (int i = 0; i < 8; i++) right[i] = cv[i];
            for (int i = 0; i < 8; i++) cv[i] = stack[depth][i];
            parent_cv(cv, right);
        }
        for (int i = 0; i < 8; i++) stack[depth][i] = cv[i];
        depth++;
    }
    if (depth == 0) {  // no bytes: no subtree (never asked for)
        for (int i = 0; i < 8; i++) out[i] = 0;
        return;
    }
    // An unpaired right edge merges with everything on its left.
    for (int i = 0; i < 8; i++) out[i] = stack[depth - 1][i];
    while (depth > 1) {
        depth--;
        u32 left[8];
        for (int i = 0; i < 8; i++) left[i] = stack[depth - 1][i];
        parent_cv(left, out);
        for (int i = 0; i < 8; i++) out[i] = left[i];
    }
}

// The block hash of output slot `t`: its job found by binary search over `first`.
DEV void block_cv_of(const Job* jobs, u32 njobs, u64 t, u32* out) {
    u32 lo = 0, hi = njobs;
    while (hi - lo > 1) {
        u32 mid = (lo + hi) / 2;
        if (jobs[mid].first <= t) lo = mid; else hi = mid;
    }
    const Job j = jobs[lo];
    u64 k = t - j.first;
    u64 start = k * j.block_size;
    u64 len = j.len - start;
    if (len > j.block_size) len = j.block_size;
    subtree_cv((const u8*)(j.ptr + start), len, (j.offset + start) / CHUNK_LEN, out + t * 8);
}

// out[8·t..8·t+8] <- the hash of block t, for t < total: every block of every job.
GLOBAL void apollo_block_cvs(const Job* jobs, u32 njobs, u64 total, u32* out) {
#if defined(__CUDACC__)
    u64 t = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (t < total) block_cv_of(jobs, njobs, t, out);
#else
    for (u64 t = 0; t < total; t++) block_cv_of(jobs, njobs, t, out);
#endif
}

// Copies run `r` into `dst`, with `nthreads` threads of which this is `tid`.
DEV void copy_run(const Run r, u8* dst, u32 tid, u32 nthreads) {
    const u8* s = (const u8*)r.src;
    u8* d = dst + r.dst;
    if (((r.src | r.dst | r.len) & 15) == 0) {
        const unsigned long long n = r.len / 16;
        for (u64 i = tid; i < n; i += nthreads) {
            const u64* a = (const u64*)(s + i * 16);
            u64* b = (u64*)(d + i * 16);
            b[0] = a[0];
            b[1] = a[1];
        }
    } else {
        for (u64 i = tid; i < r.len; i += nthreads) d[i] = s[i];
    }
}

// Copies every run into the staging buffer `dst`: one thread block per run (grid-strided).
GLOBAL void apollo_gather(const Run* runs, u32 nruns, u8* dst) {
#if defined(__CUDACC__)
    for (u32 r = blockIdx.x; r < nruns; r += gridDim.x) copy_run(runs[r], dst, threadIdx.x, blockDim.x);
#else
    for (u32 r = 0; r < nruns; r++) copy_run(runs[r], dst, 0, 1);
#endif
}
