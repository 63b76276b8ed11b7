// The Python module fop_kernels._C. It defines no Python functions: importing it loads this
// shared library, whose static TORCH_LIBRARY_FRAGMENT blocks register the ops under
// torch.ops.fop_kernels. Only Python.h is included here, so this unit compiles fast.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
