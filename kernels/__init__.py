"""INT4 kernels for mpqc (Triton), each with a plain PyTorch reference.

`kernels.int4_layout` (numpy/torch only) defines the packed INT4 layout every piece shares.
`kernels.int4_gemm`, `kernels.int4_conv` and the split-K they share (`kernels.split_k`) need
Triton (the `gpu` extra); they run compiled on a CUDA GPU, or on CPU tensors under Triton's
interpreter (TRITON_INTERPRET=1, set before triton is imported), which is how the fast test tier
checks them on machines without a GPU.
"""

from mpqc_kernels.int4_layout import INT4_MAX, INT4_MIN, pack_int4, packed_length, unpack_int4

__all__ = ["INT4_MAX", "INT4_MIN", "pack_int4", "packed_length", "unpack_int4"]
