"""LoRA extraction: shrink a fine-tune (tuned − base) into a PEFT LoRA adapter.

Each chosen weight matrix's delta is factored by a truncated SVD (fp32, one tensor at a time) into
A = diag(√S)·Vh and B = U·diag(√S), with α = r per module so peft's scale is exactly 1; the adapter
loads with ``PeftModel.from_pretrained`` and ``merge_and_unload`` gives base + B·A. The report says, per
module, how much of the delta's energy the chosen rank keeps.

>>> from gift_merge.extract import ExtractOptions, extract_lora
>>> extract_lora("base/", "tuned/", "adapter/", ExtractOptions(rank=16))  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gift_merge.lazy import lazy_getattr

if TYPE_CHECKING:
    from gift_merge.extract.options import ExtractOptions
    from gift_merge.extract.report import ExtractionReport
    from gift_merge.extract.run import extract_lora

__all__ = ["ExtractOptions", "ExtractionReport", "extract_lora"]

# Loaded on first use: the CLI imports this package for its command, and `gift-merge --help` should
# not wait for torch.
_HOMES = {
    "ExtractOptions": "gift_merge.extract.options",
    "ExtractionReport": "gift_merge.extract.report",
    "extract_lora": "gift_merge.extract.run",
}


__getattr__ = lazy_getattr(__name__, _HOMES)
