/* The agent's per-sample hot path in one pass each: see device_agent/kernels.py, which documents
 * these functions, checks their arguments and holds the numpy fallbacks they must agree with.
 *
 * Only the Python C API and the buffer protocol are used (no numpy headers), so building needs a C
 * compiler and the Python headers and nothing else. Arithmetic is plain IEEE float/double: build
 * without -ffast-math, or quantization stops matching numpy's divide + rint + clip.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

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

/* Macros rather than functions: a function taking 32-byte vectors makes GCC print ABI notes. */
#define LOAD8(dst, p) memcpy(&(dst), (p), sizeof(v8f))
#define VSEL(m, a, b) ((v8f)(((v8i)(a) & (m)) | ((v8i)(b) & ~(m)))) /* m ? a : b, lane by lane */

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
    if (qmin < 0)
        quantize_i8(v, n, scale, zp, lo, hi, (int8_t *)dst.buf);
    else
        quantize_u8(v, n, scale, zp, lo, hi, (uint8_t *)dst.buf);
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
        const unsigned char *q = (const unsigned char *)raw.buf;
        const float *table = (const float *)lut.buf;
        float *v = (float *)out.buf;
        for (Py_ssize_t i = 0; i < k; i++)
            v[i] = table[q[i]];
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


/* Feature j of a batch (N, F) row-major: its histogram, NaN count and, over its finite values,
 * count, sum, M2 about the batch mean, min and max (out[0..3] = sum, M2, min, max; returns the
 * count). ``col`` and ``cnt`` are N-long scratch. Sums run over rows in order, as numpy's axis-0
 * sums do, so they are numpy's bit for bit. A value's bin (the number of edges <= it) is counted
 * with one branch-free pass per edge, which vectorizes. */
HOT static int64_t profile_feature(const double *x, Py_ssize_t N, Py_ssize_t F, Py_ssize_t j, const double *e,
                                   Py_ssize_t ne, int64_t *c, int64_t *nan_count, double *col, int64_t *cnt,
                                   double out[4]) {
    int64_t nb = 0, bad = 0;
    double s = 0.0, bmin = INFINITY, bmax = -INFINITY;
    for (Py_ssize_t r = 0; r < N; r++) {
        double v = x[r * F + j];
        col[r] = v;
        cnt[r] = 0;
        if (!isfinite(v)) {
            bad++;
            continue;
        }
        nb++;
        s += v;
        bmin = v < bmin ? v : bmin;
        bmax = v > bmax ? v : bmax;
    }
    for (Py_ssize_t k = 0; k < ne; k++) {
        const double ek = e[k];
        for (Py_ssize_t r = 0; r < N; r++)
            cnt[r] += col[r] >= ek;
    }
    const double last = e[ne - 1];
    double bm2 = 0.0, bmean = nb ? s / (double)nb : 0.0;
    for (Py_ssize_t r = 0; r < N; r++) {
        double v = col[r];
        if (!isfinite(v))
            continue;
        Py_ssize_t idx = (Py_ssize_t)cnt[r];
        if (idx == ne && v == last) /* the last edge belongs to the last bin */
            idx--;
        c[idx]++;
        double d = v - bmean;
        bm2 += d * d;
    }
    *nan_count += bad;
    out[0] = s;
    out[1] = bm2;
    out[2] = bmin;
    out[3] = bmax;
    return nb;
}

/* profile_update(x (n, F) float64, edges (F, E) float64, nedges (F,) int64, counts (F, E + 1) int64,
 *                count, nan_count (F,) int64, min, max, mean, m2 (F,) float64)
 * The numpy definition is device_agent.stats.FeatureSetProfile.update: a value's bin is the number
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
        double *col = PyMem_Malloc((size_t)(N ? N : 1) * sizeof(double));
        int64_t *cnt = PyMem_Malloc((size_t)(N ? N : 1) * sizeof(int64_t));
        if (col == NULL || cnt == NULL) {
            PyMem_Free(col);
            PyMem_Free(cnt);
            PyErr_NoMemory();
            goto done;
        }
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t j = 0; j < F; j++) {
            double o4[4];
            int64_t nb = profile_feature(x, N, F, j, edges + j * E, (Py_ssize_t)nedges[j], counts + j * (E + 1),
                                         nan_count + j, col, cnt, o4);
            if (nb == 0)
                continue;
            double na = (double)count[j], nbd = (double)nb, n = na + nbd;
            double d = o4[0] / nbd - mean[j];
            mean[j] = mean[j] + d * nbd / n;
            m2[j] = m2[j] + o4[1] + d * d * na * nbd / n;
            count[j] += nb;
            mn[j] = fmin(mn[j], o4[2]);
            mx[j] = fmax(mx[j], o4[3]);
        }
        Py_END_ALLOW_THREADS
        PyMem_Free(col);
        PyMem_Free(cnt);
        result = Py_None;
        Py_INCREF(result);
    }
done:
    while (--got >= 0)
        PyBuffer_Release(&b[got]);
    return result;
}

static PyMethodDef methods[] = {
    {"summary", k_summary, METH_VARARGS, "summary(src) -> (min, max, sum, sumsq) of a float32 buffer"},
    {"quantize", k_quantize, METH_VARARGS,
     "quantize(src, scale, zero_point, qmin, qmax, dst) -> summary(src); writes 8-bit codes to dst"},
    {"store_row", k_store_row, METH_VARARGS,
     "store_row(scores, rows, row, latencies, latency) -> (argmax, max); copies scores into rows[row]"},
    {"decode_row", k_decode_row, METH_VARARGS,
     "decode_row(raw, table, out, rows, row, latencies, latency) -> (argmax, max); table-decodes raw into out"},
    {"profile_update", k_profile_update, METH_VARARGS,
     "profile_update(x, edges, nedges, counts, count, nan_count, min, max, mean, m2): add a batch"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
