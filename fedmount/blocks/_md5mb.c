/* Multi-buffer MD5: many independent streams hashed at once, one stream per SIMD lane.
 *
 * The algorithm and the Python-facing contract are described in fedmount/blocks/md5.py.
 * This file holds the three parts that must be native:
 *
 * - kernels: compress `n` consecutive 64-byte blocks in every lane at once. Lane `l` reads
 *   its blocks from ptr[l] and keeps its state in st[0..3][l] (structure of arrays, so a
 *   vector load gives one MD5 word of every lane). Each message block is loaded row by row
 *   (one lane's 64 bytes) and transposed in registers so that vector M[w] holds word w of
 *   every lane. avx512: 16 lanes of zmm, with vpternlogd for the round functions and vprold
 *   for the rotates; avx2: 8 lanes of ymm; scalar: one lane, portable C, for machines with
 *   neither (and as the reference the differential tests compare against hashlib).
 *   The vector kernels are compiled with per-function target attributes, so one binary runs
 *   on every x86-64; which ones the CPU can run is asked at run time (__builtin_cpu_supports,
 *   which also checks that the OS saves the wide registers).
 * - the job manager (`run_jobs`): a job is one State plus the buffers to absorb into it, in
 *   order. Jobs are sorted longest first and handed to lanes; the kernel runs for as many
 *   blocks as the shortest active lane still has, then every lane whose job has no whole
 *   block left is refilled with the next job, so a long job never leaves the other lanes
 *   idle while jobs are waiting. Empty lanes read an active lane's bytes (valid memory,
 *   results thrown away). Partial blocks at buffer boundaries go to the State's 64-byte
 *   carry and are completed from the next buffer, compressed by the scalar code in place
 *   in the lane's state. With the kernel "auto", each time the set of busy lanes changes
 *   the kernel with the highest (lanes it can fill) x (per-lane speed timed at import) is
 *   used; switching to a narrower one moves the busy lanes down and puts the others back
 *   at the head of the queue.
 * - `State`: one stream's MD5 state, carry and length; `digest()` pads a copy, so a State
 *   can keep absorbing after a digest, like hashlib.
 *
 * `update_many` takes the buffers (Py_buffer, read-only, C-contiguous) with the GIL held,
 * marks the States busy (a State can be in one running call only), releases the GIL for
 * all the hashing, then releases the buffers.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MD5MB_X86 1
#include <immintrin.h>
#else
#define MD5MB_X86 0
#endif

#define MAX_LANES 16
#define BLOCK 64

typedef void (*kernel_fn)(uint32_t st[4][MAX_LANES], const uint8_t *const ptr[MAX_LANES], size_t nblocks);

/* --- the 64 steps, written once ------------------------------------------------------ */
/* STEP(fn, a, b, c, d, word, shift, constant) is defined by each kernel:
 *     a = b + rotl(a + fn(b, c, d) + M[word] + constant, shift)                          */
