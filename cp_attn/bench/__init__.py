"""GPU benchmarks of single ops, as functions that return records (dicts) for scripts to print or
save. Nothing here runs on import; every function needs a CUDA device and triton."""
