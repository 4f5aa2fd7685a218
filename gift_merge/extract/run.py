"""``extract_lora``: read both models one tensor at a time, factor each delta, write a PEFT adapter.

Setup (locate, plan from headers) / extract (one module at a time under a progress bar) / save (config
and report) read top to bottom. Only the two versions of the tensor in hand are ever in memory, and the
adapter appears at ``out`` only once it is complete.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import torch

from gift_merge.dtypes import dtype_name
from gift_merge.errors import GiftMergeError
from gift_merge.extract.adapter import AdapterWriter, adapter_config
from gift_merge.extract.options import ExtractOptions
from gift_merge.extract.plan import Dropped, ExtractPlan, LoraJob, SaveJob, plan_extraction
from gift_merge.extract.report import ExtractionReport, ModuleRow
from gift_merge.extract.svd import truncated_svd
from gift_merge.io.adapter import CONFIG_NAME, PREFIX, WEIGHTS_NAME
from gift_merge.io.artifacts import write_json
from gift_merge.io.locate import locate
from gift_merge.io.reader import CheckpointReader
from gift_merge.io.writer import atomic_output_folder, check_output_free
from gift_merge.progress import progress

REPORT_NAME = "extraction_report.json"


class _Pair:
    """The same tensor from both models, as fp32 on the compute device."""

    def __init__(self, base: CheckpointReader, tuned: CheckpointReader, device: torch.device) -> None:
        self.base, self.tuned, self.device = base, tuned, device

    def delta(self, name: str) -> tuple[torch.Tensor, float]:
        """(tuned − base in fp32, ‖base‖_F). fp32: bf16 subtraction would cancel small fine-tuning deltas."""
        base = self.base.read(name).to(self.device, torch.float32)
        delta = self.tuned.read(name).to(self.device, torch.float32) - base
        return delta, float(torch.linalg.vector_norm(base, dtype=torch.float64))


def extract_lora(base: str, tuned: str, out: str | Path, options: ExtractOptions) -> ExtractionReport:
    """Write a PEFT LoRA adapter at ``out`` that turns ``base`` into (approximately) ``tuned``.

    >>> extract_lora("base/", "tuned/", "adapter/", ExtractOptions(rank=16))  # doctest: +SKIP
    """
    options.check()
    out = Path(out)
    check_output_free(out.resolve(), overwrite=options.overwrite)
    base_dir, tuned_dir = locate(base), locate(tuned)
    base_reader, tuned_reader = CheckpointReader(base_dir), CheckpointReader(tuned_dir)
    plan = plan_extraction(base_reader, tuned_reader, options)
    pair = _Pair(base_reader, tuned_reader, torch.device(options.device))
    base_name = base if not Path(base).expanduser().is_dir() else str(base_dir)
    report = ExtractionReport(base_name, str(tuned_dir), str(out.resolve()), _settings(options))

    with atomic_output_folder(out, overwrite=options.overwrite) as folder:
        ranks: dict[str, int] = {}
        saved_modules: list[str] = []
        tying = False
        bar = progress(total=plan.steps, unit="module", desc="extract", quiet=options.quiet)
        with bar, AdapterWriter(folder / WEIGHTS_NAME) as writer:
            for job in plan.lora:
                bar.set_postfix_str(job.module, refresh=False)
                row = _extract_module(job, pair, writer, plan, options)
                if row.action == "lora":
                    ranks[job.module] = row.rank or 0
                report.rows.append(row)
                bar.update()
            for save in plan.save:
                report.rows.append(_save_module(save, pair, writer))
                if report.rows[-1].action == "save":
                    saved_modules += save.modules
                    tying = tying or save.tied
                bar.update()
            for dropped in plan.dropped:
                report.rows.append(_measure_dropped(dropped, pair, tuned_reader))
                bar.update(int(dropped.measure))
            if not ranks:
                raise GiftMergeError("base and tuned are identical in every module chosen for LoRA: nothing to extract")
            report.adapter_bytes = writer.nbytes
        report.r = max(ranks.values())
        config = adapter_config(
            base_model=base_name,
            ranks=ranks,
            all_modules=plan.modules.all_modules,
            modules_to_save=saved_modules,
            fan_in_fan_out=plan.fan_in_fan_out,
            lora_bias=plan.lora_bias,
            ensure_weight_tying=tying,
        )
        write_json(folder / CONFIG_NAME, config)
        write_json(folder / REPORT_NAME, report.to_json())
    return report


def _extract_module(
    job: LoraJob, pair: _Pair, writer: AdapterWriter, plan: ExtractPlan, options: ExtractOptions
) -> ModuleRow:
    delta, base_norm = pair.delta(job.weight)
    stored_shape = tuple(delta.shape)
    # peft's B·A is [out, in]; Conv1D stores [in, out] and Embedding [vocab, dim] (ΔE = (B·A)ᵀ in peft).
    matrix = delta if job.layout == "linear" else delta.T
    factors = truncated_svd(matrix, job.max_rank, name=job.weight, seed=options.seed, method=options.svd)
    del delta, matrix
    bias = None
    if plan.lora_bias and job.bias is not None:
        bias, _ = pair.delta(job.bias)
    A, B = factors.A, factors.B
    if factors.rank == 0:
        if bias is None or not bool(bias.any()):
            return ModuleRow(job.module, "unchanged", stored_shape, rank=0, max_rank=job.max_rank, energy_kept=1.0)
        A, B = A.new_zeros((1, A.shape[1])), B.new_zeros((B.shape[0], 1))  # a rank-1 zero LoRA carries the bias
    dtype = options.dtype or _float_dtype(pair.tuned.info(job.weight).dtype.torch)
    if job.layout == "embedding":
        writer.add(f"{PREFIX}{job.module}.lora_embedding_A", A.to(dtype))  # (r, vocab)
        writer.add(f"{PREFIX}{job.module}.lora_embedding_B", B.to(dtype))  # (dim, r)
    else:
        writer.add(f"{PREFIX}{job.module}.lora_A.weight", A.to(dtype))  # (r, in)
        writer.add(f"{PREFIX}{job.module}.lora_B.weight", B.to(dtype))  # (out, r)
        if bias is not None:
            writer.add(f"{PREFIX}{job.module}.lora_B.bias", bias.to(dtype))  # merged as bias += 1·b
    return ModuleRow(
        job.module,
        "lora",
        stored_shape,
        rank=A.shape[0],
        max_rank=job.max_rank,
        energy_kept=factors.energy_fraction,
        delta_energy=factors.total_energy,
        relative_delta=_ratio(factors.total_energy**0.5, base_norm),
        svd=factors.method,
    )


def _save_module(job: SaveJob, pair: _Pair, writer: AdapterWriter) -> ModuleRow:
    """Copy the module's tuned tensors, unless the fine-tune left them all as they were."""
    first = job.tensors[0][0]
    shape = tuple(pair.tuned.info(first).shape)
    sources = dict.fromkeys(tensor for tensor, _ in job.tensors)
    if all(torch.equal(pair.base.read(t), pair.tuned.read(t)) for t in sources):
        return ModuleRow(" + ".join(job.modules), "unchanged", shape, reason=job.reason)
    for tensor, adapter_name in job.tensors:
        writer.add(adapter_name, pair.tuned.read(tensor))  # written out at once: a view of the map will do
    return ModuleRow(" + ".join(job.modules), "save", shape, energy_kept=1.0, reason=job.reason)


