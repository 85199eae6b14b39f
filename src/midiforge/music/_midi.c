/* The bulk step of read_midi_batch, compiled: symusic's serialized Scores (its pickle state, the
 * zpp_bits layout described in readers.py) of a whole batch into note columns, in two passes:
 *
 *   scan(states, first_only, max_notes, meta)   -> notes to keep in all; meta: one row of META ints a file
 *   fill(states, first_only, meta, start, duration, pitch, velocity, program, track, facts)
 *        -> the kept notes of every file still OK (float64 start/duration in quarters, ticks times
 *           1.0/tpq exactly as NumPy computes them; int16 the rest) and per piece (qpm, seconds,
 *           end tick) as float64
 *
 * Python checks each file's scanned ticks_per_quarter, track and note counts against its Score
 * between the two passes and sets the status of a file that does not agree to LAYOUT (the file is
 * then read through symusic's .numpy(), in Python).  Only the buffer protocol is used.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

enum { OK = 0, LAYOUT = 1, TOO_LONG = 2, NO_NOTES = 3 };
enum { M_STATUS, M_TPQ, M_TRACKS, M_NOTES_ALL, M_KEPT, M_TS_NUM, M_TS_DEN, M_TEMPOS, META };
#define MAX_TRACKS 65536

typedef struct { const uint8_t *p; Py_ssize_t n, pos; int bad; } Reader;

static uint32_t u32(Reader *r) {
    if (r->bad || r->pos + 4 > r->n) { r->bad = 1; return 0; }
    uint32_t v;
    memcpy(&v, r->p + r->pos, 4);
    r->pos += 4;
    return v;
}
static void skip(Reader *r, uint64_t bytes) {
    if (r->bad || bytes > (uint64_t)(r->n - r->pos)) { r->bad = 1; return; }
    r->pos += (Py_ssize_t)bytes;
}
static void skip_texts(Reader *r) {
    uint32_t count = u32(r);
    for (uint32_t i = 0; i < count && !r->bad; i++) { skip(r, 4); skip(r, u32(r)); }
}

typedef struct { Py_ssize_t notes_at; uint32_t count; uint8_t program, drum; } Track;
typedef struct {
    int32_t tpq; uint32_t n_tracks; Track *tracks;
    Py_ssize_t tempos_at, ts_at; uint32_t n_tempos, n_ts;
} Layout;

/* the layout of one state buffer; 0, or -1 if it does not fit (tracks: MAX_TRACKS slots) */
static int layout(const uint8_t *p, Py_ssize_t n, Layout *l) {
    Reader r = {p, n, 0, 0};
    l->tpq = (int32_t)u32(&r);
    l->n_tracks = u32(&r);
    if (r.bad || l->n_tracks > MAX_TRACKS) return -1;
    for (uint32_t t = 0; t < l->n_tracks; t++) {
        skip(&r, u32(&r));  /* name */
        if (r.bad || r.pos + 2 > n) return -1;
        l->tracks[t].program = p[r.pos];
        l->tracks[t].drum = p[r.pos + 1];
        r.pos += 2;
        l->tracks[t].count = u32(&r);
        l->tracks[t].notes_at = r.pos;
        skip(&r, 12ull * l->tracks[t].count);
        for (int k = 0; k < 3; k++) skip(&r, 8ull * u32(&r));  /* controls, pitch bends, pedals */
        skip_texts(&r);                                        /* lyrics */
    }
    l->n_ts = u32(&r);
    l->ts_at = r.pos;
    skip(&r, 8ull * l->n_ts);
    skip(&r, 8ull * u32(&r));  /* key signatures */
    l->n_tempos = u32(&r);
    l->tempos_at = r.pos;
    skip(&r, 8ull * l->n_tempos);
    skip_texts(&r);            /* markers */
    return (r.bad || r.pos != n) ? -1 : 0;
}

/* which tracks to read: all, or (first_only) every track of the first pitched program, like
 * music21's partitionByInstrument()[0]; the same rule as midi_columns._keep_tracks */
static int keep(const Layout *l, uint32_t t, int first_only, int *first_program) {
    const Track *tr = &l->tracks[t];
    if (tr->count == 0) return 0;
    if (!first_only) return 1;
    if (tr->drum) return 0;
    if (*first_program < 0) *first_program = tr->program;
    return tr->program == *first_program;
}

