"""``structkv.export``: the exporter to two-phase ONNX / TensorRT engines (see issue 4).

Mapped from the top-level ``export/`` folder by ``pyproject.toml``; import it as
``structkv.export``, never as ``export``.
"""
