/* The agent's per-sample hot path in one pass each: see device_agent/kernels.py, which documents
 * these functions, checks their arguments and holds the numpy fallbacks they must agree with.
 *
 * One variant: built against numpy's C API (numpy >= 2 is a build requirement, see setup.py; the
 * result runs with numpy 1.23 and later). The runner reads a sample's ndarray fields and makes its
 * scores array through that API; the other functions take their arrays through the buffer
 * protocol, which every ndarray exports. The vector loops are GCC/Clang vector extensions: SSE2
 * and AVX2 clones on x86-64 (picked at load time; EDGEFLEET_NO_CLONES builds the SSE2 one only),
 * NEON on ARM, the same arithmetic in each. Arithmetic is plain IEEE float/double: build without
 * -ffast-math, or quantization stops matching numpy's divide + rint + clip.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>

/* Round half to even for |x| < 2^22 in the default rounding mode (numpy's rint), without libm. */
static const float ROUND_MAGIC = 12582912.0f; /* 1.5 * 2^23 */

/* min, max, sum and sum of squares of n floats (min = max = NaN when any value is NaN or infinite).
 * GCC/Clang vector extensions (SSE/AVX2 on x86, NEON on ARM): two 8-lane accumulators of each,
 * float partial sums over blocks of 64 values, added into doubles per block. */
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
#define BLOCK 64

/* x86-64: an AVX2 copy of the loops next to the baseline SSE2 one, picked at load time (glibc
 * ifunc). No FMA (setup.py also builds with -ffp-contract=off): contracting x * x + s would change
 * the sums' last bits from one CPU to another. */
#if defined(__x86_64__) && defined(__GNUC__) && defined(__GLIBC__) && !defined(EDGEFLEET_NO_CLONES) \
    && (!defined(__clang__) || __clang_major__ >= 14)
#define HOT __attribute__((target_clones("avx2", "default")))
#else
#define HOT
#endif

typedef double v4d __attribute__((vector_size(32)));
typedef int64_t v4l __attribute__((vector_size(32)));

/* Macros rather than functions: a function taking 32-byte vectors makes GCC print ABI notes. */
#define LOAD8(dst, p) memcpy(&(dst), (p), sizeof(v8f))
#define LOAD4D(dst, p) memcpy(&(dst), (p), sizeof(v4d))
#define VSEL(m, a, b) ((v8f)(((v8i)(a) & (m)) | ((v8i)(b) & ~(m)))) /* m ? a : b, lane by lane */
#define VSEL4(m, a, b) ((v4d)(((v4l)(a) & (m)) | ((v4l)(b) & ~(m))))

HOT static void summary_f32(const float *v, Py_ssize_t n, double out[4]) {
    float first = n ? v[0] : 0.0f;
    v8f mn0 = {first, first, first, first, first, first, first, first}, mn1 = mn0, mx0 = mn0, mx1 = mn0;
    v8f bad0 = {0}, bad1 = bad0;
    double s = 0.0, ss = 0.0;
    Py_ssize_t i = 0;
    for (; i + BLOCK <= n; i += BLOCK) {
        v8f s0 = {0}, s1 = s0, q0 = s0, q1 = s0;
        for (int j = 0; j < BLOCK; j += 16) {
            v8f x0, x1;
            LOAD8(x0, v + i + j);
            LOAD8(x1, v + i + j + 8);
            mn0 = VSEL(x0 < mn0, x0, mn0);
            mn1 = VSEL(x1 < mn1, x1, mn1);
            mx0 = VSEL(x0 > mx0, x0, mx0);
            mx1 = VSEL(x1 > mx1, x1, mx1);
            bad0 += x0 - x0; /* 0 for finite values, NaN for NaN and infinities */
            bad1 += x1 - x1;
            s0 += x0;
            s1 += x1;
            q0 += x0 * x0;
            q1 += x1 * x1;
        }
        s0 += s1;
        q0 += q1;
        double bs = 0.0, bq = 0.0;
        for (int k = 0; k < 8; k++) {
            bs += s0[k];
            bq += q0[k];
        }
        s += bs;
        ss += bq;
    }
    float mn = first, mx = first, bad = 0.0f;
    for (int k = 0; k < 8; k++) {
        mn = mn0[k] < mn ? mn0[k] : mn;
        mn = mn1[k] < mn ? mn1[k] : mn;
        mx = mx0[k] > mx ? mx0[k] : mx;
        mx = mx1[k] > mx ? mx1[k] : mx;
        bad += bad0[k] + bad1[k];
    }
    for (; i < n; i++) {
        float x = v[i];
        mn = x < mn ? x : mn;
        mx = x > mx ? x : mx;
        bad += x - x;
        s += x;
        ss += (double)x * x;
    }
    int finite = bad == 0.0f;
    out[0] = finite ? mn : NAN;
    out[1] = finite ? mx : NAN;
    out[2] = s;
    out[3] = ss;
}

/* One value's code, written branch-free so that the loops below vectorize. Clamping to +-2^22
 * first keeps the rounding trick valid (larger values are integral and clamp to lo/hi anyway); a
 * NaN fails every comparison and ends as lo (the caller refuses such a sample). */
#define QUANT(x)                                                  \
    do {                                                          \
        float t_ = (x) / scale;                                   \
        t_ = t_ > -4194304.0f ? t_ : -4194304.0f;                 \
        t_ = t_ < 4194304.0f ? t_ : 4194304.0f;                   \
        t_ = (t_ + ROUND_MAGIC) - ROUND_MAGIC;                    \
        t_ += zp;                                                 \
        t_ = t_ > lo ? t_ : lo;                                   \
        t_ = t_ < hi ? t_ : hi;                                   \
        code = (int)t_;                                           \
    } while (0)

HOT static void quantize_i8(const float *v, Py_ssize_t n, float scale, float zp, float lo, float hi, int8_t *q) {
    int code;
    for (Py_ssize_t i = 0; i < n; i++) {
        QUANT(v[i]);
        q[i] = (int8_t)code;
    }
}

HOT static void quantize_u8(const float *v, Py_ssize_t n, float scale, float zp, float lo, float hi, uint8_t *q) {
    int code;
    for (Py_ssize_t i = 0; i < n; i++) {
        QUANT(v[i]);
        q[i] = (uint8_t)code;
    }
}

/* The codes of n values into q: int8 when lo < 0, uint8 otherwise. */
static void quantize_8bit(const float *v, Py_ssize_t n, float scale, float zp, float lo, float hi, void *q) {
    if (lo < 0.0f)
        quantize_i8(v, n, scale, zp, lo, hi, (int8_t *)q);
    else
        quantize_u8(v, n, scale, zp, lo, hi, (uint8_t *)q);
}

/* k 8-bit codes -> their float32 values through a 256-entry table. */
static void decode_codes(const unsigned char *q, const float *table, float *v, Py_ssize_t k) {
    for (Py_ssize_t i = 0; i < k; i++)
        v[i] = table[q[i]];
}


/* Get a C-contiguous buffer of ``kind`` ('f' float32, 'd' float64, 'i' int64), writable if asked,
 * holding n items (any number when n < 0). On failure: an exception naming ``what``, and -1. */