typedef struct { Py_buffer *views; Py_ssize_t n; Track *tracks; } States;

static void release_states(States *s) {
    for (Py_ssize_t i = 0; i < s->n; i++) if (s->views[i].obj) PyBuffer_Release(&s->views[i]);
    PyMem_Free(s->views);
    PyMem_Free(s->tracks);
}

/* a list of bytes objects (immutable, so nothing can change them while the GIL is released) */
static int get_states(PyObject *list, States *s, int with_tracks) {
    memset(s, 0, sizeof(*s));
    if (!PyList_Check(list)) { PyErr_SetString(PyExc_TypeError, "states: a list of bytes"); return -1; }
    Py_ssize_t n = PyList_GET_SIZE(list);
    for (Py_ssize_t i = 0; i < n; i++)
        if (!PyBytes_Check(PyList_GET_ITEM(list, i))) {
            PyErr_Format(PyExc_TypeError, "states[%zd]: bytes, not %.100s", i, Py_TYPE(PyList_GET_ITEM(list, i))->tp_name);
            return -1;
        }
    s->views = PyMem_Calloc(n > 0 ? n : 1, sizeof(Py_buffer));
    s->tracks = with_tracks ? PyMem_Malloc(sizeof(Track) * MAX_TRACKS) : NULL;
    if (!s->views || (with_tracks && !s->tracks)) { release_states(s); PyErr_NoMemory(); return -1; }
    for (Py_ssize_t i = 0; i < n; i++) {
        /* the list holds a reference to each item; it cannot change while we hold the GIL, and each
         * view holds a reference of its own after that */
        if (PyObject_GetBuffer(PyList_GET_ITEM(list, i), &s->views[i], PyBUF_SIMPLE) < 0) {
            release_states(s);
            return -1;
        }
        s->n = i + 1;
    }
    return 0;
}

/* does a buffer format string say one native little-endian item of this kind (x86/ARM little-endian) */
static int format_is(const char *fmt, const char *chars) {
    if (!fmt) return 0;
    if (*fmt == '@' || *fmt == '=' || *fmt == '<') fmt++;
    return fmt[0] != '\0' && fmt[1] == '\0' && strchr(chars, fmt[0]) != NULL;
}

/* a C-contiguous buffer of exactly `items` items of the given kind (int64: "ql", float64: "d",
 * int16: "h"); writable if asked.  TypeError for the wrong kind, ValueError for the wrong size. */
static int get_buf(PyObject *obj, Py_buffer *view, Py_ssize_t items, Py_ssize_t itemsize, const char *kinds,
                   int writable, const char *name) {
    view->obj = NULL;
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0)) < 0) {
        view->obj = NULL;
        if (PyErr_ExceptionMatches(PyExc_BufferError)) {  /* e.g. bytes where an output goes */
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "%s: a %sC-contiguous buffer is needed", name, writable ? "writable " : "");
        }
        return -1;
    }
    if (view->itemsize != itemsize || !format_is(view->format, kinds)) {
        PyErr_Format(PyExc_TypeError, "%s: expected items of format '%c' (%zd bytes), got '%s'", name, kinds[0],
                     itemsize, view->format ? view->format : "B");
        PyBuffer_Release(view);
        view->obj = NULL;
        return -1;
    }
    if (items < 0 || view->len != items * itemsize) {
        PyErr_Format(PyExc_ValueError, "%s: expected %zd items, got %zd", name, items, view->len / itemsize);
        PyBuffer_Release(view);
        view->obj = NULL;
        return -1;
    }
    return 0;
}

