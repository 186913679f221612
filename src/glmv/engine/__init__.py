"""The fast decode engine for CUDA (static KV cache, fused Triton kernels, CUDA graphs)."""