def _measure_dropped(dropped: Dropped, pair: _Pair, tuned: CheckpointReader) -> ModuleRow:
    shape = tuple(tuned.info(dropped.tensor).shape)
    if not dropped.measure:
        return ModuleRow(dropped.tensor, "dropped", shape, reason=dropped.reason)
    delta, base_norm = pair.delta(dropped.tensor)
    energy = float(torch.linalg.vector_norm(delta, dtype=torch.float64) ** 2)
    if energy == 0.0:
        return ModuleRow(dropped.tensor, "unchanged", shape, reason=dropped.reason)
    relative = _ratio(energy**0.5, base_norm)
    return ModuleRow(
        dropped.tensor, "dropped", shape, delta_energy=energy, relative_delta=relative, reason=dropped.reason
    )


def _float_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype.is_floating_point and dtype.itemsize >= 2 else torch.float32


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None  # a delta on an all-zero tensor has no relative size


def _settings(options: ExtractOptions) -> dict[str, object]:
    """The options and library versions, so the adapter folder records how it was made."""
    versions: dict[str, str | None] = {}
    for package in ("gift-merge", "torch", "transformers", "peft"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "rank": options.rank,
        "rank_pattern": [f"{regex}={rank}" for regex, rank in options.rank_pattern],
        "include": list(options.include),
        "exclude": list(options.exclude),
        "embeddings": options.embeddings,
        "save_undecomposable": options.save_undecomposable,
        "dtype": dtype_name(options.dtype) if options.dtype else None,
        "svd": options.svd,
        "seed": options.seed,
        "versions": versions,
    }
