"""What ``python -m batchnorm`` lists (private): the example scripts, the variants, and where the
documentation is, in words that hold for an installed wheel as well as for a source checkout.
"""

from __future__ import annotations

__all__ = ["DOCS", "EXAMPLES", "VARIANTS", "text"]

#: (script, what it shows): every script of examples/ except its helper modules.
EXAMPLES: tuple[tuple[str, str], ...] = (
    ("quickstart.py", "the kernels, their caches and a gradient check"),
    ("mlp_digits.py", "an MLP on scikit-learn's digits: EMA vs PreciseBN"),
    ("lenet_digits.py", "a LeNet-style CNN: BatchNorm on conv and dense features"),
    ("ema_vs_precise.py", "EMA vs PreciseBN over batch sizes and momenta (figures)"),
    ("batch_size_study.py", "accuracy against the ghost batch size (figure)"),
    ("domain_shift.py", "AdaBN: statistics recomputed on shifted digits (figure)"),
    ("distributed_digits.py", "data parallel with SyncBN (mpiexec, or --thread-ranks)"),
    ("leakage.py", "leakage within a batch: SyncBN, shuffle BN, frozen (figure)"),
    ("domain_stats.py", "shared against per-domain statistics on shifted digits"),
)

#: (how to write it, what it is)
VARIANTS: tuple[tuple[str, str], ...] = (
    ("bn.BatchNorm(C, ghost_batch_size=k)", "ghost batches: each run of k samples on its own"),
    ("bn.BatchNorm(C).freeze()", "frozen: running statistics in every mode, never updated"),
    ("bn.BatchRenorm(C, warmup_steps=W)", "Batch Renormalization (Ioffe 2017), with warm-up"),
    ("bn.precise_bn(model, batches)", "PreciseBN: exact population statistics"),
    ("bn.precise_bn(model, target_batches)", "AdaBN: statistics of the target domain"),
    ("bn.BatchNorm(C, group=group)", "synchronized BatchNorm over MPI ranks or threads"),
    ("dist.shuffle(x, group, seed)", "shuffle BN: samples permuted across workers and back"),
    ("bn.DomainBatchNorm(C, num_domains)", "domain-specific statistics: layer(x, domain=d)"),
    ("bn.freeze_all(model)", "every BatchNorm of a model frozen (detectron2's habit)"),
)

DOCS = """\
Documentation:
  python -m pydoc batchnorm.BatchNorm    the reference of any public name (installed with the
  python -m pydoc batchnorm.precise_bn   package; every docstring states its conventions and
  python -m pydoc batchnorm.functional   has an example that runs)
  The guide (math, conventions, PreciseBN, distributed, variants, results, performance) is
  docs/*.md and the examples are examples/*.py in the source distribution and repository;
  they are not part of the installed package.
"""


def _table(title: str, rows: tuple[tuple[str, str], ...], prefix: str = "") -> str:
    width = max(len(prefix + name) for name, _ in rows) + 2
    lines = [title] + [f"  {(prefix + name).ljust(width)}{what}" for name, what in rows]
    return "\n".join(lines) + "\n"


def text() -> str:
    """The examples, the variants and the documentation, as printed by ``python -m batchnorm``."""
    examples = _table(
        "Examples (each takes --help, and --quick for a run of seconds):", EXAMPLES, "examples/"
    )
    variants = _table("Variants (docs/variants.md):", VARIANTS)
    return examples + "\n" + variants + "\n" + DOCS
