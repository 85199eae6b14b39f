/* EventsTokenizer.encode_batch, compiled: for a batch of pieces, the grid (onset and duration
 * steps, velocity bin, instrument), the canonical order (one packed key a note, sorted) and the ids.
 * The NumPy code in tokenizers/events.py (_grid, _batch_order, _emit_numpy) stays the reference, and the
 * path for a batch this code declines; the tests check both give the same ids on every shared file.
 *
 * Only the buffer protocol is used (no NumPy headers).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    int64_t max_shift, shift_base, bar_id, velocity_bins, velocity_base, pitch_base, duration_base;
    int has_ins, bars, head;
} Rule;

/* sort int64 keys ascending: a natural merge sort (the notes of a piece come as a few sorted runs,
 * one a track), O(n log runs); tmp and bounds hold n and n + 1 items */
static void sort_keys(int64_t *a, int64_t *tmp, int64_t *bounds, int64_t n) {
    if (n < 2) return;
    int64_t runs = 0;
    bounds[runs++] = 0;
    for (int64_t i = 1; i < n; i++)
        if (a[i] < a[i - 1]) bounds[runs++] = i;
    bounds[runs] = n;
    int64_t *src = a, *dst = tmp;
    while (runs > 1) {
        int64_t out_runs = 0;
        for (int64_t r = 0; r < runs; r += 2) {
            int64_t lo = bounds[r], mid = bounds[r + 1], hi = (r + 2 <= runs) ? bounds[r + 2] : bounds[r + 1];
            int64_t i = lo, j = mid, k = lo;
            if (r + 1 >= runs) { mid = hi = bounds[r + 1]; j = mid; }
            while (i < mid && j < hi) dst[k++] = (src[j] < src[i]) ? src[j++] : src[i++];
            while (i < mid) dst[k++] = src[i++];
            while (j < hi) dst[k++] = src[j++];
            bounds[out_runs++] = lo;
        }
        bounds[out_runs] = n;
        runs = out_runs;
        int64_t *t = src; src = dst; dst = t;
    }
    if (src != a) memcpy(a, src, sizeof(int64_t) * n);
}

/* bits that hold every value below n (n >= 1) */
static int bits_for(int64_t n) {
    int b = 0;
    while (b < 62 && (INT64_C(1) << b) < n) b++;
    return b;
}

typedef struct { int32_t *buf; int64_t len, cap; } Out;

static int grow(Out *o, int64_t need) {
    if (o->len + need <= o->cap) return 0;
    int64_t cap = o->cap ? o->cap : 1024;
    while (cap < o->len + need) cap *= 2;
    int32_t *b = PyMem_RawRealloc(o->buf, sizeof(int32_t) * cap);
    if (!b) return -1;
    o->buf = b;
    o->cap = cap;
    return 0;
}

/* does a buffer format string say one native little-endian item of this kind */
static int format_is(const char *fmt, const char *chars) {
    if (!fmt) return 0;
    if (*fmt == '@' || *fmt == '=' || *fmt == '<') fmt++;
    return fmt[0] != '\0' && fmt[1] == '\0' && strchr(chars, fmt[0]) != NULL;
}

#define LIMIT32 (INT64_C(1) << 31)

/* encode(offsets, start, duration, pitch, velocity, program, tempo_ids, bar_steps, grid, rule, per_piece)
 *   start/duration: float64 quarters; pitch/velocity/program: int16; offsets, tempo_ids, bar_steps,
 *   per_piece (out): int64.  grid = (steps_per_quarter, max_duration_steps, velocity_bins, programs,
 *   drums), rule = (max_shift, shift_base, bar_id, velocity_bins, velocity_base, pitch_base,
 *   duration_base, has_ins, bars, head, instrument ids).  Returns a bytearray of int32 ids, or None
 *   if a note cannot take the packed sort key (pitch outside 0..127, program outside 0..128, a
 *   piece too long, a grid too fine for the key, an onset or duration too large for int64): the
 *   caller then takes the NumPy path, which handles those.  Every argument is checked before
 *   anything is written: TypeError for a buffer of the wrong item type, ValueError for sizes,
 *   offsets or rules that do not agree, and for a start or duration that is not finite (NaN, inf).
 *   The offsets are copied before they are checked; per_piece is written once, at the end, from a
 *   private copy (it may share memory with an input). */
