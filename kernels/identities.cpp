// Identity checks over a list or tuple at C speed, for the prepared path's repeat test
// (gpuopt/identities.py). Built against the running interpreter's own headers and called
// through ctypes.PyDLL, so the caller holds the GIL and the sequence cannot change meanwhile.
#include <Python.h>
#include <stdint.h>

extern "C" {

// Whether seq is a list or tuple (their item arrays are read directly) of n items.
static bool has_items(PyObject *seq, Py_ssize_t n) {
    return (PyList_Check(seq) || PyTuple_Check(seq)) && PySequence_Fast_GET_SIZE(seq) == n;
}

// Writes the address (id) of each of the n items of seq to ids; -1 if seq is not a list or
// tuple of n items.
Py_ssize_t gpuopt_read_ids(PyObject *seq, uintptr_t *ids, Py_ssize_t n) {
    if (!has_items(seq, n)) return -1;
    PyObject **items = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t i = 0; i < n; ++i) ids[i] = (uintptr_t)items[i];
    return n;
}

// n if each of the n items of seq is the object whose address is ids[i]; otherwise the
// position of the first that is not, or -1 if seq is not a list or tuple of n items.
Py_ssize_t gpuopt_same_ids(PyObject *seq, const uintptr_t *ids, Py_ssize_t n) {
    if (!has_items(seq, n)) return -1;
    PyObject **items = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t i = 0; i < n; ++i)
        if ((uintptr_t)items[i] != ids[i]) return i;
    return n;
}

}
