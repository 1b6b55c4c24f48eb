/* Stand-in for libcudart.so.12: perf_analyzer links it for --shared-memory=cuda only.
   Every call fails with cudaErrorInsufficientDriver (35); HTTP runs never call it. */
typedef int cudaError_t;
cudaError_t cudaFree(void *p) { (void)p; return 35; }
const char *cudaGetErrorName(cudaError_t e) { (void)e; return "cudaErrorInsufficientDriver"; }
const char *cudaGetErrorString(cudaError_t e) { (void)e; return "no CUDA (stub libcudart)"; }
cudaError_t cudaIpcGetMemHandle(void *h, void *p) { (void)h; (void)p; return 35; }
cudaError_t cudaMalloc(void **p, unsigned long n) { (void)p; (void)n; return 35; }
cudaError_t cudaMemcpy(void *d, const void *s, unsigned long n, int k) { (void)d; (void)s; (void)n; (void)k; return 35; }
cudaError_t cudaSetDevice(int d) { (void)d; return 35; }