static int get_typed(PyObject *obj, Py_buffer *buf, char kind, Py_ssize_t n, int writable, const char *what) {
    if (PyObject_GetBuffer(obj, buf, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0)) < 0)
        return -1;
    const char *f = buf->format ? buf->format : "B";
    if (*f == '<' || *f == '=' || *f == '@')
        f++;
    int ok = kind == 'f'   ? buf->itemsize == 4 && strcmp(f, "f") == 0
             : kind == 'd' ? buf->itemsize == 8 && strcmp(f, "d") == 0
                           : buf->itemsize == 8 && (strcmp(f, "l") == 0 || strcmp(f, "q") == 0);
    if (!ok || (n >= 0 && buf->len != n * buf->itemsize)) {
        static const char *names[] = {"float32", "float64", "int64"};
        const char *type = names[kind == 'f' ? 0 : kind == 'd' ? 1 : 2];
        PyBuffer_Release(buf);
        if (!ok)
            PyErr_Format(PyExc_TypeError, "%s: expected a%s C-contiguous %s buffer", what,
                         writable ? " writable" : "", type);
        else
            PyErr_Format(PyExc_ValueError, "%s must hold %zd %s values", what, n, type);
        return -1;
    }
    return 0;
}

static PyObject *summary_tuple(const double r[4]) {
    return Py_BuildValue("(dddd)", r[0], r[1], r[2], r[3]);
}

/* summary(src: float32) -> (min, max, sum, sumsq) */
static PyObject *k_summary(PyObject *self, PyObject *args) {
    PyObject *src_obj;
    Py_buffer src;
    double r[4];
    (void)self;
    if (!PyArg_ParseTuple(args, "O", &src_obj) || get_typed(src_obj, &src, 'f', -1, 0, "src") < 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    summary_f32((const float *)src.buf, src.len / 4, r);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&src);
    return summary_tuple(r);
}

/* quantize(src: float32, scale, zero_point, qmin, qmax, dst: 8-bit) -> (min, max, sum, sumsq)
 * dst[i] = clip(rint(src[i] / scale) + zero_point, qmin, qmax), as numpy computes it in float32. */
static PyObject *k_quantize(PyObject *self, PyObject *args) {
    PyObject *src_obj;
    Py_buffer src, dst;
    float scale, zp;
    int qmin, qmax;
    double r[4];
    (void)self;
    if (!PyArg_ParseTuple(args, "Offiiw*", &src_obj, &scale, &zp, &qmin, &qmax, &dst))
        return NULL;
    if (get_typed(src_obj, &src, 'f', -1, 0, "src") < 0) {
        PyBuffer_Release(&dst);
        return NULL;
    }
    Py_ssize_t n = src.len / 4;
    if (dst.len != n || qmin < -128 || qmax > 255 || qmin >= qmax) {
        PyBuffer_Release(&src);
        PyBuffer_Release(&dst);
        PyErr_SetString(PyExc_ValueError, "dst must hold one byte per value and qmin/qmax an 8-bit range");
        return NULL;
    }
    const float *v = (const float *)src.buf;
    const float lo = (float)qmin, hi = (float)qmax;
    Py_BEGIN_ALLOW_THREADS
    summary_f32(v, n, r);
    quantize_8bit(v, n, scale, zp, lo, hi, dst.buf);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return summary_tuple(r);
}


/* Copy K scores into a float64 row; return numpy's argmax (the first maximum, or the first NaN). */
static Py_ssize_t store_scores(const float *v, Py_ssize_t k, double *dst) {
    Py_ssize_t top = 0;
    int nan_seen = v[0] != v[0];
    for (Py_ssize_t i = 0; i < k; i++) {
        dst[i] = v[i];
        if (!nan_seen && (v[i] > v[top] || v[i] != v[i])) {
            top = i;
            nan_seen = v[i] != v[i];
        }
    }
    return top;
}

/* store_row(scores: float32 (K), rows: float64 (R, K), row, latencies: float64 (R), latency)
 *   -> (argmax, max): one prediction's scores and latency into a statistics window's buffers. */
static PyObject *k_store_row(PyObject *self, PyObject *args) {
    PyObject *src_obj, *rows_obj, *lat_obj;
    Py_buffer src, rows, lat;
    Py_ssize_t row;
    double latency;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOnOd", &src_obj, &rows_obj, &row, &lat_obj, &latency))
        return NULL;
    if (get_typed(src_obj, &src, 'f', -1, 0, "src") < 0)
        return NULL;
    if (get_typed(rows_obj, &rows, 'd', -1, 1, "rows") < 0) {
        PyBuffer_Release(&src);
        return NULL;
    }
    if (get_typed(lat_obj, &lat, 'd', -1, 1, "latencies") < 0) {
        PyBuffer_Release(&src);
        PyBuffer_Release(&rows);
        return NULL;
    }
    Py_ssize_t k = src.len / 4, n_rows = lat.len / 8;
    PyObject *result = NULL;
    if (k < 1 || row < 0 || row >= n_rows || rows.len != n_rows * k * 8) {
        PyErr_SetString(PyExc_ValueError, "store_row: scores, row and buffers do not fit together");
    } else {
        const float *v = (const float *)src.buf;
        Py_ssize_t top = store_scores(v, k, (double *)rows.buf + row * k);
        ((double *)lat.buf)[row] = latency;
        result = Py_BuildValue("(nd)", top, (double)v[top]);
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&rows);
    PyBuffer_Release(&lat);
    return result;
}

/* decode_row(raw: 8-bit codes (K), table: float32 (256), out: float32 (K), rows, row, latencies,
 *   latency) -> (argmax, max): dequantize one prediction's output through the code table into
 *   ``out`` and store it like store_row. */
