// The library is also an (empty) Python extension module, so that importing it by name, as tools that
// walk the package do, works; kimi_jax/model/kernels/_library.py loads it with ctypes for the kernels.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static struct PyModuleDef kimi_jax_kernels_module = {
    PyModuleDef_HEAD_INIT, "_kimi_jax_kernels",
    "kimi-jax CPU kernels: XLA FFI handlers, loaded through ctypes by kimi_jax.model.kernels.", -1, nullptr,
    nullptr, nullptr, nullptr, nullptr};

PyMODINIT_FUNC PyInit__kimi_jax_kernels(void) { return PyModule_Create(&kimi_jax_kernels_module); }