static PyObject *encode(PyObject *self, PyObject *args) {
    PyObject *o[8], *grid_t, *rule_t, *per_o;
    if (!PyArg_ParseTuple(args, "OOOOOOOOOOO", &o[0], &o[1], &o[2], &o[3], &o[4], &o[5], &o[6], &o[7], &grid_t,
                          &rule_t, &per_o))
        return NULL;
    long long spq, max_dur, vel_bins;
    int programs, drums;
    if (!PyTuple_Check(grid_t) || !PyTuple_Check(rule_t)) {
        PyErr_SetString(PyExc_TypeError, "encode: grid and rule are tuples");
        return NULL;
    }
    if (!PyArg_ParseTuple(grid_t, "LLLii", &spq, &max_dur, &vel_bins, &programs, &drums)) return NULL;
    Rule r;
    PyObject *ins_o;
    if (!PyArg_ParseTuple(rule_t, "LLLLLLLiiiO", &r.max_shift, &r.shift_base, &r.bar_id, &r.velocity_bins,
                          &r.velocity_base, &r.pitch_base, &r.duration_base, &r.has_ins, &r.bars, &r.head, &ins_o))
        return NULL;
    Py_buffer v[10];
    memset(v, 0, sizeof(v));
    PyObject *objs[10] = {o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7], ins_o, per_o};
    const Py_ssize_t item[10] = {8, 8, 8, 2, 2, 2, 8, 8, 8, 8};
    const char *kinds[10] = {"ql", "d", "d", "h", "h", "h", "ql", "ql", "ql", "ql"};
    const char *names[10] = {"offsets", "start", "duration", "pitch", "velocity", "program", "tempo_ids", "bar_steps",
                             "instrument ids", "per_piece"};
    int ok = 1;
    for (int k = 0; k < 10 && ok; k++) {
        int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (k == 9 ? PyBUF_WRITABLE : 0);
        if (PyObject_GetBuffer(objs[k], &v[k], flags) < 0) {
            v[k].obj = NULL;
            ok = 0;
            if (PyErr_ExceptionMatches(PyExc_BufferError)) {  /* e.g. bytes for per_piece */
                PyErr_Clear();
                PyErr_Format(PyExc_TypeError, "encode: %s: a %sC-contiguous buffer is needed", names[k],
                             k == 9 ? "writable " : "");
            }
            break;
        }
        if (v[k].itemsize != item[k] || !format_is(v[k].format, kinds[k])) {
            PyErr_Format(PyExc_TypeError, "encode: %s: expected items of format '%c', got '%s'", names[k], kinds[k][0],
                         v[k].format ? v[k].format : "B");
            ok = 0;
        }
    }
    Py_ssize_t n_pieces = ok ? v[0].len / 8 - 1 : 0, n_notes = ok ? v[1].len / 8 : 0;
    if (ok && (n_pieces < 0 || v[2].len / 8 != n_notes || v[3].len / 2 != n_notes || v[4].len / 2 != n_notes
               || v[5].len / 2 != n_notes || v[6].len / 8 != n_pieces || (r.bars && v[7].len / 8 != n_pieces)
               || v[8].len / 8 != 129 || v[9].len / 8 != n_pieces)) {
        PyErr_SetString(PyExc_ValueError, "encode: inconsistent arguments (column lengths)");
        ok = 0;
    }
    /* the rule's numbers: in ranges where no sum below can overflow */
    if (ok && (spq < 1 || max_dur < 1 || vel_bins < 0 || r.max_shift < 1 || r.max_shift >= LIMIT32
               || r.shift_base <= -LIMIT32 || r.shift_base >= LIMIT32 || r.bar_id <= -LIMIT32 || r.bar_id >= LIMIT32
               || r.velocity_base <= -LIMIT32 || r.velocity_base >= LIMIT32 || r.pitch_base <= -LIMIT32
               || r.pitch_base >= LIMIT32 || r.duration_base <= -LIMIT32 || r.duration_base >= LIMIT32)) {
        PyErr_SetString(PyExc_ValueError, "encode: inconsistent arguments (grid or rule out of range)");
        ok = 0;
    }
    /* the offsets, copied: the loops below trust them, and with the GIL released another thread
     * could change the caller's array; per_piece (written at the end) gets room here too */
    int64_t *own = ok ? PyMem_Malloc(sizeof(int64_t) * (2 * (size_t)n_pieces + 1)) : NULL;
    if (ok && !own) { PyErr_NoMemory(); ok = 0; }
    if (ok) memcpy(own, v[0].buf, sizeof(int64_t) * ((size_t)n_pieces + 1));
    const int64_t *off = own;
    if (ok && (off[0] != 0 || off[n_pieces] != n_notes)) { PyErr_SetString(PyExc_ValueError, "encode: bad offsets"); ok = 0; }
    for (Py_ssize_t p = 0; ok && p < n_pieces; p++)
        if (off[p + 1] < off[p]) { PyErr_SetString(PyExc_ValueError, "encode: offsets decrease"); ok = 0; }
    const double *start = ok ? v[1].buf : NULL, *duration = ok ? v[2].buf : NULL;
    for (Py_ssize_t i = 0; ok && i < n_notes; i++)
        if (!isfinite(start[i]) || !isfinite(duration[i])) {
            PyErr_Format(PyExc_ValueError, "encode: note %zd: its start or duration is not finite (NaN or inf)", i);
            ok = 0;
        }
    int64_t *per_piece = own ? own + n_pieces + 1 : NULL;
    if (!ok) {
        PyMem_Free(own);
        for (int k = 0; k < 10; k++) if (v[k].obj) PyBuffer_Release(&v[k]);
        return NULL;
    }
    const int16_t *pitch = v[3].buf, *velocity = v[4].buf, *program = v[5].buf;
    const int64_t *tempo = v[6].buf, *steps = v[7].buf, *ins = v[8].buf;
    int64_t longest = 0;
    for (Py_ssize_t p = 0; p < n_pieces; p++) if (off[p + 1] - off[p] > longest) longest = off[p + 1] - off[p];
    int64_t *keys = PyMem_RawMalloc(sizeof(int64_t) * (3 * longest + 1));
    Out out = {NULL, 0, 0};
    int code = keys ? 0 : -1;  /* 0 ok, -1 no memory, 1 fall back to NumPy */
    /* the packed key: onset | program (8 bits) | pitch (7) | duration steps | velocity bin, each field in
     * bits of its own, so that keys sort as (onset, program, pitch, duration, velocity) tuples do and
     * unpack with shifts and masks (no 64-bit divisions) */
    const int VBB = bits_for(vel_bins > 0 ? vel_bins : 1), DB = max_dur < (INT64_C(1) << 40) ? bits_for(max_dur + 1) : 62;
    const int PITCH_AT = VBB + DB, PROG_AT = PITCH_AT + 7, ON_AT = PROG_AT + 8;
    if (ON_AT > 40) code = 1;  /* too many bits for the grid: NumPy; also keeps vel_bins, max_dur < 2**25 */
    /* onsets and durations in steps, computed in double and range-checked before any conversion */
    const double on_limit = ON_AT <= 40 ? (double)(INT64_C(1) << (62 - ON_AT)) : 0.0, d_limit = 0x1p62;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t p = 0; p < n_pieces && code == 0; p++) {
        int64_t m = 0;
        for (int64_t i = off[p]; i < off[p + 1]; i++) {
            int64_t prog = program[i];
            if (!drums && prog == 128) continue;
            if (!programs) prog = prog == 128 ? 128 : 0;
            double on_f = floor(start[i] * (double)spq + 0.5), d_f = floor(duration[i] * (double)spq + 0.5);
            if (!(on_f < on_limit) || !(d_f < d_limit && d_f > -d_limit) || pitch[i] < 0 || pitch[i] > 127 || prog < 0
                || prog > 128) {
                code = 1;  /* NaN/inf cannot get here (checked above); too large: NumPy's rules */
                break;
            }
            int64_t on = on_f < 0 ? 0 : (int64_t)on_f;
            int64_t d = (int64_t)d_f;
            d = d < 1 ? 1 : (d > max_dur ? max_dur : d);
            int64_t vb = 0;
            if (vel_bins > 0) {
                int64_t vv = velocity[i] < 1 ? 1 : (velocity[i] > 127 ? 127 : velocity[i]);
                vb = (vv - 1) * vel_bins / 127;
                if (vb > vel_bins - 1) vb = vel_bins - 1;
            }
            keys[m++] = (on << ON_AT) | (prog << PROG_AT) | ((int64_t)pitch[i] << PITCH_AT) | (d << VBB) | vb;
        }
        if (code) break;
        sort_keys(keys, keys + longest, keys + 2 * longest, m);
        if (grow(&out, 3 + 6 * m)) { code = -1; break; }
        int64_t begin = out.len;
        Out *o_ = &out;
#define PUT(tok) do { if (o_->len >= o_->cap && grow(o_, 64)) { code = -1; goto done; } o_->buf[o_->len++] = (int32_t)(tok); } while (0)
        PUT(1);
        if (r.head == 2) PUT(tempo[p]);
        int64_t prev_on = 0, prev_bar = -1, prev_prog = -1, prev_vel = -1;
        for (int64_t i = 0; i < m; i++) {
            int64_t key = keys[i];
            int64_t vb = key & ((INT64_C(1) << VBB) - 1), d = (key >> VBB) & ((INT64_C(1) << DB) - 1);
            int64_t pit = (key >> PITCH_AT) & 127, prog = (key >> PROG_AT) & 255, on = key >> ON_AT;
            int first = (i == 0);
            int64_t rest = on - prev_on;
            if (r.bars) {
                int64_t st = steps[p] > 0 ? steps[p] : 1;
                int64_t bar = on / st;
                for (int64_t b = prev_bar; b < bar; b++) PUT(r.bar_id);
                if (bar - prev_bar > 0) rest = on - bar * st;
                prev_bar = bar;
            }
            int64_t n_shift = (rest + r.max_shift - 1) / r.max_shift;
            for (int64_t k = 1; k < n_shift; k++) PUT(r.shift_base + r.max_shift);
            if (n_shift > 0) PUT(r.shift_base + (rest - r.max_shift * (n_shift - 1)));
            if (r.has_ins && (first || prog != prev_prog)) PUT(ins[prog]);
            if (r.velocity_bins > 0 && (first || vb != prev_vel)) PUT(r.velocity_base + vb);
            PUT(r.pitch_base + pit);
            PUT(r.duration_base + d);
            prev_on = on;
            prev_prog = prog;
            prev_vel = vb;
        }
        PUT(2);
#undef PUT
        per_piece[p] = out.len - begin;
    }
done:;
    Py_END_ALLOW_THREADS
    PyMem_RawFree(keys);
    if (code == 0 && n_pieces) memcpy(v[9].buf, per_piece, sizeof(int64_t) * n_pieces);
    PyMem_Free(own);
    for (int k = 0; k < 10; k++) PyBuffer_Release(&v[k]);
    if (code == -1) { PyMem_RawFree(out.buf); return PyErr_NoMemory(); }
    if (code == 1) { PyMem_RawFree(out.buf); Py_RETURN_NONE; }
    PyObject *result = PyByteArray_FromStringAndSize((const char *)out.buf, (Py_ssize_t)(sizeof(int32_t) * out.len));
    PyMem_RawFree(out.buf);
    return result;
}

static PyMethodDef methods[] = {
    {"encode", encode, METH_VARARGS, "Grid, canonical order and ids of every piece; a bytearray of int32, or None."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_events", "EventsTokenizer.encode_batch, compiled.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__events(void) { return PyModule_Create(&module); }