#define MD5_STEPS(STEP)                                                                     \
    STEP(F, a, b, c, d, 0, 7, 0xd76aa478) STEP(F, d, a, b, c, 1, 12, 0xe8c7b756)            \
    STEP(F, c, d, a, b, 2, 17, 0x242070db) STEP(F, b, c, d, a, 3, 22, 0xc1bdceee)           \
    STEP(F, a, b, c, d, 4, 7, 0xf57c0faf) STEP(F, d, a, b, c, 5, 12, 0x4787c62a)            \
    STEP(F, c, d, a, b, 6, 17, 0xa8304613) STEP(F, b, c, d, a, 7, 22, 0xfd469501)           \
    STEP(F, a, b, c, d, 8, 7, 0x698098d8) STEP(F, d, a, b, c, 9, 12, 0x8b44f7af)            \
    STEP(F, c, d, a, b, 10, 17, 0xffff5bb1) STEP(F, b, c, d, a, 11, 22, 0x895cd7be)         \
    STEP(F, a, b, c, d, 12, 7, 0x6b901122) STEP(F, d, a, b, c, 13, 12, 0xfd987193)          \
    STEP(F, c, d, a, b, 14, 17, 0xa679438e) STEP(F, b, c, d, a, 15, 22, 0x49b40821)         \
    STEP(G, a, b, c, d, 1, 5, 0xf61e2562) STEP(G, d, a, b, c, 6, 9, 0xc040b340)             \
    STEP(G, c, d, a, b, 11, 14, 0x265e5a51) STEP(G, b, c, d, a, 0, 20, 0xe9b6c7aa)          \
    STEP(G, a, b, c, d, 5, 5, 0xd62f105d) STEP(G, d, a, b, c, 10, 9, 0x02441453)            \
    STEP(G, c, d, a, b, 15, 14, 0xd8a1e681) STEP(G, b, c, d, a, 4, 20, 0xe7d3fbc8)          \
    STEP(G, a, b, c, d, 9, 5, 0x21e1cde6) STEP(G, d, a, b, c, 14, 9, 0xc33707d6)            \
    STEP(G, c, d, a, b, 3, 14, 0xf4d50d87) STEP(G, b, c, d, a, 8, 20, 0x455a14ed)           \
    STEP(G, a, b, c, d, 13, 5, 0xa9e3e905) STEP(G, d, a, b, c, 2, 9, 0xfcefa3f8)            \
    STEP(G, c, d, a, b, 7, 14, 0x676f02d9) STEP(G, b, c, d, a, 12, 20, 0x8d2a4c8a)          \
    STEP(H, a, b, c, d, 5, 4, 0xfffa3942) STEP(H, d, a, b, c, 8, 11, 0x8771f681)            \
    STEP(H, c, d, a, b, 11, 16, 0x6d9d6122) STEP(H, b, c, d, a, 14, 23, 0xfde5380c)         \
    STEP(H, a, b, c, d, 1, 4, 0xa4beea44) STEP(H, d, a, b, c, 4, 11, 0x4bdecfa9)            \
    STEP(H, c, d, a, b, 7, 16, 0xf6bb4b60) STEP(H, b, c, d, a, 10, 23, 0xbebfbc70)          \
    STEP(H, a, b, c, d, 13, 4, 0x289b7ec6) STEP(H, d, a, b, c, 0, 11, 0xeaa127fa)           \
    STEP(H, c, d, a, b, 3, 16, 0xd4ef3085) STEP(H, b, c, d, a, 6, 23, 0x04881d05)           \
    STEP(H, a, b, c, d, 9, 4, 0xd9d4d039) STEP(H, d, a, b, c, 12, 11, 0xe6db99e5)           \
    STEP(H, c, d, a, b, 15, 16, 0x1fa27cf8) STEP(H, b, c, d, a, 2, 23, 0xc4ac5665)          \
    STEP(I, a, b, c, d, 0, 6, 0xf4292244) STEP(I, d, a, b, c, 7, 10, 0x432aff97)            \
    STEP(I, c, d, a, b, 14, 15, 0xab9423a7) STEP(I, b, c, d, a, 5, 21, 0xfc93a039)          \
    STEP(I, a, b, c, d, 12, 6, 0x655b59c3) STEP(I, d, a, b, c, 3, 10, 0x8f0ccc92)           \
    STEP(I, c, d, a, b, 10, 15, 0xffeff47d) STEP(I, b, c, d, a, 1, 21, 0x85845dd1)          \
    STEP(I, a, b, c, d, 8, 6, 0x6fa87e4f) STEP(I, d, a, b, c, 15, 10, 0xfe2ce6e0)           \
    STEP(I, c, d, a, b, 6, 15, 0xa3014314) STEP(I, b, c, d, a, 13, 21, 0x4e0811a1)          \
    STEP(I, a, b, c, d, 4, 6, 0xf7537e82) STEP(I, d, a, b, c, 11, 10, 0xbd3af235)           \
    STEP(I, c, d, a, b, 2, 15, 0x2ad7d2bb) STEP(I, b, c, d, a, 9, 21, 0xeb86d391)

/* --- scalar: one lane ---------------------------------------------------------------- */

#define S_F(b, c, d) ((d) ^ ((b) & ((c) ^ (d))))
#define S_G(b, c, d) ((c) ^ ((d) & ((b) ^ (c))))
#define S_H(b, c, d) ((b) ^ (c) ^ (d))
#define S_I(b, c, d) ((c) ^ ((b) | ~(d)))
#define S_ROTL(x, s) (((x) << (s)) | ((x) >> (32 - (s))))
#define S_STEP(fn, a, b, c, d, w, s, k) a = b + S_ROTL(a + S_##fn(b, c, d) + M[w] + (uint32_t)(k), s);

