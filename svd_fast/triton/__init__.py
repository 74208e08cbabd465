"""Triton kernels. Importing a module here imports triton; svd_fast only does so when the triton backend is chosen."""
