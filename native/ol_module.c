/* ol_module.c — CPython binding for ol_io.c. Releases the GIL for the whole read. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include "ol_io.h"

static PyObject *py_read(PyObject *self, PyObject *args) {
    int fd, depth, engine;
    unsigned long long addr, len, off, chunk, bounce = 0, bounce_len = 0;
    if (!PyArg_ParseTuple(args, "iKKKKii|KK", &fd, &addr, &len, &off, &chunk, &depth, &engine, &bounce, &bounce_len))
        return NULL;
    uint64_t valid = 0;
    int64_t rc;
    Py_BEGIN_ALLOW_THREADS
    rc = ol_read(fd, (void *)(uintptr_t)addr, len, off, chunk, depth, engine, (void *)(uintptr_t)bounce, bounce_len,
                 &valid);
    Py_END_ALLOW_THREADS
    /* (rc, valid): rc is 0, OL_SHORT, or -errno; Python names the file in the exception. */
    return Py_BuildValue("LK", (long long)rc, (unsigned long long)valid);
}

static PyObject *py_uring_available(PyObject *self, PyObject *noargs) {
    return PyBool_FromLong(ol_uring_available());
}

static PyMethodDef methods[] = {
    {"read", py_read, METH_VARARGS, "read(fd, addr, len, off, chunk, depth, engine[, bounce_addr, bounce_len]) -> (rc, valid_bytes)"},
    {"uring_available", py_uring_available, METH_NOARGS, "True when io_uring works in this process"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_ol_native", "offload native reader", -1, methods};

PyMODINIT_FUNC PyInit__ol_native(void) {
    PyObject *m = PyModule_Create(&module);
    if (m) {
        PyModule_AddIntConstant(m, "ENGINE_AUTO", OL_ENGINE_AUTO);
        PyModule_AddIntConstant(m, "ENGINE_URING", OL_ENGINE_URING);
        PyModule_AddIntConstant(m, "ENGINE_THREADS", OL_ENGINE_THREADS);
        PyModule_AddIntConstant(m, "SHORT", OL_SHORT);
    }
    return m;
}