static inline uint32_t load_le32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static void compress_scalar(uint32_t h[4], const uint8_t *p, size_t nblocks)
{
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3];
    for (; nblocks; nblocks--, p += BLOCK) {
        uint32_t M[16];
        for (int w = 0; w < 16; w++)
            M[w] = load_le32(p + 4 * w);
        uint32_t aa = a, bb = b, cc = c, dd = d;
        MD5_STEPS(S_STEP)
        a += aa;
        b += bb;
        c += cc;
        d += dd;
    }
    h[0] = a;
    h[1] = b;
    h[2] = c;
    h[3] = d;
}

static void kernel_scalar(uint32_t st[4][MAX_LANES], const uint8_t *const ptr[MAX_LANES], size_t nblocks)
{
    uint32_t h[4] = {st[0][0], st[1][0], st[2][0], st[3][0]};
    compress_scalar(h, ptr[0], nblocks);
    for (int i = 0; i < 4; i++)
        st[i][0] = h[i];
}

#if MD5MB_X86

/* --- avx2: 8 lanes of ymm -------------------------------------------------------------- */

#define TARGET_AVX2 __attribute__((target("avx2")))

#define V8_ADD(x, y) _mm256_add_epi32(x, y)
#define V8_F(b, c, d) _mm256_xor_si256(d, _mm256_and_si256(b, _mm256_xor_si256(c, d)))
#define V8_G(b, c, d) _mm256_xor_si256(c, _mm256_and_si256(d, _mm256_xor_si256(b, c)))
#define V8_H(b, c, d) _mm256_xor_si256(_mm256_xor_si256(b, c), d)
#define V8_I(b, c, d) _mm256_xor_si256(c, _mm256_or_si256(b, _mm256_xor_si256(d, ones)))
#define V8_ROTL(x, s) _mm256_or_si256(_mm256_slli_epi32(x, s), _mm256_srli_epi32(x, 32 - (s)))
#define V8_STEP(fn, a, b, c, d, w, s, k)                                                     \
    {                                                                                       \
        __m256i t = V8_ADD(V8_ADD(a, M[w]), _mm256_set1_epi32((int)(k)));                   \
        t = V8_ADD(t, V8_##fn(b, c, d));                                                    \
        a = V8_ADD(b, V8_ROTL(t, s));                                                       \
    }

/* M[w] = word w of the 64-byte block at ptr[l] + off, for lanes l = 0..7 (two 8x8 transposes). */
TARGET_AVX2 static inline void load_x8(__m256i M[16], const uint8_t *const ptr[MAX_LANES], size_t off)
{
    for (int half = 0; half < 2; half++) {
        __m256i r[8], t[8], u[8];
        for (int l = 0; l < 8; l++)
            r[l] = _mm256_loadu_si256((const __m256i *)(ptr[l] + off + 32 * half));
        for (int p = 0; p < 4; p++) {
            t[2 * p] = _mm256_unpacklo_epi32(r[2 * p], r[2 * p + 1]);
            t[2 * p + 1] = _mm256_unpackhi_epi32(r[2 * p], r[2 * p + 1]);
        }
        for (int q = 0; q < 2; q++) {
            u[4 * q + 0] = _mm256_unpacklo_epi64(t[4 * q], t[4 * q + 2]);
            u[4 * q + 1] = _mm256_unpackhi_epi64(t[4 * q], t[4 * q + 2]);
            u[4 * q + 2] = _mm256_unpacklo_epi64(t[4 * q + 1], t[4 * q + 3]);
            u[4 * q + 3] = _mm256_unpackhi_epi64(t[4 * q + 1], t[4 * q + 3]);
        }
        for (int m = 0; m < 4; m++) {
            M[8 * half + m] = _mm256_permute2x128_si256(u[m], u[4 + m], 0x20);
            M[8 * half + 4 + m] = _mm256_permute2x128_si256(u[m], u[4 + m], 0x31);
        }
    }
}

TARGET_AVX2 static void kernel_avx2(uint32_t st[4][MAX_LANES], const uint8_t *const ptr[MAX_LANES], size_t nblocks)
{
    const __m256i ones = _mm256_set1_epi32(-1);
    __m256i a = _mm256_loadu_si256((const __m256i *)st[0]);
    __m256i b = _mm256_loadu_si256((const __m256i *)st[1]);
    __m256i c = _mm256_loadu_si256((const __m256i *)st[2]);
    __m256i d = _mm256_loadu_si256((const __m256i *)st[3]);
    for (size_t off = 0; off < nblocks * BLOCK; off += BLOCK) {
        __m256i M[16];
        load_x8(M, ptr, off);
        __m256i aa = a, bb = b, cc = c, dd = d;
        MD5_STEPS(V8_STEP)
        a = V8_ADD(a, aa);
        b = V8_ADD(b, bb);
        c = V8_ADD(c, cc);
        d = V8_ADD(d, dd);
    }
    _mm256_storeu_si256((__m256i *)st[0], a);
    _mm256_storeu_si256((__m256i *)st[1], b);
    _mm256_storeu_si256((__m256i *)st[2], c);
    _mm256_storeu_si256((__m256i *)st[3], d);
}

/* --- avx512: 16 lanes of zmm ------------------------------------------------------------ */

#define TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

/* vpternlogd truth tables, from the operand patterns b=0xF0, c=0xCC, d=0xAA. */
#define TL_F 0xCA /* (b & c) | (~b & d) */
#define TL_G 0xE4 /* (b & d) | (c & ~d) */
#define TL_H 0x96 /* b ^ c ^ d */
#define TL_I 0x39 /* c ^ (b | ~d) */
#define V16_ADD(x, y) _mm512_add_epi32(x, y)
#define V16_STEP(fn, a, b, c, d, w, s, k)                                                    \
    {                                                                                       \
        __m512i t = V16_ADD(V16_ADD(a, M[w]), _mm512_set1_epi32((int)(k)));                 \
        t = V16_ADD(t, _mm512_ternarylogic_epi32(b, c, d, TL_##fn));                        \
        a = V16_ADD(b, _mm512_rol_epi32(t, s));                                             \
    }

/* M[w] = word w of the 64-byte block at ptr[l] + off, for lanes l = 0..15 (16x16 transpose). */
TARGET_AVX512 static inline void load_x16(__m512i M[16], const uint8_t *const ptr[MAX_LANES], size_t off)
{
    __m512i r[16], t[16], u[16], v[16];
    for (int l = 0; l < 16; l++)
        r[l] = _mm512_loadu_si512((const void *)(ptr[l] + off));
    for (int p = 0; p < 8; p++) { /* 32-bit interleave of rows 2p, 2p+1 */
        t[2 * p] = _mm512_unpacklo_epi32(r[2 * p], r[2 * p + 1]);
        t[2 * p + 1] = _mm512_unpackhi_epi32(r[2 * p], r[2 * p + 1]);
    }
    for (int q = 0; q < 4; q++) { /* u[4q+m]: word 4k+m of rows 4q..4q+3 in 128-bit block k */
        u[4 * q + 0] = _mm512_unpacklo_epi64(t[4 * q], t[4 * q + 2]);
        u[4 * q + 1] = _mm512_unpackhi_epi64(t[4 * q], t[4 * q + 2]);
        u[4 * q + 2] = _mm512_unpacklo_epi64(t[4 * q + 1], t[4 * q + 3]);
        u[4 * q + 3] = _mm512_unpackhi_epi64(t[4 * q + 1], t[4 * q + 3]);
    }
    for (int m = 0; m < 4; m++) { /* gather 128-bit blocks: rows 0-7 and 8-15 */
        v[m] = _mm512_shuffle_i32x4(u[m], u[4 + m], 0x88);           /* blocks 0, 2 */
        v[4 + m] = _mm512_shuffle_i32x4(u[m], u[4 + m], 0xDD);       /* blocks 1, 3 */
        v[8 + m] = _mm512_shuffle_i32x4(u[8 + m], u[12 + m], 0x88);
        v[12 + m] = _mm512_shuffle_i32x4(u[8 + m], u[12 + m], 0xDD);
    }
    for (int m = 0; m < 4; m++) {
        M[m] = _mm512_shuffle_i32x4(v[m], v[8 + m], 0x88);
        M[8 + m] = _mm512_shuffle_i32x4(v[m], v[8 + m], 0xDD);
        M[4 + m] = _mm512_shuffle_i32x4(v[4 + m], v[12 + m], 0x88);
        M[12 + m] = _mm512_shuffle_i32x4(v[4 + m], v[12 + m], 0xDD);
    }
}

TARGET_AVX512 static void kernel_avx512(uint32_t st[4][MAX_LANES], const uint8_t *const ptr[MAX_LANES],
                                        size_t nblocks)
{
    __m512i a = _mm512_loadu_si512((const void *)st[0]);
    __m512i b = _mm512_loadu_si512((const void *)st[1]);
    __m512i c = _mm512_loadu_si512((const void *)st[2]);
    __m512i d = _mm512_loadu_si512((const void *)st[3]);
    for (size_t off = 0; off < nblocks * BLOCK; off += BLOCK) {
        __m512i M[16];
        load_x16(M, ptr, off);
        __m512i aa = a, bb = b, cc = c, dd = d;
        MD5_STEPS(V16_STEP)
        a = V16_ADD(a, aa);
        b = V16_ADD(b, bb);
        c = V16_ADD(c, cc);
        d = V16_ADD(d, dd);
    }
    _mm512_storeu_si512((void *)st[0], a);
    _mm512_storeu_si512((void *)st[1], b);
    _mm512_storeu_si512((void *)st[2], c);
    _mm512_storeu_si512((void *)st[3], d);
}

static int has_avx2(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2");
}

static int has_avx512(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl");
}

#endif /* MD5MB_X86 */

static int always(void) { return 1; }

typedef struct {
    const char *name;
    int lanes;
    kernel_fn fn;
    int (*available)(void);
} Kernel;

/* Best first: the default is the first one the CPU can run. */
static const Kernel KERNELS[] = {
#if MD5MB_X86
    {"avx512", 16, kernel_avx512, has_avx512},
    {"avx2", 8, kernel_avx2, has_avx2},
#endif
    {"scalar", 1, kernel_scalar, always},
};
#define NKERNELS ((int)(sizeof(KERNELS) / sizeof(KERNELS[0])))

/* --- State --------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    uint32_t h[4];
    uint8_t carry[BLOCK];
    uint32_t carried; /* bytes in carry, < 64 */
    uint64_t length;  /* bytes absorbed */
    int busy;         /* in a running update_many */
} StateObject;

static int State_init(StateObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, ":State", kwlist))
        return -1;
    if (self->busy) {
        PyErr_SetString(PyExc_ValueError, "this md5 state is being updated by another thread");
        return -1;
    }
    self->h[0] = 0x67452301;
    self->h[1] = 0xefcdab89;
    self->h[2] = 0x98badcfe;
    self->h[3] = 0x10325476;
    self->carried = 0;
    self->length = 0;
    return 0;
}