static PyObject *scan(PyObject *self, PyObject *args) {
    PyObject *list, *meta_obj;
    int first_only;
    long long max_notes;
    if (!PyArg_ParseTuple(args, "OiLO", &list, &first_only, &max_notes, &meta_obj)) return NULL;
    States s;
    if (get_states(list, &s, 1) < 0) return NULL;
    Py_buffer mv;
    if (s.n > PY_SSIZE_T_MAX / (META * 8)) { release_states(&s); return PyErr_NoMemory(); }
    if (get_buf(meta_obj, &mv, s.n * META, 8, "ql", 1, "meta") < 0) { release_states(&s); return NULL; }
    int64_t *meta = mv.buf, total = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < s.n; i++) {
        int64_t *m = meta + i * META;
        Layout l = {.tracks = s.tracks};
        memset(m, 0, sizeof(int64_t) * META);
        if (layout(s.views[i].buf, s.views[i].len, &l) < 0) { m[M_STATUS] = LAYOUT; continue; }
        m[M_TPQ] = l.tpq;
        m[M_TRACKS] = l.n_tracks;
        int first_program = -1;
        int64_t kept = 0, all = 0;
        for (uint32_t t = 0; t < l.n_tracks; t++) {
            all += l.tracks[t].count;
            if (keep(&l, t, first_only, &first_program)) kept += l.tracks[t].count;
        }
        m[M_NOTES_ALL] = all;
        m[M_KEPT] = kept;
        m[M_TS_NUM] = 4;
        m[M_TS_DEN] = 4;
        const uint8_t *p = s.views[i].buf;
        if (l.n_ts && p[l.ts_at + 4] > 0 && p[l.ts_at + 5] > 0) {
            m[M_TS_NUM] = p[l.ts_at + 4];
            m[M_TS_DEN] = p[l.ts_at + 5];
        }
        m[M_TEMPOS] = l.n_tempos;
        if (l.tpq <= 0) m[M_STATUS] = LAYOUT;  /* never from symusic; fill divides by it */
        else m[M_STATUS] = kept == 0 ? NO_NOTES : (kept > max_notes ? TOO_LONG : OK);
        if (m[M_STATUS] == OK) total += kept;
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&mv);
    release_states(&s);
    return PyLong_FromLongLong(total);
}

/* seconds at end_tick under the tempo map, as midi_columns._seconds computes them (same sums, same order):
 * 120 qpm until a first tempo after tick 0; tempos at or after end_tick do not count */
static double seconds(const uint8_t *p, const Layout *l, int64_t end_tick) {
    double total = 0.0, m = 500000.0;
    int64_t t = 0;
    uint32_t k = 0;
    int32_t tick, mspq;
    if (l->n_tempos) {
        memcpy(&tick, p + l->tempos_at, 4);
        memcpy(&mspq, p + l->tempos_at + 4, 4);
        if (tick <= 0) { m = (double)mspq; k = 1; }
    }
    for (; k < l->n_tempos; k++) {
        memcpy(&tick, p + l->tempos_at + 8 * (Py_ssize_t)k, 4);
        memcpy(&mspq, p + l->tempos_at + 8 * (Py_ssize_t)k + 4, 4);
        if (tick >= end_tick) continue;
        total += (double)(tick - t) * m;
        t = tick;
        m = (double)mspq;
    }
    total += (double)(end_tick - t) * m;
    return total / l->tpq / 1e6;
}

