"""Similarity search: exact chunked-BLAS top-k (kernels), Lance vector indexes (index), the SQL
table macro `nearest` and `clipsql search` (nearest)."""