static PyObject *State_digest(StateObject *self, PyObject *Py_UNUSED(ignored))
{
    if (self->busy) {
        PyErr_SetString(PyExc_ValueError, "this md5 state is being updated by another thread");
        return NULL;
    }
    uint32_t h[4];
    memcpy(h, self->h, sizeof h);
    uint8_t tail[2 * BLOCK] = {0};
    memcpy(tail, self->carry, self->carried);
    tail[self->carried] = 0x80;
    size_t n = self->carried < 56 ? BLOCK : 2 * BLOCK;
    uint64_t bits = self->length * 8;
    for (int i = 0; i < 8; i++)
        tail[n - 8 + i] = (uint8_t)(bits >> (8 * i));
    compress_scalar(h, tail, n / BLOCK);
    uint8_t out[16];
    for (int i = 0; i < 16; i++)
        out[i] = (uint8_t)(h[i / 4] >> (8 * (i % 4)));
    return PyBytes_FromStringAndSize((const char *)out, 16);
}

static PyObject *State_get_length(StateObject *self, void *Py_UNUSED(closure))
{
    return PyLong_FromUnsignedLongLong(self->length);
}

static PyMethodDef State_methods[] = {
    {"digest", (PyCFunction)State_digest, METH_NOARGS, "The md5 of everything absorbed so far (16 bytes)."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef State_getset[] = {
    {"length", (getter)State_get_length, NULL, "Bytes absorbed so far.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject StateType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "fedmount.blocks._md5mb.State",
    .tp_doc = "One md5 stream: state, partial-block carry and length. Fed by update_many().",
    .tp_basicsize = sizeof(StateObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)State_init,
    .tp_methods = State_methods,
    .tp_getset = State_getset,
};

/* --- the job manager ----------------------------------------------------------------- */

typedef struct {
    StateObject *state;
    Py_buffer *views;
    Py_ssize_t nviews;
    Py_ssize_t next_view; /* index of the view after the current one */
    const uint8_t *p;     /* unread bytes of the current view */
    size_t left;
    uint64_t total;       /* bytes in all views, for the longest-first order */
} Job;

static int longest_first(const void *x, const void *y)
{
    const Job *a = x, *b = y;
    return (a->total < b->total) - (a->total > b->total);
}

/* Absorb `job`'s bytes up to its next run of whole blocks; h is the job's running state.
 * Returns the number of whole blocks at job->p (0: the job is finished). */
static size_t advance(Job *job, uint32_t h[4])
{
    StateObject *s = job->state;
    for (;;) {
        if (job->left == 0) {
            if (job->next_view == job->nviews)
                return 0;
            Py_buffer *v = &job->views[job->next_view++];
            job->p = v->buf;
            job->left = (size_t)v->len;
            continue;
        }
        if (s->carried) { /* complete the carried partial block first */
            size_t take = BLOCK - s->carried < job->left ? BLOCK - s->carried : job->left;
            memcpy(s->carry + s->carried, job->p, take);
            s->carried += (uint32_t)take;
            s->length += take;
            job->p += take;
            job->left -= take;
            if (s->carried == BLOCK) {
                compress_scalar(h, s->carry, 1);
                s->carried = 0;
            }
            continue;
        }
        if (job->left >= BLOCK)
            return job->left / BLOCK;
        memcpy(s->carry, job->p, job->left);
        s->carried = (uint32_t)job->left;
        s->length += job->left;
        job->left = 0;
    }
}

typedef struct {
    const Kernel *k;
    uint32_t st[4][MAX_LANES];
    const uint8_t *ptr[MAX_LANES];
    Job *job[MAX_LANES];
    size_t blocks[MAX_LANES]; /* whole blocks left in the lane's current run; 0: the lane is idle */
    Job **queue;              /* jobs not in a lane: queue[head .. njobs) */
    Py_ssize_t head, njobs;
} Lanes;

static void lane_load(Lanes *L, int l, Job *job, const uint32_t h[4], size_t blocks)
{
    for (int i = 0; i < 4; i++)
        L->st[i][l] = h[i];
    L->job[l] = job;
    L->blocks[l] = blocks;
    L->ptr[l] = job->p;
}

static void lane_save(Lanes *L, int l, uint32_t h[4])
{
    for (int i = 0; i < 4; i++)
        h[i] = L->st[i][l];
}

/* An idle lane takes queued jobs until one has whole blocks (or the queue is empty). */
static void lane_take(Lanes *L, int l)
{
    while (L->head < L->njobs) {
        Job *job = L->queue[L->head++];
        uint32_t h[4];
        memcpy(h, job->state->h, sizeof h);
        size_t n = advance(job, h);
        if (n) {
            lane_load(L, l, job, h, n);
            return;
        }
        memcpy(job->state->h, h, sizeof h);
    }
}

/* The lane's run of whole blocks is done: go on with its job's next buffer, or the next job. */
static void lane_next(Lanes *L, int l)
{
    Job *job = L->job[l];
    uint32_t h[4];
    lane_save(L, l, h);
    size_t n = advance(job, h);
    if (n) {
        lane_load(L, l, job, h, n);
        return;
    }
    memcpy(job->state->h, h, sizeof h);
    L->blocks[l] = 0;
    lane_take(L, l);
}

/* The kernel that hashes `live` jobs fastest: lanes it can fill times its per-lane rate. */
static const Kernel *auto_choice(Py_ssize_t live);

/* Switch to a narrower kernel: keep the first active lanes, send the others back to the queue. */
static void narrow(Lanes *L, const Kernel *to)
{
    int kept = 0;
    for (int l = 0; l < L->k->lanes; l++) {
        if (!L->blocks[l])
            continue;
        if (kept < to->lanes) {
            uint32_t h[4];
            lane_save(L, l, h);
            Job *job = L->job[l];
            size_t n = L->blocks[l];
            L->blocks[l] = 0;
            lane_load(L, kept++, job, h, n);
        } else {
            lane_save(L, l, L->job[l]->state->h);
            L->blocks[l] = 0;
            L->queue[--L->head] = L->job[l];
        }
    }
    L->k = to;
}

/* Absorb every job; `forced` is one kernel for the whole call, or NULL for the auto choice. */
static void run_jobs(const Kernel *forced, Job *jobs, Py_ssize_t njobs, Job **queue)
{
    static Lanes zero;
    Lanes L = zero;
    qsort(jobs, (size_t)njobs, sizeof(Job), longest_first);
    for (Py_ssize_t i = 0; i < njobs; i++)
        queue[i] = &jobs[i];
    L.queue = queue;
    L.njobs = njobs;
    L.k = forced ? forced : auto_choice(njobs);
    for (;;) {
        size_t n = 0;
        int active = 0, shortest = -1;
        for (int l = 0; l < L.k->lanes; l++) {
            if (!L.blocks[l])
                lane_take(&L, l);
            if (!L.blocks[l])
                continue;
            active++;
            if (!n || L.blocks[l] < n) {
                n = L.blocks[l];
                shortest = l;
            }
        }
        if (!active)
            return;
        if (!forced) {
            const Kernel *best = auto_choice(active + (L.njobs - L.head));
            if (best->lanes < L.k->lanes) {
                narrow(&L, best);
                continue;
            }
        }
        for (int l = 0; l < L.k->lanes; l++)
            if (!L.blocks[l])
                L.ptr[l] = L.ptr[shortest]; /* an idle lane rereads an active lane's bytes */
        L.k->fn(L.st, L.ptr, n);
        for (int l = 0; l < L.k->lanes; l++) {
            if (!L.blocks[l])
                continue;
            Job *job = L.job[l];
            job->p += n * BLOCK;
            job->left -= n * BLOCK;
            job->state->length += n * BLOCK;
            L.ptr[l] = job->p;
            L.blocks[l] -= n;
            if (!L.blocks[l])
                lane_next(&L, l);
        }
    }
}

/* --- kernel choice -------------------------------------------------------------------- */

/* Per-lane speed of each kernel in blocks per second, measured once at import (see calibrate). */
static double lane_rate[NKERNELS];

static const Kernel *auto_choice(Py_ssize_t live)
{
    const Kernel *best = NULL;
    double best_rate = 0;
    for (int i = 0; i < NKERNELS; i++) {
        if (!KERNELS[i].available())
            continue;
        double rate = (double)(live < KERNELS[i].lanes ? live : KERNELS[i].lanes) * lane_rate[i];
        if (!best || rate > best_rate) {
            best = &KERNELS[i];
            best_rate = rate;
        }
    }
    return best;
}

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* A vector kernel costs the same whether one lane or all are busy, and how that compares to
 * one scalar stream depends on the CPU (on AMD Zen 5 a vector add takes 2 cycles, a scalar
 * one 1, so one zmm lane runs at half the scalar speed; on Intel they are closer). So each
 * kernel is timed here on 256 blocks, best of 5 interleaved rounds: about a millisecond. */
static void calibrate(void)
{
    enum { CAL_BLOCKS = 256 };
    static uint8_t buf[CAL_BLOCKS * BLOCK];
    uint32_t st[4][MAX_LANES] = {{0}};
    const uint8_t *ptr[MAX_LANES];
    double best[NKERNELS];
    for (int l = 0; l < MAX_LANES; l++)
        ptr[l] = buf;
    for (int i = 0; i < NKERNELS; i++)
        best[i] = 1e9;
    for (int round = 0; round < 6; round++)
        for (int i = 0; i < NKERNELS; i++) {
            if (!KERNELS[i].available())
                continue;
            double t0 = now();
            KERNELS[i].fn(st, ptr, CAL_BLOCKS);
            double dt = now() - t0;
            if (round && dt < best[i]) /* round 0 warms up */
                best[i] = dt;
        }
    for (int i = 0; i < NKERNELS; i++)
        lane_rate[i] = best[i] > 0 ? CAL_BLOCKS / best[i] : 1e12;
}

static const Kernel *find_kernel(const char *name)
{
    if (strcmp(name, "auto") == 0)
        return NULL;
    for (int i = 0; i < NKERNELS; i++)
        if (strcmp(KERNELS[i].name, name) == 0) {
            if (!KERNELS[i].available()) {
                PyErr_Format(PyExc_ValueError, "md5 kernel %s is not supported by this CPU", name);
                return NULL;
            }
            return &KERNELS[i];
        }
    PyErr_Format(PyExc_ValueError, "unknown md5 kernel %s", name);
    return NULL;
}

static void release_jobs(Job *jobs, Py_ssize_t njobs)
{
    for (Py_ssize_t i = 0; i < njobs; i++) {
        for (Py_ssize_t v = 0; v < jobs[i].nviews; v++)
            PyBuffer_Release(&jobs[i].views[v]);
        PyMem_Free(jobs[i].views);
        if (jobs[i].state) {
            jobs[i].state->busy = 0;
            Py_DECREF(jobs[i].state);
        }
    }
    PyMem_Free(jobs);
}

/* Fill jobs[i] from the (State, buffers) pair `item`; on error the job holds what it took. */
static int take_job(Job *job, PyObject *item)
{
    PyObject *state, *buffers;
    if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2) {
        PyErr_SetString(PyExc_TypeError, "each job must be a (State, sequence of buffers) pair");
        return -1;
    }
    state = PyTuple_GET_ITEM(item, 0);
    buffers = PyTuple_GET_ITEM(item, 1);
    if (!PyObject_TypeCheck(state, &StateType)) {
        PyErr_SetString(PyExc_TypeError, "a job's first item must be a State");
        return -1;
    }
    if (((StateObject *)state)->busy) {
        PyErr_SetString(PyExc_ValueError, "a State may appear in one job of one running update_many only");
        return -1;
    }
    ((StateObject *)state)->busy = 1;
    Py_INCREF(state);
    job->state = (StateObject *)state;
    PyObject *seq = PySequence_Fast(buffers, "a job's second item must be a sequence of buffers");
    if (!seq)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    job->views = PyMem_Calloc(n ? (size_t)n : 1, sizeof(Py_buffer));
    if (!job->views) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t v = 0; v < n; v++) {
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(seq, v), &job->views[v], PyBUF_C_CONTIGUOUS) < 0) {
            Py_DECREF(seq);
            return -1;
        }
        job->nviews = v + 1;
        job->total += (uint64_t)job->views[v].len;
    }
    Py_DECREF(seq);
    return 0;
}

