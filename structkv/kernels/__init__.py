"""Kernels StructKV ships as source and builds where they run.

``ort_ops``: ``structkv::CausalAttention``, an ONNX Runtime CPU custom operator. It lives in the
core package because two sides need the same source of truth: the exporter names the operator
in the graphs (and builds it before tracing, so a compiler problem fails early), and the runtime
registers the library with its sessions. Neither imports the other.
"""
