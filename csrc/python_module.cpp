// Makes the shared library importable as the Python module `vittle_fast._C`. Importing it runs the
// static TORCH_LIBRARY registrations; the module itself exposes nothing.
#include <Python.h>

static struct PyModuleDef vittle_fast_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&vittle_fast_c_module); }