static PyObject *update_many(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyObject *jobs_arg;
    const char *kernel_name;
    if (!PyArg_ParseTuple(args, "Os:update_many", &jobs_arg, &kernel_name))
        return NULL;
    const Kernel *k = find_kernel(kernel_name);
    if (!k && PyErr_Occurred())
        return NULL;
    PyObject *seq = PySequence_Fast(jobs_arg, "jobs must be a sequence of (State, buffers) pairs");
    if (!seq)
        return NULL;
    Py_ssize_t njobs = PySequence_Fast_GET_SIZE(seq);
    Job *jobs = PyMem_Calloc(njobs ? (size_t)njobs : 1, sizeof(Job));
    Job **queue = PyMem_Calloc(njobs ? (size_t)njobs : 1, sizeof(Job *));
    if (!jobs || !queue) {
        PyMem_Free(jobs);
        PyMem_Free(queue);
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < njobs; i++)
        if (take_job(&jobs[i], PySequence_Fast_GET_ITEM(seq, i)) < 0) {
            Py_DECREF(seq);
            release_jobs(jobs, i + 1);
            PyMem_Free(queue);
            return NULL;
        }
    Py_DECREF(seq);
    Py_BEGIN_ALLOW_THREADS
    run_jobs(k, jobs, njobs, queue);
    Py_END_ALLOW_THREADS
    release_jobs(jobs, njobs);
    PyMem_Free(queue);
    Py_RETURN_NONE;
}

