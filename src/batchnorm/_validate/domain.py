"""Checks of DomainBatchNorm: the number of domains, the domain of a batch, its saved state."""

from __future__ import annotations

import numbers
from typing import Any

__all__ = ["domain_index", "num_domains", "saved_domain_file", "shared_affine_differs"]


def num_domains(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"num_domains must be an int, the number of domains D; got {type(value).__name__} "
            f"{value!r}."
        )
    if value < 1:
        raise ValueError(f"num_domains must be at least 1; got {value!r}.")
    return int(value)


def domain_index(domain: Any, count: int) -> int:
    """The domain of a batch: an int in range(count). Checked before anything is touched."""
    if domain is None:
        raise TypeError(
            f"DomainBatchNorm needs the domain of the batch: call layer(x, domain=d) with d an "
            f"int in range({count}). Nothing was changed."
        )
    if isinstance(domain, bool) or not isinstance(domain, numbers.Integral):
        raise TypeError(
            f"domain must be an int in range({count}); got {type(domain).__name__} {domain!r}. "
            "A batch belongs to one domain: split mixed batches by domain. Nothing was changed."
        )
    if not 0 <= int(domain) < count:
        raise ValueError(
            f"domain {domain} is out of range for a DomainBatchNorm with {count} domains: "
            f"expected 0 <= domain < {count}. Nothing was changed."
        )
    return int(domain)


def shared_affine_differs(key: str, domains: list[int]) -> ValueError:
    return ValueError(
        f"this DomainBatchNorm shares gamma and beta among its domains (shared_affine=True), "
        f"but the state holds different '{key}' values for domains {domains}. Give every "
        "domain the same values, or build the layer with shared_affine=False. Nothing was "
        "loaded."
    )


def saved_domain_file(path: Any, problem: str) -> ValueError:
    return ValueError(
        f"{path} is not a valid DomainBatchNorm file: {problem}. DomainBatchNorm.load reads "
        "only .npz files written by DomainBatchNorm.save (never pickled objects)."
    )