static PyObject *fill(PyObject *self, PyObject *args) {
    PyObject *list, *meta_obj, *o[7];
    int first_only;
    if (!PyArg_ParseTuple(args, "OiOOOOOOOO", &list, &first_only, &meta_obj, &o[0], &o[1], &o[2], &o[3], &o[4], &o[5],
                          &o[6]))
        return NULL;
    States s;
    if (get_states(list, &s, 1) < 0) return NULL;
    Py_buffer mv, v[7];
    memset(v, 0, sizeof(v));
    if (s.n > PY_SSIZE_T_MAX / (META * 8)) { release_states(&s); return PyErr_NoMemory(); }
    if (get_buf(meta_obj, &mv, s.n * META, 8, "ql", 0, "meta") < 0) { release_states(&s); return NULL; }
    /* what fill needs of meta, copied first: meta may share memory with an output */
    int64_t *want = PyMem_Malloc(sizeof(int64_t) * 2 * (s.n > 0 ? s.n : 1));  /* per file: kept notes (-1: skip), tpq */
    if (!want) { PyBuffer_Release(&mv); release_states(&s); return PyErr_NoMemory(); }
    int64_t total = 0, pieces = 0;
    const char *bad = NULL;
    for (Py_ssize_t i = 0; i < s.n; i++) {
        const int64_t *m = (const int64_t *)mv.buf + i * META;
        want[2 * i] = -1;
        if (m[M_STATUS] != OK) continue;
        if (m[M_KEPT] < 1 || m[M_KEPT] > UINT32_MAX * (int64_t)MAX_TRACKS || m[M_KEPT] > PY_SSIZE_T_MAX / 8 - total
            || m[M_TPQ] < 1 || m[M_TPQ] > INT32_MAX) {
            bad = "fill: meta has a file OK with an impossible note count or ticks per quarter";
            break;
        }
        want[2 * i] = m[M_KEPT];
        want[2 * i + 1] = m[M_TPQ];
        total += m[M_KEPT];
        pieces++;
    }
    PyBuffer_Release(&mv);
    if (bad) { PyMem_Free(want); release_states(&s); PyErr_SetString(PyExc_ValueError, bad); return NULL; }
    const Py_ssize_t sizes[7] = {8, 8, 2, 2, 2, 2, 8};
    const char *kinds[7] = {"d", "d", "h", "h", "h", "h", "d"};
    const char *names[7] = {"start", "duration", "pitch", "velocity", "program", "track", "facts"};
    for (int k = 0; k < 7; k++)
        if (get_buf(o[k], &v[k], k == 6 ? pieces * 3 : total, sizes[k], kinds[k], 1, names[k]) < 0) {
            for (int j = 0; j < k; j++) PyBuffer_Release(&v[j]);
            PyMem_Free(want);
            release_states(&s);
            return NULL;
        }
    double *start_q = v[0].buf, *dur_q = v[1].buf;  /* in quarters: ticks * (1.0 / tpq), as NumPy computes it */
    int16_t *pitch = v[2].buf, *vel = v[3].buf, *prog = v[4].buf, *track = v[5].buf;
    double *facts = v[6].buf;  /* per piece: qpm, seconds, end tick */
    int err = 0;
    Py_BEGIN_ALLOW_THREADS
    int64_t w = 0, piece = 0;
    for (Py_ssize_t i = 0; i < s.n && !err; i++) {
        if (want[2 * i] < 0) continue;
        Layout l = {.tracks = s.tracks};
        const uint8_t *p = s.views[i].buf;
        /* every check before the file's first write: its layout, its ticks per quarter and its count
         * of kept notes as scan said, and room for them */
        if (layout(p, s.views[i].len, &l) < 0 || l.tpq != want[2 * i + 1]) { err = 1; break; }
        int first_program = -1;
        int64_t kept = 0;
        for (uint32_t t = 0; t < l.n_tracks; t++)
            if (keep(&l, t, first_only, &first_program)) kept += l.tracks[t].count;
        if (kept != want[2 * i] || w + kept > total || piece >= pieces) { err = 1; break; }
        first_program = -1;
        int64_t end_tick = 0, start = w;
        const double scale = 1.0 / (double)l.tpq;
        for (uint32_t t = 0; t < l.n_tracks; t++) {
            if (!keep(&l, t, first_only, &first_program)) continue;
            const Track *tr = &l.tracks[t];
            int16_t program = tr->drum ? 128 : tr->program;
            for (uint32_t j = 0; j < tr->count; j++, w++) {
                const uint8_t *note = p + tr->notes_at + 12 * (Py_ssize_t)j;
                int32_t nt, nd;
                memcpy(&nt, note, 4);
                memcpy(&nd, note + 4, 4);
                start_q[w] = (double)nt * scale;
                dur_q[w] = (double)nd * scale;
                pitch[w] = (int8_t)note[8];
                vel[w] = (int8_t)note[9];
                prog[w] = program;
                track[w] = (int16_t)t;
                if ((int64_t)nt + nd > end_tick || w == start) end_tick = (int64_t)nt + nd;
            }
        }
        double qpm = 120.0;
        if (l.n_tempos) {
            int32_t mspq;
            memcpy(&mspq, p + l.tempos_at + 4, 4);
            if (mspq > 0) qpm = 6e7 / (double)mspq;
        }
        facts[3 * piece] = qpm;
        facts[3 * piece + 1] = seconds(p, &l, end_tick);
        facts[3 * piece + 2] = (double)end_tick;
        piece++;
    }
    if (!err && (w != total || piece != pieces)) err = 1;
    Py_END_ALLOW_THREADS
    for (int k = 0; k < 7; k++) PyBuffer_Release(&v[k]);
    PyMem_Free(want);
    release_states(&s);
    if (err) { PyErr_SetString(PyExc_ValueError, "fill: the states or meta do not agree with scan's"); return NULL; }
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------------------------------------
 * ticks(datas, out): for each Standard MIDI File (bytes), the largest sum of delta times of one of
 * its MTrk chunks (int64), to find files whose times wrap past int32 (symusic's tick type) before
 * anyone reads them as music.  smf._smf_ticks is the same walk in Python; the rules, kept
 * simple and the same in both: chunks from after the header chunk, 8-byte heads, a length past the
 * end cut to the end; in an MTrk, events until the chunk ends, an end-of-track meta event, a
 * delta or length of more than 4 bytes, or a data byte with no running status; running status
 * is set by channel messages only; a delta counts as soon as it is read.
 * --------------------------------------------------------------------------------------------- */
static int varlen(const uint8_t *p, Py_ssize_t end, Py_ssize_t *pos, uint32_t *out) {
    uint32_t v = 0;
    for (int k = 0; k < 4; k++) {
        if (*pos >= end) return -1;
        uint8_t b = p[(*pos)++];
        v = (v << 7) | (b & 0x7f);
        if (!(b & 0x80)) { *out = v; return 0; }
    }
    return -1;
}

static int64_t track_ticks(const uint8_t *p, Py_ssize_t pos, Py_ssize_t end) {
    int64_t total = 0;
    uint8_t running = 0;
    uint32_t d, len;
    while (pos < end) {
        if (varlen(p, end, &pos, &d) < 0) break;
        total += d;
        if (pos >= end) break;
        uint8_t st = p[pos];
        if (st & 0x80) pos++;
        else if (running) st = running;
        else break;
        if (st == 0xFF) {
            if (pos >= end) break;
            uint8_t type = p[pos++];
            if (varlen(p, end, &pos, &len) < 0 || type == 0x2F) break;
            pos += (Py_ssize_t)len < end - pos ? (Py_ssize_t)len : end - pos;
        } else if (st == 0xF0 || st == 0xF7) {
            if (varlen(p, end, &pos, &len) < 0) break;
            pos += (Py_ssize_t)len < end - pos ? (Py_ssize_t)len : end - pos;
        } else if (st >= 0xF0) {
            pos += (st == 0xF2) ? 2 : (st == 0xF1 || st == 0xF3) ? 1 : 0;
        } else {
            running = st;
            pos += ((st & 0xF0) == 0xC0 || (st & 0xF0) == 0xD0) ? 1 : 2;
        }
    }
    return total;
}

static int64_t smf_ticks(const uint8_t *p, Py_ssize_t n) {
    if (n < 8 || memcmp(p, "MThd", 4) != 0) return 0;
    uint64_t pos = 8 + (((uint64_t)p[4] << 24) | ((uint64_t)p[5] << 16) | ((uint64_t)p[6] << 8) | p[7]);
    int64_t best = 0;
    while (pos + 8 <= (uint64_t)n) {
        uint64_t len = ((uint64_t)p[pos + 4] << 24) | ((uint64_t)p[pos + 5] << 16) | ((uint64_t)p[pos + 6] << 8)
                       | p[pos + 7];
        uint64_t at = pos + 8, end = at + len > (uint64_t)n ? (uint64_t)n : at + len;
        if (memcmp(p + pos, "MTrk", 4) == 0) {
            int64_t t = track_ticks(p, (Py_ssize_t)at, (Py_ssize_t)end);
            if (t > best) best = t;
        }
        pos = at + len;
    }
    return best;
}

static PyObject *ticks(PyObject *self, PyObject *args) {
    PyObject *list, *out_obj;
    if (!PyArg_ParseTuple(args, "OO", &list, &out_obj)) return NULL;
    States s;
    if (get_states(list, &s, 0) < 0) return NULL;
    Py_buffer ov;
    if (get_buf(out_obj, &ov, s.n, 8, "ql", 1, "out") < 0) { release_states(&s); return NULL; }
    int64_t *out = ov.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < s.n; i++) out[i] = smf_ticks(s.views[i].buf, s.views[i].len);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&ov);
    release_states(&s);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"scan", scan, METH_VARARGS, "Per-file layout, counts and status of symusic state buffers; returns notes kept."},
    {"fill", fill, METH_VARARGS, "Note columns and per-piece (qpm, seconds) of the files scanned OK."},
    {"ticks", ticks, METH_VARARGS, "The largest sum of delta times of a track of each Standard MIDI File."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_midi", "symusic state buffers to note columns.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__midi(void) { return PyModule_Create(&module); }