static PyObject *kernels(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored))
{
    PyObject *out = PyList_New(0);
    if (!out)
        return NULL;
    for (int i = 0; i < NKERNELS; i++) {
        if (!KERNELS[i].available())
            continue;
        PyObject *row = Py_BuildValue("(sid)", KERNELS[i].name, KERNELS[i].lanes, lane_rate[i] * BLOCK);
        if (!row || PyList_Append(out, row) < 0) {
            Py_XDECREF(row);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(row);
    }
    PyObject *result = PyList_AsTuple(out);
    Py_DECREF(out);
    return result;
}

static PyObject *auto_kernel(PyObject *Py_UNUSED(module), PyObject *arg)
{
    Py_ssize_t live = PyLong_AsSsize_t(arg);
    if (live == -1 && PyErr_Occurred())
        return NULL;
    return PyUnicode_FromString(auto_choice(live < 1 ? 1 : live)->name);
}

static PyMethodDef module_methods[] = {
    {"update_many", update_many, METH_VARARGS,
     "update_many(jobs, kernel): absorb each job's buffers, in order, into its State, many jobs at "
     "once in the SIMD lanes of `kernel` (a name from kernels(), or 'auto'); the GIL is released "
     "while hashing."},
    {"kernels", kernels, METH_NOARGS,
     "(name, lanes, bytes per second per lane as measured at import) of every kernel this CPU runs, "
     "best first."},
    {"auto_kernel", auto_kernel, METH_O, "The kernel 'auto' runs while `live` jobs are left."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef md5mb_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "fedmount.blocks._md5mb",
    .m_doc = "Multi-buffer md5 kernels (see fedmount/blocks/md5.py).",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__md5mb(void)
{
    if (PyType_Ready(&StateType) < 0)
        return NULL;
    calibrate();
    PyObject *m = PyModule_Create(&md5mb_module);
    if (!m)
        return NULL;
    Py_INCREF(&StateType);
    if (PyModule_AddObject(m, "State", (PyObject *)&StateType) < 0) {
        Py_DECREF(&StateType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
