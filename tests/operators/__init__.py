"""Tests of the merge operators and their kernels."""
