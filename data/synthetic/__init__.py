"""Procedurally generated bilingual (Vietnamese + English) pedestrian dataset in the VN3K on-disk layout.

Used by tests and demos in place of the real VN3K, which is distributed on request only. Modules:
``attributes`` (vocabulary and identity sampling), ``backgrounds`` and ``drawing`` (PIL rendering), ``captions``
(templates), ``generate`` (files on disk) and ``cli`` (``python -m data.synthetic``).
"""

from data.synthetic.cli import main
from data.synthetic.generate import SyntheticSpec, all_captions, ensure_vn3k, generate_vn3k

__all__ = ["SyntheticSpec", "all_captions", "ensure_vn3k", "generate_vn3k", "main"]