static PyObject *k_decode_row(PyObject *self, PyObject *args) {
    PyObject *raw_obj, *lut_obj, *out_obj, *rows_obj, *lat_obj;
    Py_buffer raw, lut, out, rows, lat;
    Py_ssize_t row;
    double latency;
    PyObject *result = NULL;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOOOnOd", &raw_obj, &lut_obj, &out_obj, &rows_obj, &row, &lat_obj, &latency))
        return NULL;
    if (PyObject_GetBuffer(raw_obj, &raw, PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    if (get_typed(lut_obj, &lut, 'f', 256, 0, "table") < 0)
        goto release_raw;
    if (get_typed(out_obj, &out, 'f', -1, 1, "out") < 0)
        goto release_lut;
    if (get_typed(rows_obj, &rows, 'd', -1, 1, "rows") < 0)
        goto release_out;
    if (get_typed(lat_obj, &lat, 'd', -1, 1, "latencies") < 0)
        goto release_rows;
    Py_ssize_t k = raw.len, n_rows = lat.len / 8;
    if (raw.itemsize != 1 || out.len != k * 4 || k < 1 || row < 0 || row >= n_rows || rows.len != n_rows * k * 8) {
        PyErr_SetString(PyExc_ValueError, "decode_row: codes, table, output, row and buffers do not fit together");
    } else {
        float *v = (float *)out.buf;
        decode_codes((const unsigned char *)raw.buf, (const float *)lut.buf, v, k);
        Py_ssize_t top = store_scores(v, k, (double *)rows.buf + row * k);
        ((double *)lat.buf)[row] = latency;
        result = Py_BuildValue("(nd)", top, (double)v[top]);
    }
    PyBuffer_Release(&lat);
release_rows:
    PyBuffer_Release(&rows);
release_out:
    PyBuffer_Release(&out);
release_lut:
    PyBuffer_Release(&lut);
release_raw:
    PyBuffer_Release(&raw);
    return result;
}


/* A batch x (N, F) row-major into per-feature batch moments and the histograms: nb (finite
 * values), bad (NaN/infinities), s (sum), lo/hi (min/max), bmean (s / nb, 0 when nb is 0) and m2
 * (squared deviations from bmean), each F long; each finite value's bin is counted into counts
 * (F, E + 1).
 *
 * Row by row, so that the F independent sums vectorize across features while each feature's sum
 * still runs over the rows in order, as numpy's axis-0 sums do: the results are numpy's bit for
 * bit. A non-finite value adds 0.0 (numpy's nansum does the same; s and m2 are never -0.0, so
 * adding +0.0 changes nothing). A value's bin is the number of its feature's edges <= it: the
 * padding edges are +inf and never count; the last real edge belongs to the last bin. */
HOT static void profile_rows(const double *x, Py_ssize_t N, Py_ssize_t F, const double *edges, Py_ssize_t E,
                             const int64_t *nedges, int64_t *counts, int64_t *nb, int64_t *bad, double *s,
                             double *lo, double *hi, double *bmean, double *m2, double *eT, int64_t *ge, int64_t *eq,
                             double *xpad) {
    for (Py_ssize_t j = 0; j < F; j++) {
        nb[j] = bad[j] = 0;
        s[j] = m2[j] = 0.0;
        lo[j] = INFINITY;
        hi[j] = -INFINITY;
    }
    for (Py_ssize_t r = 0; r < N; r++) {
        const double *xr = x + r * F;
        Py_ssize_t j = 0;
        for (; j + 4 <= F; j += 4) { /* four features at a time; a true lane is -1 */
            const v4d zero = {0.0, 0.0, 0.0, 0.0};
            v4d v, sv, lv, hv;
            v4l nv, bv;
            LOAD4D(v, xr + j);
            LOAD4D(sv, s + j);
            LOAD4D(lv, lo + j);
            LOAD4D(hv, hi + j);
            memcpy(&nv, nb + j, sizeof(nv));
            memcpy(&bv, bad + j, sizeof(bv));
            v4l fin = (v4l)(v - v == zero); /* v - v is NaN for NaN and infinities */
            nv -= fin;
            bv -= ~fin;
            sv += VSEL4(fin, v, zero);
            lv = VSEL4(fin & (v4l)(v < lv), v, lv);
            hv = VSEL4(fin & (v4l)(v > hv), v, hv);
            memcpy(s + j, &sv, sizeof(sv));
            memcpy(lo + j, &lv, sizeof(lv));
            memcpy(hi + j, &hv, sizeof(hv));
            memcpy(nb + j, &nv, sizeof(nv));
            memcpy(bad + j, &bv, sizeof(bv));
        }
        for (; j < F; j++) {
            double v = xr[j];
            int fin = v - v == 0.0;
            nb[j] += fin;
            bad[j] += !fin;
            s[j] += fin ? v : 0.0;
            lo[j] = fin && v < lo[j] ? v : lo[j];
            hi[j] = fin && v > hi[j] ? v : hi[j];
        }
    }
    for (Py_ssize_t j = 0; j < F; j++)
        bmean[j] = nb[j] ? s[j] / (double)nb[j] : 0.0;
    for (Py_ssize_t r = 0; r < N; r++) {
        const double *xr = x + r * F;
        Py_ssize_t j = 0;
        for (; j + 4 <= F; j += 4) {
            const v4d zero = {0.0, 0.0, 0.0, 0.0};
            v4d v, mv, m2v;
            LOAD4D(v, xr + j);
            LOAD4D(mv, bmean + j);
            LOAD4D(m2v, m2 + j);
            v4d d = v - mv;
            m2v += VSEL4((v4l)(v - v == zero), d * d, zero);
            memcpy(m2 + j, &m2v, sizeof(m2v));
        }
        for (; j < F; j++) {
            double d = xr[j] - bmean[j];
            m2[j] += xr[j] - xr[j] == 0.0 ? d * d : 0.0;
        }
    }
    /* The bins, four features at a time, without a scatter: for each edge, count the values >= it
     * (a compare and a subtract per four values; eight edges' counters stay in registers while
     * the rows stream past). A feature's histogram follows from those counts: bin 0 holds the
     * finite values below edge 0, bin k the ones >= edge k-1 and not >= edge k, bin ne the ones
     * >= the last edge, less those equal to it (the last edge belongs to the last bin). The
     * features are taken Fp = F rounded up to 4 at a time: when F is not a multiple of 4, xpad is
     * x with NaN in the extra lanes, which count nowhere. eT is the edges transposed, (Epad, Fp),
     * +inf past each feature's own; ge (Epad, Fp) and eq (Fp) are the counts. A non-finite value
     * fails every compare under the finite mask (+inf would pass). */
    const Py_ssize_t Fp = (F + 3) / 4 * 4, Epad = (E + 7) / 8 * 8;
    const double *xb = x;
    if (Fp != F) {
        for (Py_ssize_t r = 0; r < N; r++)
            for (Py_ssize_t j = 0; j < Fp; j++)
                xpad[r * Fp + j] = j < F ? x[r * F + j] : NAN;
        xb = xpad;
    }
    for (Py_ssize_t k = 0; k < Epad; k++)
        for (Py_ssize_t j = 0; j < Fp; j++)
            eT[k * Fp + j] = k < E && j < F ? edges[j * E + k] : INFINITY;
    /* Blocks of 64 rows (32 KiB for 64 features), so that the passes over a block's columns find
     * it in the L1 cache; the counters carry over in ge and eq. */
    memset(ge, 0, sizeof(int64_t) * (size_t)(Epad * Fp));
    memset(eq, 0, sizeof(int64_t) * (size_t)Fp);
    for (Py_ssize_t r0 = 0; r0 < N; r0 += 64) {
        const Py_ssize_t r1 = r0 + 64 < N ? r0 + 64 : N;
        for (Py_ssize_t q = 0; q < Fp; q += 4) {
            int finite = q + 4 <= F;
            for (Py_ssize_t j = q; j < q + 4 && j < F; j++)
                finite &= bad[j] == 0;
            for (Py_ssize_t k0 = 0; k0 < Epad; k0 += 8) {
                v4l a[8];
                v4d e[8];
                for (int kk = 0; kk < 8; kk++) {
                    memcpy(&a[kk], ge + (k0 + kk) * Fp + q, sizeof(a[kk]));
                    LOAD4D(e[kk], eT + (k0 + kk) * Fp + q);
                }
                if (finite) {
                    for (Py_ssize_t r = r0; r < r1; r++) {
                        v4d v;
                        LOAD4D(v, xb + r * Fp + q);
                        for (int kk = 0; kk < 8; kk++)
                            a[kk] -= (v4l)(v >= e[kk]);
                    }
                } else {
                    const v4d zero = {0.0, 0.0, 0.0, 0.0};
                    for (Py_ssize_t r = r0; r < r1; r++) {
                        v4d v;
                        LOAD4D(v, xb + r * Fp + q);
                        v4l fin = (v4l)(v - v == zero);
                        for (int kk = 0; kk < 8; kk++)
                            a[kk] -= (v4l)(v >= e[kk]) & fin;
                    }
                }
                for (int kk = 0; kk < 8; kk++)
                    memcpy(ge + (k0 + kk) * Fp + q, &a[kk], sizeof(a[kk]));
            }
            v4d last;
            for (int l = 0; l < 4; l++)
                last[l] = q + l < F ? edges[(q + l) * E + nedges[q + l] - 1] : NAN;
            v4l aeq;
            memcpy(&aeq, eq + q, sizeof(aeq));
            for (Py_ssize_t r = r0; r < r1; r++) {
                v4d v;
                LOAD4D(v, xb + r * Fp + q);
                aeq -= (v4l)(v == last); /* equal to a finite edge: finite */
            }
            memcpy(eq + q, &aeq, sizeof(aeq));
        }
    }
    for (Py_ssize_t j = 0; j < F; j++) {
        const Py_ssize_t ne = (Py_ssize_t)nedges[j];
        int64_t *c = counts + j * (E + 1);
        c[0] += nb[j] - ge[j];
        for (Py_ssize_t k = 1; k < ne; k++)
            c[k] += ge[(k - 1) * Fp + j] - ge[k * Fp + j];
        c[ne] += ge[(ne - 1) * Fp + j] - eq[j];
        c[ne - 1] += eq[j];
    }
}

/* profile_update(x (n, F) float64, edges (F, E) float64, nedges (F,) int64, counts (F, E + 1) int64,
 *                count, nan_count (F,) int64, min, max, mean, m2 (F,) float64)
 * The numpy definition is device_agent.formats.stats.FeatureSetProfile.update: a value's bin is the number
 * of the feature's edges <= it (0 underflow, nedges overflow; the last edge belongs to the last
 * bin); NaN and infinities only count in nan_count; the batch's mean and M2 (sums over rows in row
 * order, as numpy's axis-0 sums) merge into mean/m2 with Chan's formula, in numpy's order of
 * operations, so the results are the same to the bit. */
static PyObject *k_profile_update(PyObject *self, PyObject *args) {
    PyObject *o[10];
    Py_buffer b[10];
    int got = 0;
    PyObject *result = NULL;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOOOOOOOOO", &o[0], &o[1], &o[2], &o[3], &o[4], &o[5], &o[6], &o[7], &o[8], &o[9]))
        return NULL;
    /* sizes come from nedges (F) and edges (F * E) */
    if (PyObject_GetBuffer(o[2], &b[2], PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0)
        return NULL;
    Py_ssize_t F = b[2].len / 8;
    PyBuffer_Release(&b[2]);
    if (PyObject_GetBuffer(o[1], &b[1], PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    Py_ssize_t E = F > 0 ? b[1].len / 8 / F : 0;
    PyBuffer_Release(&b[1]);
    if (PyObject_GetBuffer(o[0], &b[0], PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    Py_ssize_t N = F > 0 ? b[0].len / 8 / F : 0;
    PyBuffer_Release(&b[0]);
    if (F < 1 || E < 2) {
        PyErr_SetString(PyExc_ValueError, "profile_update: needs at least one feature and two edges");
        return NULL;
    }
    static const char kinds[10] = {'d', 'd', 'i', 'i', 'i', 'i', 'd', 'd', 'd', 'd'};
    static const char *names[10] = {"x", "edges", "nedges", "counts", "count", "nan_count",
                                    "min", "max", "mean", "m2"};
    Py_ssize_t sizes[10] = {N * F, F * E, F, F * (E + 1), F, F, F, F, F, F};
    for (got = 0; got < 10; got++)
        if (get_typed(o[got], &b[got], kinds[got], sizes[got], got >= 3, names[got]) < 0)
            goto done;
    {
        const double *x = (const double *)b[0].buf, *edges = (const double *)b[1].buf;
        const int64_t *nedges = (const int64_t *)b[2].buf;
        int64_t *counts = (int64_t *)b[3].buf, *count = (int64_t *)b[4].buf, *nan_count = (int64_t *)b[5].buf;
        double *mn = (double *)b[6].buf, *mx = (double *)b[7].buf, *mean = (double *)b[8].buf,
               *m2 = (double *)b[9].buf;
        for (Py_ssize_t j = 0; j < F; j++) {
            if (nedges[j] < 2 || nedges[j] > E) {
                PyErr_SetString(PyExc_ValueError, "profile_update: nedges out of range");
                goto done;
            }
        }
        /* moments (7 F), eT and ge (Epad x Fp each), eq (Fp), and xpad (N x Fp) when F % 4 != 0 */
        const size_t fp = (size_t)(F + 3) / 4 * 4, epad = (size_t)(E + 7) / 8 * 8;
        const size_t npad = fp != (size_t)F ? (size_t)N * fp : 0;
        double *scratch = PyMem_Malloc(((size_t)F * 7 + 2 * epad * fp + fp + npad) * sizeof(double));
        if (scratch == NULL) {
            PyErr_NoMemory();
            goto done;
        }
        int64_t *nb = (int64_t *)scratch, *bad = nb + F;
        double *s = scratch + 2 * F, *lo = s + F, *hi = lo + F, *bmean = hi + F, *bm2 = bmean + F;
        double *eT = bm2 + F;
        int64_t *ge = (int64_t *)(eT + epad * fp), *eq = ge + epad * fp;
        double *xpad = (double *)(eq + fp);
        Py_BEGIN_ALLOW_THREADS
        profile_rows(x, N, F, edges, E, nedges, counts, nb, bad, s, lo, hi, bmean, bm2, eT, ge, eq, xpad);
        for (Py_ssize_t j = 0; j < F; j++) {
            nan_count[j] += bad[j];
            if (nb[j] == 0)
                continue;
            double na = (double)count[j], nbd = (double)nb[j], n = na + nbd;
            double d = bmean[j] - mean[j];
            mean[j] = mean[j] + d * nbd / n;
            m2[j] = m2[j] + bm2[j] + d * d * na * nbd / n;
            count[j] += nb[j];
            mn[j] = fmin(mn[j], lo[j]);
            mx[j] = fmax(mx[j], hi[j]);
        }
        Py_END_ALLOW_THREADS
        PyMem_Free(scratch);
        result = Py_None;
        Py_INCREF(result);
    }
done:
    while (--got >= 0)
        PyBuffer_Release(&b[got]);
    return result;
}

/* fold_outputs(scores (n, K) float64, class_counts (K,) int64, confidence (n,) float64) -> bool
 * Profile.update_outputs for scores that are probabilities: when every row passes
 * stats.as_probabilities' test (every value >= -1e-6 and each row's sum within 2e-2 + 1e-5 of 1),
 * adds each row's top-1 (numpy's argmax: the first maximum) to class_counts, writes its clipped top
 * score into confidence, and returns True. Returns False and changes nothing otherwise (logits go
 * through the softmax in numpy), and also when a row's sum lies within 1e-9 of the tolerance:
 * numpy adds the row in another order, and the two sums may round to different sides there. On the
 * rows it accepts, clipping to [0, 1] cannot change the argmax (at most one value exceeds 1/2), and
 * the clipped maximum is the maximum clipped. */
static PyObject *k_fold_outputs(PyObject *self, PyObject *args) {
    PyObject *s_obj, *c_obj, *f_obj;
    Py_buffer s, c, f;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOO", &s_obj, &c_obj, &f_obj))
        return NULL;
    if (get_typed(c_obj, &c, 'i', -1, 1, "class_counts") < 0)
        return NULL;
    Py_ssize_t K = c.len / 8;
    if (K < 1 || get_typed(s_obj, &s, 'd', -1, 0, "scores") < 0) {
        if (K < 1)
            PyErr_SetString(PyExc_ValueError, "fold_outputs: no classes");
        PyBuffer_Release(&c);
        return NULL;
    }
    Py_ssize_t n = s.len / 8 / K;
    if (s.len != n * K * 8 || get_typed(f_obj, &f, 'd', n, 1, "confidence") < 0) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "fold_outputs: scores must be (n, K) for K class counts");
        PyBuffer_Release(&s);
        PyBuffer_Release(&c);
        return NULL;
    }
    const double *p = (const double *)s.buf;
    const double tol = 2e-2 + 1e-5, margin = 1e-9;
    int ok = 1;
    for (Py_ssize_t r = 0; r < n && ok; r++) {
        const double *row = p + r * K;
        double sum = 0.0;
        for (Py_ssize_t k = 0; k < K; k++) {
            ok &= row[k] >= -1e-6; /* false for NaN */
            sum += row[k];
        }
        ok &= fabs(sum - 1.0) <= tol - margin;
    }
    if (ok) {
        int64_t *counts = (int64_t *)c.buf;
        double *conf = (double *)f.buf;
        for (Py_ssize_t r = 0; r < n; r++) {
            const double *row = p + r * K;
            Py_ssize_t top = 0;
            for (Py_ssize_t k = 1; k < K; k++)
                top = row[k] > row[top] ? k : top;
            counts[top]++;
            double v = row[top];
            conf[r] = v < 0.0 ? 0.0 : v > 1.0 ? 1.0 : v;
        }
    }
    PyBuffer_Release(&s);
    PyBuffer_Release(&c);
    PyBuffer_Release(&f);
    return PyBool_FromLong(ok);
}

/* ---------------------------------------------------------------------------------------------
 * Runner: Agent.predict for one float32 sample (or a batch of the size the runner was made for),
 * in one call. Under the Agent's lock it checks the input, quantizes it into the runtime's input
 * tensor, runs the model, decodes the 8-bit output through the code table into a new scores array,
 * writes the samples' statistics rows into the window it is bound to (folding the window when its
 * buffers fill), and returns the Prediction. Python keeps everything else: the general path, the
 * folds, window rotation, model switches.
 *
 * The input and output pointers are the interpreter's own tensor memory (a LiteRT interpreter's
 * ``tensor(i)()`` views). The runner holds those views and ``invoke`` until ``close``: the memory
 * stays alive, and LiteRT refuses to resize or re-allocate an interpreter while views of its
 * tensors are alive (its reference-count check), so a mistake fails loudly instead of writing into
 * freed memory. Python closes a runner before it resizes the interpreter, after checking that a
 * run leaves the tensors where they were (device_agent/runtimes/litert.py, ``direct_io``). Any
 * other buffer owner works the same way (tests use numpy arrays).
 */
#define RUNNER_MAX_DIMS 8
enum { BIND_NONE = 0, BIND_ELEMENTS = 1, BIND_SUMMARY = 2 };

typedef struct {
    PyObject_HEAD
    PyObject *invoke;
    unsigned char *in;
    const unsigned char *out;
    Py_ssize_t n_in, k, batch, ndim, shape[RUNNER_MAX_DIMS]; /* per sample: n_in values, k scores */
    float scale, zp, lo, hi;
    float table[256];
    /* bound (see bind): the window, its row counter and buffers (held, so the arrays stay alive),
     * the lock's acquire/release, and what a Prediction is made of */
    int mode;
    Py_ssize_t rows;
    PyObject *window, *acquire, *release, *cls, *labels, *ref;
    int cls_is_tuple;
    Py_buffer next, feats, scores, lat, mask;
    double *summ; /* (batch, 4) scratch: each sample's min, max, sum, sum of squares */
    Py_buffer in_view, out_view; /* held until close: the tensors' exporters stay alive and unresized */
    int holding;
} Runner;

static PyObject *str_flush;

static void runner_unbind(Runner *r) {
    if (r->mode == BIND_NONE)
        return;
    PyBuffer_Release(&r->next);
    PyBuffer_Release(&r->feats);
    PyBuffer_Release(&r->scores);
    PyBuffer_Release(&r->lat);
    if (r->mode == BIND_SUMMARY)
        PyBuffer_Release(&r->mask);
    Py_CLEAR(r->window);
    Py_CLEAR(r->acquire);
    Py_CLEAR(r->release);
    Py_CLEAR(r->cls);
    Py_CLEAR(r->labels);
    Py_CLEAR(r->ref);
    r->mode = BIND_NONE;
    r->rows = 0;
}

/* Let go of the interpreter: its Invoke and the tensor views (LiteRT may resize it again). */
static void runner_release(Runner *r) {
    Py_CLEAR(r->invoke);
    if (r->holding) {
        PyBuffer_Release(&r->in_view);
        PyBuffer_Release(&r->out_view);
        r->holding = 0;
    }
    r->in = NULL;
    r->out = NULL;
}

static void runner_dealloc(Runner *r) {
    runner_unbind(r);
    runner_release(r);
    PyMem_Free(r->summ);
    Py_TYPE(r)->tp_free((PyObject *)r);
}

/* Runner(invoke, inp, out, shape, scale, zero_point, qmin, qmax, table, batch=1)
 * ``inp`` and ``out`` are the input (batch * prod(shape) bytes) and output (batch * K bytes) tensors
 * of an interpreter that runs ``batch`` samples of ``shape`` at a time. */
static PyObject *runner_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    PyObject *invoke, *in_obj, *out_obj, *shape_obj, *table_obj;
    float scale, zp;
    int qmin, qmax;
    Py_ssize_t batch = 1;
    Py_buffer in, out, table;
    if (kwds != NULL && PyDict_GET_SIZE(kwds) > 0) {
        PyErr_SetString(PyExc_TypeError, "Runner takes positional arguments only");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "OOOOffiiO|n", &invoke, &in_obj, &out_obj, &shape_obj, &scale, &zp, &qmin, &qmax,
                          &table_obj, &batch))
        return NULL;
    if (batch < 1) {
        PyErr_SetString(PyExc_ValueError, "Runner: batch must be >= 1");
        return NULL;
    }
    if (!PyCallable_Check(invoke)) {
        PyErr_SetString(PyExc_TypeError, "Runner: invoke must be callable");
        return NULL;
    }
    if (qmin < -128 || qmax > 255 || qmin >= qmax || !(scale > 0.0f) || !isfinite(zp)) {
        PyErr_SetString(PyExc_ValueError, "Runner: scale must be > 0 and qmin/qmax an 8-bit range");
        return NULL;
    }
    PyObject *shape = PySequence_Tuple(shape_obj);
    if (shape == NULL)
        return NULL;
    Py_ssize_t ndim = PyTuple_GET_SIZE(shape), dims[RUNNER_MAX_DIMS], n = 1;
    if (ndim > RUNNER_MAX_DIMS) {
        Py_DECREF(shape);
        PyErr_SetString(PyExc_ValueError, "Runner: too many dimensions");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < ndim; i++) {
        dims[i] = PyLong_AsSsize_t(PyTuple_GET_ITEM(shape, i));
        if (dims[i] < 1) {
            Py_DECREF(shape);
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "Runner: dimensions must be >= 1");
            return NULL;
        }
        n *= dims[i];
    }
    Py_DECREF(shape);
    if (PyObject_GetBuffer(in_obj, &in, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0)
        return NULL;
    if (PyObject_GetBuffer(out_obj, &out, PyBUF_C_CONTIGUOUS) < 0) {
        PyBuffer_Release(&in);
        return NULL;
    }
    if (get_typed(table_obj, &table, 'f', 256, 0, "table") < 0) {
        PyBuffer_Release(&in);
        PyBuffer_Release(&out);
        return NULL;
    }
    Runner *r = NULL;
    if (in.itemsize != 1 || in.len != n * batch || out.itemsize != 1 || out.len < batch || out.len % batch) {
        PyErr_SetString(PyExc_ValueError,
                        "Runner: inp must be batch * n bytes for the shape, out one byte per score and sample");
    } else if ((r = (Runner *)type->tp_alloc(type, 0)) != NULL &&
               (r->summ = PyMem_Malloc(sizeof(double) * 4 * (size_t)batch)) == NULL) {
        Py_CLEAR(r);
        PyErr_NoMemory();
    } else if (r != NULL) {
        Py_INCREF(invoke);
        r->invoke = invoke;
        r->in = (unsigned char *)in.buf;
        r->out = (const unsigned char *)out.buf;
        r->in_view = in; /* held: see runner_release */
        r->out_view = out;
        r->holding = 1;
        r->n_in = n;
        r->batch = batch;
        r->k = out.len / batch;
        r->ndim = ndim;
        memcpy(r->shape, dims, sizeof(Py_ssize_t) * (size_t)ndim);
        r->scale = scale;
        r->zp = zp;
        r->lo = (float)qmin;
        r->hi = (float)qmax;
        memcpy(r->table, table.buf, sizeof(r->table));
        r->mode = BIND_NONE;
    }
    if (r == NULL) {
        PyBuffer_Release(&in);
        PyBuffer_Release(&out);
    }
    PyBuffer_Release(&table);
    return (PyObject *)r;
}

/* bind(window, lock, next, feats, scores, latencies, pending, cls, labels, ref)
 * ``window`` has ``flush()``, which folds its buffers and sets ``next`` back to 0; ``next`` is the
 * window's row counter, a writable (1,) int64 array holding the next free row, which the runner
 * reads and advances in place; ``feats`` is (R, n_in) float64, or with ``pending`` ((R,) uint8;
 * None otherwise) the (R, 4) summaries; ``scores`` (R, K) and ``latencies`` (R,) float64. A result
 * is ``cls(scores (batch, K) float32, [labels[top]], [score], ref)``; a tuple subclass (a named
 * tuple) gets its items directly. */
static PyObject *runner_bind(Runner *r, PyObject *args) {
    PyObject *window, *lock, *n_obj, *f_obj, *s_obj, *l_obj, *m_obj, *cls, *labels, *ref;
    if (r->invoke == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "bind: the runner is closed");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "OOOOOOOOO!O", &window, &lock, &n_obj, &f_obj, &s_obj, &l_obj, &m_obj, &cls,
                          &PyTuple_Type, &labels, &ref))
        return NULL;
    if (PyTuple_GET_SIZE(labels) != r->k) {
        PyErr_SetString(PyExc_ValueError, "bind: one label per score");
        return NULL;
    }
    PyObject *acquire = PyObject_GetAttrString(lock, "acquire");
    if (acquire == NULL)
        return NULL;
    PyObject *release = PyObject_GetAttrString(lock, "release");
    if (release == NULL) {
        Py_DECREF(acquire);
        return NULL;
    }
    runner_unbind(r);
    int summary = m_obj != Py_None;
    Py_buffer nx, f, s, l, m;
    if (get_typed(n_obj, &nx, 'i', 1, 1, "next") < 0)
        goto fail_lock;
    if (get_typed(l_obj, &l, 'd', -1, 1, "latencies") < 0)
        goto fail_next;
    Py_ssize_t rows = l.len / 8, width = summary ? 4 : r->n_in;
    if (rows < r->batch) {
        PyErr_SetString(PyExc_ValueError, "bind: the window has fewer rows than the runner's batch");
        goto fail_l;
    }
    if (get_typed(f_obj, &f, 'd', rows * width, 1, summary ? "summaries" : "feats") < 0)
        goto fail_l;
    if (get_typed(s_obj, &s, 'd', rows * r->k, 1, "scores") < 0)
        goto fail_f;
    if (summary) {
        if (PyObject_GetBuffer(m_obj, &m, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0)
            goto fail_s;
        if (m.len != rows || m.itemsize != 1) {
            PyBuffer_Release(&m);
            PyErr_SetString(PyExc_ValueError, "bind: pending must be one byte per row");
            goto fail_s;
        }
        r->mask = m;
    }
    r->next = nx;
    r->feats = f;
    r->scores = s;
    r->lat = l;
    r->rows = rows;
    r->mode = summary ? BIND_SUMMARY : BIND_ELEMENTS;
    Py_INCREF(window);
    r->window = window;
    r->acquire = acquire;
    r->release = release;
    Py_INCREF(cls);
    r->cls = cls;
    r->cls_is_tuple = PyType_Check(cls) && PyType_IsSubtype((PyTypeObject *)cls, &PyTuple_Type);
    Py_INCREF(labels);
    r->labels = labels;
    Py_INCREF(ref);
    r->ref = ref;
    Py_RETURN_NONE;
fail_s:
    PyBuffer_Release(&s);
fail_f:
    PyBuffer_Release(&f);
fail_l:
    PyBuffer_Release(&l);
fail_next:
    PyBuffer_Release(&nx);
fail_lock:
    Py_DECREF(acquire);
    Py_DECREF(release);
    return NULL;
}

static PyObject *runner_unbind_py(Runner *r, PyObject *Py_UNUSED(ignored)) {
    runner_unbind(r);
    Py_RETURN_NONE;
}

/* close(): unbind for good and let go of the interpreter (its Invoke and the tensor views), so
 * that nothing of the runner keeps the interpreter's tensors in use; predict returns None from
 * then on. */
static PyObject *runner_close(Runner *r, PyObject *Py_UNUSED(ignored)) {
    runner_unbind(r);
    runner_release(r);
    Py_RETURN_NONE;
}

/* Whether dims (nd of them) are the runner's input: (batch, *shape), or for a batch of one also
 * the bare sample shape. */
static int fits_shape(const Runner *r, int nd, const Py_ssize_t *dims) {
    Py_ssize_t skip = nd - r->ndim;
    if (skip == 1) {
        if (dims[0] != r->batch)
            return 0;
    } else if (!(skip == 0 && r->batch == 1)) {
        return 0;
    }
    for (Py_ssize_t i = 0; i < r->ndim; i++)
        if (dims[i + skip] != r->shape[i])
            return 0;
    return 1;
}

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec * 1e-6;
}

/* The window's next row (its counter, see bind) with room for ``batch`` rows after it, folding
 * first if there is not; -1 on error. */
static Py_ssize_t next_row(Runner *r) {
    for (int tries = 0; tries < 2; tries++) {
        int64_t row = ((const int64_t *)r->next.buf)[0];
        if (row >= 0 && row + r->batch <= r->rows)
            return row;
        PyObject *done = PyObject_CallMethodNoArgs(r->window, str_flush);
        if (done == NULL)
            return -1;
        Py_DECREF(done);
    }
    PyErr_SetString(PyExc_RuntimeError, "Runner: the window's row is outside its buffers");
    return -1;
}

/* The samples' work under the lock; returns the Prediction, None (nothing written) or NULL. */
static PyObject *predict_locked(Runner *r, const float *v) {
    const Py_ssize_t B = r->batch, n = r->n_in, K = r->k;
    for (Py_ssize_t b = 0; b < B; b++) {
        double *sm = r->summ + 4 * b;
        summary_f32(v + b * n, n, sm);
        if (!(isfinite(sm[0]) && isfinite(sm[1])))
            Py_RETURN_NONE; /* NaN or infinity: the general path refuses and counts it */
    }
    Py_ssize_t row = next_row(r);
    if (row < 0)
        return NULL;
    /* Everything that allocates or reads the samples comes before the run: the run evicts the
     * caches, and whatever comes after it pays for that. */
    PyObject *labels = PyList_New(B), *scores_l = PyList_New(B), *result = NULL;
    npy_intp dims[2] = {B, K};
    PyObject *scores = PyArray_SimpleNew(2, dims, NPY_FLOAT32);
    if (labels == NULL || scores_l == NULL || scores == NULL)
        goto fail;
    quantize_8bit(v, B * n, r->scale, r->zp, r->lo, r->hi, r->in);
    /* the statistics rows: the raw float values, or the summaries the next fold turns into
     * features (they count only once the rows do, below) */
    if (r->mode == BIND_ELEMENTS) {
        double *dst = (double *)r->feats.buf + row * n;
        for (Py_ssize_t i = 0; i < B * n; i++)
            dst[i] = v[i];
    } else {
        memcpy((double *)r->feats.buf + row * 4, r->summ, sizeof(double) * 4 * (size_t)B);
    }
    double t0 = now_ms();
    PyObject *ok = PyObject_CallNoArgs(r->invoke);
    double latency = now_ms() - t0;
    if (ok == NULL)
        goto fail;
    Py_DECREF(ok);
    /* the batch's latency is split evenly over its samples, as Window.record does */
    const double each = latency / (double)B;
    float *sc = (float *)PyArray_DATA((PyArrayObject *)scores);
    decode_codes(r->out, r->table, sc, B * K);
    for (Py_ssize_t b = 0; b < B; b++) {
        Py_ssize_t top = store_scores(sc + b * K, K, (double *)r->scores.buf + (row + b) * K);
        ((double *)r->lat.buf)[row + b] = each;
        PyObject *score = PyFloat_FromDouble((double)sc[b * K + top]);
        if (score == NULL)
            goto fail;
        PyList_SET_ITEM(scores_l, b, score);
        PyObject *label = PyTuple_GET_ITEM(r->labels, top);
        Py_INCREF(label);
        PyList_SET_ITEM(labels, b, label);
        if (r->mode == BIND_SUMMARY)
            ((unsigned char *)r->mask.buf)[row + b] = 1;
    }
    /* the rows count from here: the scores are in the window */
    ((int64_t *)r->next.buf)[0] = row + B;
    if (r->cls_is_tuple) { /* a named tuple, filled as tuple.__new__ fills one, without its Python __new__ */
        result = ((PyTypeObject *)r->cls)->tp_alloc((PyTypeObject *)r->cls, 4);
        if (result != NULL) {
            PyObject *items[4] = {scores, labels, scores_l, r->ref};
            for (int i = 0; i < 4; i++) {
                Py_INCREF(items[i]);
                PyTuple_SET_ITEM(result, i, items[i]);
            }
        }
    } else {
        PyObject *argv[4] = {scores, labels, scores_l, r->ref};
        result = PyObject_Vectorcall(r->cls, argv, 4, NULL);
    }
    if (result != NULL && row + B == r->rows) {
        PyObject *done = PyObject_CallMethodNoArgs(r->window, str_flush);
        if (done == NULL)
            Py_CLEAR(result);
        else
            Py_DECREF(done);
    }
fail:
    Py_XDECREF(labels);
    Py_XDECREF(scores_l);
    Py_XDECREF(scores);
    return result;
}

/* The samples' float32 values when ``x`` is the runner's input: an ndarray (or subclass) of
 * float32 in native byte order, C-contiguous, of a shape fits_shape takes; else NULL. The caller's
 * reference keeps the array alive for the call. */
static const float *sample_values(Runner *r, PyObject *x) {
    if (!PyArray_Check(x))
        return NULL;
    PyArrayObject *a = (PyArrayObject *)x;
    Py_ssize_t dims[RUNNER_MAX_DIMS + 1];
    int nd = PyArray_NDIM(a);
    if (PyArray_TYPE(a) != NPY_FLOAT32 || !PyArray_ISCARRAY_RO(a) || !PyArray_ISNOTSWAPPED(a) ||
        nd > RUNNER_MAX_DIMS + 1)
        return NULL;
    for (int i = 0; i < nd; i++)
        dims[i] = (Py_ssize_t)PyArray_DIMS(a)[i];
    return fits_shape(r, nd, dims) ? (const float *)PyArray_DATA(a) : NULL;
}

/* predict(x) -> Prediction | None
 * None, with nothing written, when the runner is not bound, ``x`` is not its input (float32,
 * C-contiguous, (batch, *shape), or the bare shape for a batch of one), or holds NaN/infinity: the
 * caller takes the general path, which says what is wrong and counts it. */
static PyObject *runner_predict(Runner *r, PyObject *x_obj) {
    if (r->mode == BIND_NONE)
        Py_RETURN_NONE;
    const float *v = sample_values(r, x_obj);
    if (v == NULL)
        Py_RETURN_NONE;
    /* bind() may run while we wait for the lock: hold the lock's methods we call */
    PyObject *acquire = r->acquire, *release = r->release, *result = NULL;
    Py_INCREF(acquire);
    Py_INCREF(release);
    PyObject *got = PyObject_CallNoArgs(acquire);
    Py_DECREF(acquire);
    if (got == NULL) {
        Py_DECREF(release);
        return NULL;
    }
    Py_DECREF(got);
    if (r->mode == BIND_NONE) { /* unbound while we waited (a model switch) */
        result = Py_None;
        Py_INCREF(result);
    } else {
        result = predict_locked(r, v);
    }
    /* release even when predict_locked failed, keeping its exception */
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    got = PyObject_CallNoArgs(release);
    Py_DECREF(release);
    if (got == NULL) {
        Py_XDECREF(et);
        Py_XDECREF(ev);
        Py_XDECREF(tb);
        Py_XDECREF(result);
        return NULL;
    }
    Py_DECREF(got);
    PyErr_Restore(et, ev, tb);
    return result;
}

static PyObject *runner_get_rows(Runner *r, void *Py_UNUSED(closure)) { return PyLong_FromSsize_t(r->rows); }
static PyObject *runner_get_batch(Runner *r, void *Py_UNUSED(closure)) { return PyLong_FromSsize_t(r->batch); }

static PyMethodDef runner_methods[] = {
    {"predict", (PyCFunction)runner_predict, METH_O,
     "predict(x) -> Prediction or None: one float32 sample (or batch) through the model, under the lock"},
    {"bind", (PyCFunction)runner_bind, METH_VARARGS,
     "bind(window, lock, next, feats, scores, latencies, pending, cls, labels, ref)"},
    {"unbind", (PyCFunction)runner_unbind_py, METH_NOARGS, "let go of the window (predict returns None)"},
    {"close", (PyCFunction)runner_close, METH_NOARGS, "unbind for good and let go of the interpreter"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef runner_getset[] = {
    {"rows", (getter)runner_get_rows, NULL, "rows of the bound window (0 when unbound)", NULL},
    {"batch", (getter)runner_get_batch, NULL, "samples per run", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject RunnerType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "device_agent._kernels.Runner",
    .tp_basicsize = sizeof(Runner),
    .tp_dealloc = (destructor)runner_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Runner(invoke, inp, out, shape, scale, zero_point, qmin, qmax, table, batch=1)",
    .tp_methods = runner_methods,
    .tp_getset = runner_getset,
    .tp_new = runner_new,
};

/* parse_floats(src: bytes, dst: float32) -> n, or -1: the numbers of a JSON array text (nested
 * arrays of plain JSON numbers, e.g. "[[1, 2.5], [-3e-2, 0]]") into dst, in order, each converted
 * as the decimal -> nearest double -> nearest float32 that json.loads + numpy.asarray(..., float32)
 * give. -1 whenever it cannot be sure: a token that is not a strict JSON number, two numbers
 * without a comma between them, more than dst holds, a number with more than 19 significant digits
 * or an exponent beyond +-27, a value outside float32's normal range, or one so close to halfway
 * between two float32 values that the double in between decides (the caller then takes its
 * general JSON path, which decides those). The brackets and commas themselves are the caller's to
 * check (kernels.py). The arithmetic: the digits as an exact 64-bit integer, times or divided by an
 * exact power of ten in long double (one rounding), then float; without a long double of at least
 * 64 mantissa bits (32-bit ARM) it always returns -1. */
static long double POW10_LD[28];

static Py_ssize_t parse_floats_into(const char *s, Py_ssize_t len, float *out, Py_ssize_t cap) {
#if LDBL_MANT_DIG >= 64
    Py_ssize_t i = 0, n = 0;
    int want_value = 1; /* after '[' or ',' (or at the start): a number may come */
    while (i < len) {
        char c = s[i];
        if (c == ' ' || c == '\t' || c == '\r' || c == '\n' || c == '[') {
            if (c == '[' && !want_value)
                return -1;
            i++;
            continue;
        }
        if (c == ',' || c == ']') {
            if (want_value)
                return -1;
            if (c == ',')
                want_value = 1;
            i++;
            continue;
        }
        if (!want_value || n >= cap)
            return -1;
        /* a strict JSON number: -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)? */
        int neg = 0, digits = 0, exp10 = 0;
        uint64_t m = 0;
        if (s[i] == '-') {
            neg = 1;
            i++;
        }
        if (i >= len || s[i] < '0' || s[i] > '9')
            return -1;
        if (s[i] == '0') {
            i++;
        } else {
            while (i < len && s[i] >= '0' && s[i] <= '9') {
                if (digits >= 19)
                    return -1;
                m = m * 10 + (uint64_t)(s[i] - '0');
                digits++;
                i++;
            }
        }
        if (i < len && s[i] == '.') {
            i++;
            if (i >= len || s[i] < '0' || s[i] > '9')
                return -1;
            while (i < len && s[i] >= '0' && s[i] <= '9') {
                if (m == 0 && s[i] == '0') { /* leading zeros of a fraction are not significant */
                    exp10--;
                } else {
                    if (digits >= 19)
                        return -1;
                    m = m * 10 + (uint64_t)(s[i] - '0');
                    digits++;
                    exp10--;
                }
                i++;
            }
        }
        if (i < len && (s[i] == 'e' || s[i] == 'E')) {
            int eneg = 0, e = 0, edigits = 0;
            i++;
            if (i < len && (s[i] == '+' || s[i] == '-')) {
                eneg = s[i] == '-';
                i++;
            }
            while (i < len && s[i] >= '0' && s[i] <= '9') {
                if (++edigits > 4)
                    return -1;
                e = e * 10 + (s[i] - '0');
                i++;
            }
            if (edigits == 0)
                return -1;
            exp10 += eneg ? -e : e;
        }
        if (i < len && s[i] != ' ' && s[i] != '\t' && s[i] != '\r' && s[i] != '\n' && s[i] != ','
            && s[i] != ']')
            return -1;
        float f;
        if (m == 0) {
            f = neg ? -0.0f : 0.0f;
        } else {
            if (exp10 > 27 || exp10 < -27)
                return -1;
            long double x = (long double)m; /* exact: m < 2^64 */
            x = exp10 >= 0 ? x * POW10_LD[exp10] : x / POW10_LD[-exp10];
            if (x < (long double)FLT_MIN || x > (long double)FLT_MAX)
                return -1;
            f = (float)x;
            /* x is within 2^-63 (relative) of the decimal; the double json.loads makes is within
             * 2^-53. Unless x is within 2^-50 of halfway between two floats, both round to f. */
            long double d = x - (long double)f;
            if (d != 0) {
                long double ulp = (long double)nextafterf(f, d > 0 ? INFINITY : 0.0f) - (long double)f;
                long double gap = fabsl(ulp) / 2 - fabsl(d);
                if (gap <= x * 0x1p-50L)
                    return -1;
            }
            if (neg)
                f = -f;
        }
        out[n++] = f;
        want_value = 0;
    }
    return want_value ? -1 : n;
#else
    (void)s;
    (void)len;
    (void)out;
    (void)cap;
    return -1;
#endif
}

static PyObject *k_parse_floats(PyObject *self, PyObject *args) {
    Py_buffer src, dst;
    PyObject *dst_obj;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*O", &src, &dst_obj))
        return NULL;
    if (get_typed(dst_obj, &dst, 'f', -1, 1, "dst") < 0) {
        PyBuffer_Release(&src);
        return NULL;
    }
    Py_ssize_t n;
    Py_BEGIN_ALLOW_THREADS
    n = parse_floats_into((const char *)src.buf, src.len, (float *)dst.buf, dst.len / 4);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return PyLong_FromSsize_t(n);
}

static PyMethodDef methods[] = {
    {"summary", k_summary, METH_VARARGS, "summary(src) -> (min, max, sum, sumsq) of a float32 buffer"},
    {"quantize", k_quantize, METH_VARARGS,
     "quantize(src, scale, zero_point, qmin, qmax, dst) -> summary(src); writes 8-bit codes to dst"},
    {"store_row", k_store_row, METH_VARARGS,
     "store_row(scores, rows, row, latencies, latency) -> (argmax, max); copies scores into rows[row]"},
    {"decode_row", k_decode_row, METH_VARARGS,
     "decode_row(raw, table, out, rows, row, latencies, latency) -> (argmax, max); table-decodes raw into out"},
    {"fold_outputs", k_fold_outputs, METH_VARARGS,
     "fold_outputs(scores, class_counts, confidence) -> bool: top-1 counts and confidences of probabilities"},
    {"parse_floats", k_parse_floats, METH_VARARGS,
     "parse_floats(src, dst) -> n or -1: the numbers of a JSON array text into a float32 buffer"},
    {"profile_update", k_profile_update, METH_VARARGS,
     "profile_update(x, edges, nedges, counts, count, nan_count, min, max, mean, m2): add a batch"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__kernels(void) {
    import_array();
    POW10_LD[0] = 1.0L;
    for (int k = 1; k < 28; k++)
        POW10_LD[k] = POW10_LD[k - 1] * 10.0L;
    str_flush = PyUnicode_InternFromString("flush");
    if (str_flush == NULL || PyType_Ready(&RunnerType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    /* always 1 now (the one variant); kept so that a check of it keeps working */
    if (PyModule_AddIntConstant(m, "NUMPY_API", 1) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&RunnerType);
    if (PyModule_AddObject(m, "Runner", (PyObject *)&RunnerType) < 0) {
        Py_DECREF(&RunnerType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
