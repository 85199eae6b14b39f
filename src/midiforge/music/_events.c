/* The emission step of EventsTokenizer.encode_batch, compiled: given the notes of many pieces on
 * the grid, already in canonical order, write every piece's token ids.  It is the same rule as
 * the NumPy code in tokenizers.py (_emit_numpy), which stays the reference and the fallback; the
 * tests check that both give the same ids on every shared file.
 *
 * Only the buffer protocol is used (no NumPy headers): every array is a C-contiguous int64 buffer
 * except `out`, a writable int32 buffer that the caller sized with `count`.  The note columns stay
 * in their own order; `order` gives the canonical one (no gathered copies).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

typedef struct {
    int64_t max_shift, shift_base, bar_id, velocity_bins, velocity_base, pitch_base, duration_base;
    int has_ins, bars, head;
} Rule;

typedef struct {
    Py_buffer offsets, on, dur, pitch, vel, prog, ins_ids, bar_steps, tempo_ids, order;
    Py_ssize_t n_pieces, n_notes;
} Notes;

static int get_i64(PyObject *obj, Py_buffer *view, const char *name) {
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) return -1;
    if (view->itemsize != 8 || view->format == NULL || (strcmp(view->format, "l") && strcmp(view->format, "q")
                                                         && strcmp(view->format, "<q") && strcmp(view->format, "=q"))) {
        PyErr_Format(PyExc_TypeError, "%s: expected a contiguous int64 buffer", name);
        PyBuffer_Release(view);
        view->obj = NULL;
        return -1;
    }
    return 0;
}

static void release(Notes *n) {
    Py_buffer *all[] = {&n->offsets, &n->on, &n->dur, &n->pitch, &n->vel, &n->prog, &n->ins_ids, &n->bar_steps,
                        &n->tempo_ids, &n->order};
    for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++)
        if (all[i]->obj != NULL) PyBuffer_Release(all[i]);
}

/* parse (offsets, on, dur, pitch, vel, prog, ins_ids, bar_steps, tempo_ids, order, rule tuple):
 * note i of the output order is note order[i] of the arrays */
static int parse(PyObject *args, Notes *n, Rule *r, PyObject **rest) {
    PyObject *o[10], *rule;
    const char *names[] = {"offsets", "on", "dur", "pitch", "vel", "prog", "ins_ids", "bar_steps", "tempo_ids",
                           "order"};
    Py_buffer *views[] = {&n->offsets, &n->on, &n->dur, &n->pitch, &n->vel, &n->prog, &n->ins_ids, &n->bar_steps,
                          &n->tempo_ids, &n->order};
    memset(n, 0, sizeof(*n));
    if (!PyArg_ParseTuple(args, "OOOOOOOOOOO|O", &o[0], &o[1], &o[2], &o[3], &o[4], &o[5], &o[6], &o[7], &o[8],
                          &o[9], &rule, rest))
        return -1;
    for (int i = 0; i < 10; i++)
        if (get_i64(o[i], views[i], names[i]) < 0) { release(n); return -1; }
    if (!PyArg_ParseTuple(rule, "LLLLLLLiii", &r->max_shift, &r->shift_base, &r->bar_id, &r->velocity_bins,
                          &r->velocity_base, &r->pitch_base, &r->duration_base, &r->has_ins, &r->bars, &r->head)) {
        release(n);
        return -1;
    }
    n->n_pieces = n->offsets.len / 8 - 1;
    n->n_notes = n->on.len / 8;
    if (n->n_pieces < 0 || n->dur.len / 8 != n->n_notes || n->pitch.len / 8 != n->n_notes
        || n->vel.len / 8 != n->n_notes || n->prog.len / 8 != n->n_notes || n->tempo_ids.len / 8 != n->n_pieces
        || (r->bars && n->bar_steps.len / 8 != n->n_pieces) || n->ins_ids.len / 8 != 129 || r->max_shift < 1
        || n->order.len / 8 != n->n_notes) {
        PyErr_SetString(PyExc_ValueError, "events emit: inconsistent array lengths");
        release(n);
        return -1;
    }
    const int64_t *off = n->offsets.buf;
    if (off[0] != 0 || off[n->n_pieces] != n->n_notes) {
        PyErr_SetString(PyExc_ValueError, "events emit: offsets do not cover the notes");
        release(n);
        return -1;
    }
    for (Py_ssize_t p = 0; p < n->n_pieces; p++)
        if (off[p + 1] < off[p]) {
            PyErr_SetString(PyExc_ValueError, "events emit: offsets decrease");
            release(n);
            return -1;
        }
    const int64_t *order = n->order.buf;
    for (Py_ssize_t i = 0; i < n->n_notes; i++)
        if (order[i] < 0 || order[i] >= n->n_notes) {
            PyErr_SetString(PyExc_ValueError, "events emit: order out of range");
            release(n);
            return -1;
        }
    return 0;
}

