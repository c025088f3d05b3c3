/* A stand-in for the CUDA driver library (libcuda.so.1) on build machines without a GPU.

   TVM registers its CUDA module, the one that compiles kernels with nvcc and embeds the
   fatbin, only when libtvm_runtime_cuda.so loads, and that library links against the driver.
   qspec preloads this file in the compile subprocess only; every driver entry point the
   runtime library imports fails with CUDA_ERROR_NO_DEVICE, so nothing can run through it. */

#define CUDA_ERROR_NO_DEVICE 100
#define FAIL(name) int name(void) { return CUDA_ERROR_NO_DEVICE; }

FAIL(cuDeviceGetName)
FAIL(cuFuncSetAttribute)
FAIL(cuLaunchKernelEx)
FAIL(cuModuleGetFunction)
FAIL(cuModuleLoadData)
FAIL(cuModuleUnload)
FAIL(cuTensorMapEncodeTiled)

int cuGetErrorName(int error, const char **text) { (void)error; *text = "CUDA_ERROR_NO_DEVICE"; return 0; }
int cuGetErrorString(int error, const char **text) { (void)error; *text = "no CUDA driver (qspec build stub)"; return 0; }
