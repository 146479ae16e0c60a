"""``structkv.runtime``: engine orchestration, paged KV cache, scheduler and serving (issue 4).

Mapped from the top-level ``runtime/`` folder by ``pyproject.toml``; import it as
``structkv.runtime``, never as ``runtime``.
"""
