// Version of the C interface below all of moetron's kernels; cpu_kernels.py refuses a library whose
// version differs from its own (a stale build in the cache).
extern "C" int moetron_kernels_abi() { return 7; }
