// Multiple-choice 0/1 knapsack DP over a discretised memory axis, for solvers.backends.dp.
//
// Built by setup.py (OptionalBuildExt) into `solvers._knapsack`. Plain CPython C-API plus the buffer protocol,
// so numpy arrays are read/written in place without numpy headers at build time.
//
// mck(weights, values, n_items, n_opts, n_cells, snap_at, query, out, choice)
//   weights: int64[n_items * n_opts]   rounded cost (in grid cells) of each rank option; a weight >= n_cells
//                                       disables the option (padding for items with fewer options)
//   values:  float64[n_items * n_opts]  value of each option
//   snap_at: int64[n_snaps]             after the first snap_at[s] items, read the table at the cells query[s, :]
//   query:   int64[n_snaps * n_query]   cells to read (one per client), each in [0, n_cells)
//   out:     float64[n_snaps * n_query] (written) out[s, q] = table after snap_at[s] items, at cell query[s, q]
//   choice:  int8[n_items * n_cells] or None (written: 0 = item not taken, k+1 = option k taken)
// f[c] = best value with total rounded weight <= c ("at most" semantics, f starts at 0 everywhere), so a
// snapshot read at the client's capacity is the optimum for that capacity. One pass serves every capacity,
// which is what lets solve_many plan 1,000 clients of one model from a single table. Only the queried cells are
// kept (not whole snapshots), so the memory is the choice table plus O(n_snaps * clients).
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace {

struct Buffer {
    Py_buffer view{};
    bool held = false;
    ~Buffer() {
        if (held) PyBuffer_Release(&view);
    }
};

bool get_buffer(PyObject* obj, Buffer& buf, Py_ssize_t itemsize, Py_ssize_t count, bool writable, const char* what) {
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT;
    if (writable) flags |= PyBUF_WRITABLE;
    if (PyObject_GetBuffer(obj, &buf.view, flags) != 0) return false;
    buf.held = true;
    if (buf.view.itemsize != itemsize || buf.view.len != itemsize * count) {
        PyErr_Format(PyExc_ValueError, "_knapsack.mck: %s has %zd bytes of itemsize %zd, expected %zd items of %zd",
                     what, buf.view.len, buf.view.itemsize, count, itemsize);
        return false;
    }
    return true;
}

PyObject* mck(PyObject*, PyObject* args) {
    PyObject *w_obj, *v_obj, *snap_obj, *query_obj, *out_obj, *choice_obj;
    Py_ssize_t n, k, cells;
    if (!PyArg_ParseTuple(args, "OOnnnOOOO", &w_obj, &v_obj, &n, &k, &cells, &snap_obj, &query_obj, &out_obj,
                          &choice_obj))
        return nullptr;
    if (n < 0 || k <= 0 || cells <= 0) {
        PyErr_Format(PyExc_ValueError, "_knapsack.mck: bad sizes n_items=%zd n_opts=%zd n_cells=%zd", n, k, cells);
        return nullptr;
    }
    if (k > 126) {
        PyErr_Format(PyExc_ValueError, "_knapsack.mck: at most 126 rank options per item, got %zd", k);
        return nullptr;
    }
    Buffer w, v, snap_at, query, out, choice;
    if (!get_buffer(w_obj, w, 8, n * k, false, "weights")) return nullptr;
    if (!get_buffer(v_obj, v, 8, n * k, false, "values")) return nullptr;
    if (PyObject_GetBuffer(snap_obj, &snap_at.view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) != 0) return nullptr;
    snap_at.held = true;
    if (snap_at.view.itemsize != 8) {
        PyErr_SetString(PyExc_ValueError, "_knapsack.mck: snap_at must be int64");
        return nullptr;
    }
    const Py_ssize_t n_snaps = snap_at.view.len / 8;
    if (PyObject_GetBuffer(query_obj, &query.view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) != 0) return nullptr;
    query.held = true;
    if (query.view.itemsize != 8 || (n_snaps > 0 && query.view.len % (8 * n_snaps) != 0) ||
        (n_snaps == 0 && query.view.len != 0)) {
        PyErr_SetString(PyExc_ValueError, "_knapsack.mck: query must be int64 of shape (n_snaps, n_query)");
        return nullptr;
    }
    const Py_ssize_t n_query = n_snaps > 0 ? query.view.len / (8 * n_snaps) : 0;
    if (!get_buffer(out_obj, out, 8, n_snaps * n_query, true, "out")) return nullptr;
    const bool want_choice = choice_obj != Py_None;
    if (want_choice && !get_buffer(choice_obj, choice, 1, n * cells, true, "choice")) return nullptr;

    const auto* W = static_cast<const int64_t*>(w.view.buf);
    const auto* V = static_cast<const double*>(v.view.buf);
    const auto* S = static_cast<const int64_t*>(snap_at.view.buf);
    const auto* Q = static_cast<const int64_t*>(query.view.buf);
    auto* O = static_cast<double*>(out.view.buf);
    auto* ch = want_choice ? static_cast<int8_t*>(choice.view.buf) : nullptr;
    for (Py_ssize_t s = 0; s < n_snaps; ++s) {
        if (S[s] < 0 || S[s] > n || (s > 0 && S[s] < S[s - 1])) {
            PyErr_Format(PyExc_ValueError, "_knapsack.mck: snap_at[%zd]=%lld not sorted within [0, %zd]", s,
                         (long long)S[s], n);
            return nullptr;
        }
    }
    for (Py_ssize_t i = 0; i < n_snaps * n_query; ++i) {
        if (Q[i] < 0 || Q[i] >= cells) {
            PyErr_Format(PyExc_ValueError, "_knapsack.mck: query cell %lld outside [0, %zd)", (long long)Q[i], cells);
            return nullptr;
        }
    }

    bool oom = false;
    Py_BEGIN_ALLOW_THREADS;
    try {
        // Two buffers instead of one in-place sweep: each option is then a branch-free, forward, vectorisable loop
        // (g[c] = max(g[c], f[c - w] + v)), about 3x faster than the in-place per-cell option loop at 630 k cells.
        std::vector<double> f(static_cast<size_t>(cells), 0.0), g(static_cast<size_t>(cells));
        std::vector<int8_t> pick(static_cast<size_t>(cells));
        Py_ssize_t next = 0;
        auto flush = [&](Py_ssize_t done) {
            while (next < n_snaps && S[next] == done) {
                for (Py_ssize_t q = 0; q < n_query; ++q) O[next * n_query + q] = f[Q[next * n_query + q]];
                ++next;
            }
        };
        flush(0);
        for (Py_ssize_t i = 0; i < n; ++i) {
            const int64_t* wi = W + i * k;
            const double* vi = V + i * k;
            std::memcpy(g.data(), f.data(), sizeof(double) * cells);
            std::memset(pick.data(), 0, static_cast<size_t>(cells));
            for (Py_ssize_t o = 0; o < k; ++o) {
                const int64_t wo = wi[o];
                if (wo < 0 || wo >= cells) continue;  // disabled (padding) option
                const double vo = vi[o];
                const int8_t tag = static_cast<int8_t>(o + 1);
                const double* src = f.data();
                double* dst = g.data() + wo;
                int8_t* pk = pick.data() + wo;
                const Py_ssize_t len = cells - wo;
                for (Py_ssize_t c = 0; c < len; ++c) {
                    const double cand = src[c] + vo;
                    const bool better = cand > dst[c];  // strict: ties keep the earlier option / not taking it
                    dst[c] = better ? cand : dst[c];
                    pk[c] = better ? tag : pk[c];
                }
            }
            f.swap(g);
            if (ch) std::memcpy(ch + i * cells, pick.data(), static_cast<size_t>(cells));
            flush(i + 1);
        }
    } catch (const std::bad_alloc&) {
        oom = true;
    }
    Py_END_ALLOW_THREADS;
    if (oom) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"mck", mck, METH_VARARGS,
     "mck(weights, values, n_items, n_opts, n_cells, snap_at, query, out, choice): multiple-choice knapsack DP "
     "(see csrc/knapsack.cpp)."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_knapsack", "Native multiple-choice knapsack DP for solvers.", -1,
                      methods};

}  // namespace

// Bumped whenever mck's signature changes; solvers.backends.dp ignores a stale build with another version.
constexpr long kAbiVersion = 2;

PyMODINIT_FUNC PyInit__knapsack(void) {
    PyObject* m = PyModule_Create(&module);
    if (m && PyModule_AddIntConstant(m, "ABI_VERSION", kAbiVersion) != 0) {
        Py_DECREF(m);
        return nullptr;
    }
    return m;
}