/* One pass over the notes; with out == NULL it only counts (into per_piece). */
static int run(const Notes *n, const Rule *r, int32_t *out, int64_t *per_piece, int64_t capacity) {
    const int64_t *off = n->offsets.buf, *on = n->on.buf, *dur = n->dur.buf, *pitch = n->pitch.buf,
                  *vel = n->vel.buf, *prog = n->prog.buf, *ins = n->ins_ids.buf, *steps = n->bar_steps.buf,
                  *tempo = n->tempo_ids.buf, *order = n->order.buf;
    int64_t w = 0;
#define EMIT(tok) do { if (out) { if (w >= capacity) return -1; out[w] = (int32_t)(tok); } w++; } while (0)
    for (Py_ssize_t p = 0; p < n->n_pieces; p++) {
        int64_t start = w;
        EMIT(1); /* BOS */
        if (r->head == 2) EMIT(tempo[p]);
        int64_t prev_on = 0, prev_bar = -1, prev_prog = -1, prev_vel = -1;
        for (int64_t i = off[p]; i < off[p + 1]; i++) {
            int first = (i == off[p]);
            int64_t j = order[i];
            int64_t rest = on[j] - prev_on;
            if (r->bars) {
                int64_t st = steps[p] > 0 ? steps[p] : 1;
                int64_t bar = on[j] / st;
                for (int64_t b = prev_bar; b < bar; b++) EMIT(r->bar_id);
                if (bar - prev_bar > 0) rest = on[j] - bar * st;
                prev_bar = bar;
            }
            if (rest < 0) return -2;
            int64_t n_shift = (rest + r->max_shift - 1) / r->max_shift;
            for (int64_t k = 1; k < n_shift; k++) EMIT(r->shift_base + r->max_shift);
            if (n_shift > 0) EMIT(r->shift_base + (rest - r->max_shift * (n_shift - 1)));
            if (r->has_ins && (first || prog[j] != prev_prog)) {
                if (prog[j] < 0 || prog[j] > 128) return -3;
                EMIT(ins[prog[j]]);
            }
            if (r->velocity_bins > 0 && (first || vel[j] != prev_vel)) EMIT(r->velocity_base + vel[j]);
            EMIT(r->pitch_base + pitch[j]);
            EMIT(r->duration_base + dur[j]);
            prev_on = on[j];
            prev_prog = prog[j];
            prev_vel = vel[j];
        }
        EMIT(2); /* EOS */
        per_piece[p] = w - start;
    }
#undef EMIT
    return 0;
}

static PyObject *fail(int code) {
    if (code == -1) PyErr_SetString(PyExc_ValueError, "events emit: output buffer too small");
    else if (code == -2) PyErr_SetString(PyExc_ValueError, "events emit: notes not in time order");
    else PyErr_SetString(PyExc_IndexError, "events emit: program outside 0..128");
    return NULL;
}

/* count(offsets, on, dur, pitch, vel, prog, ins_ids, bar_steps, tempo_ids, order, rule, per_piece) -> total */
static PyObject *count(PyObject *self, PyObject *args) {
    Notes n;
    Rule r;
    PyObject *per_obj = NULL;
    Py_buffer per;
    if (parse(args, &n, &r, &per_obj) < 0) return NULL;
    if (per_obj == NULL || PyObject_GetBuffer(per_obj, &per, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "count: per_piece buffer required");
        release(&n);
        return NULL;
    }
    if (per.len != 8 * n.n_pieces) {
        PyBuffer_Release(&per);
        release(&n);
        PyErr_SetString(PyExc_ValueError, "count: per_piece must hold one int64 per piece");
        return NULL;
    }
    int code;
    Py_BEGIN_ALLOW_THREADS
    code = run(&n, &r, NULL, per.buf, 0);
    Py_END_ALLOW_THREADS
    int64_t total = 0;
    for (Py_ssize_t p = 0; p < n.n_pieces; p++) total += ((int64_t *)per.buf)[p];
    PyBuffer_Release(&per);
    release(&n);
    if (code < 0) return fail(code);
    return PyLong_FromLongLong(total);
}

/* emit(offsets, on, dur, pitch, vel, prog, ins_ids, bar_steps, tempo_ids, order, rule, out) -> None */
static PyObject *emit(PyObject *self, PyObject *args) {
    Notes n;
    Rule r;
    PyObject *out_obj = NULL;
    Py_buffer out;
    if (parse(args, &n, &r, &out_obj) < 0) return NULL;
    if (out_obj == NULL || PyObject_GetBuffer(out_obj, &out, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "emit: out buffer required");
        release(&n);
        return NULL;
    }
    int64_t *per_piece = PyMem_Malloc(sizeof(int64_t) * (n.n_pieces > 0 ? n.n_pieces : 1));
    if (per_piece == NULL) {
        PyBuffer_Release(&out);
        release(&n);
        return PyErr_NoMemory();
    }
    int code;
    Py_BEGIN_ALLOW_THREADS
    code = run(&n, &r, out.buf, per_piece, out.len / 4);
    Py_END_ALLOW_THREADS
    PyMem_Free(per_piece);
    PyBuffer_Release(&out);
    release(&n);
    if (code < 0) return fail(code);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"count", count, METH_VARARGS, "Token count of every piece (into per_piece); returns the total."},
    {"emit", emit, METH_VARARGS, "Write the token ids of every piece into out (int32)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_events", "EventsTokenizer emission, compiled.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__events(void) { return PyModule_Create(&module); }
