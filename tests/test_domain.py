"""DomainBatchNorm: per-domain statistics equal a separate BatchNorm per domain; state, errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import batchnorm as bn
from batchnorm import distributed as dist

TOL = 1e-12


def close(a: Any, b: Any) -> None:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape
    scale = max(float(np.abs(b).max(initial=0.0)), 1e-300)
    assert float(np.abs(a - b).max(initial=0.0)) / scale <= TOL


def snapshot(layer: bn.DomainBatchNorm) -> dict[str, bytes]:
    return {k: v.tobytes() for k, v in layer.state_dict().items()}


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize(("shape", "axis"), [((12, 3), 1), ((6, 3, 4, 2), 1), ((5, 4, 2, 3), -1)])
@pytest.mark.parametrize("momentum", [0.9, None])
def test_each_domain_is_a_separate_batchnorm(
    shared: bool, shape: tuple[int, ...], axis: int, momentum: float | None
) -> None:
    rng = np.random.default_rng(0)
    c = shape[axis]
    layer = bn.DomainBatchNorm(c, 3, shared_affine=shared, momentum=momentum, axis=axis)
    separate = [bn.BatchNorm(c, momentum=momentum, axis=axis) for _ in range(3)]
    assert layer.gamma is not None and layer.beta is not None
    if shared:
        layer.gamma[:] = rng.uniform(0.5, 2.0, size=c)
        for s in separate:
            s.gamma[:] = layer.gamma  # type: ignore[index]
    else:
        layer.gamma[:] = rng.uniform(0.5, 2.0, size=(3, c))
        layer.beta[:] = rng.normal(size=(3, c))
        for d, s in enumerate(separate):
            s.gamma[:], s.beta[:] = layer.gamma[d], layer.beta[d]  # type: ignore[index]
    for d in [0, 2, 2, 1, 0, 2]:
        x = rng.normal(3.0 * d, 1.0 + d, size=shape)
        dy = rng.normal(size=shape)
        close(layer(x, domain=d), separate[d](x))
        close(layer.backward(dy), separate[d].backward(dy))
        dgamma = layer.dgamma if shared else layer.dgamma[d]  # type: ignore[index]
        close(dgamma, separate[d].dgamma)
        if not shared:
            assert layer.dgamma is not None and layer.dbeta is not None
            others = [k for k in range(3) if k != d]
            assert not layer.dgamma[others].any() and not layer.dbeta[others].any()
    for d, s in enumerate(separate):
        close(layer.domains[d].running_mean, s.running_mean)
        close(layer.domains[d].running_var, s.running_var)
        assert layer.domains[d].num_batches_tracked == s.num_batches_tracked
    close(layer.running_mean, np.stack([s.running_mean for s in separate]))  # type: ignore[misc]
    layer.eval()
    for s in separate:
        s.eval()
    x = rng.normal(size=shape)
    for d in range(3):
        close(layer(x, domain=d), separate[d](x))


def test_shared_parameters_are_one_array() -> None:
    layer = bn.DomainBatchNorm(2, 3)
    assert layer.gamma is not None
    layer.gamma -= 0.5  # an optimizer's in-place step reaches every domain
    assert all(d.gamma is layer.gamma for d in layer.domains)
    assert layer.domains[2].gamma.tolist() == [0.5, 0.5]  # type: ignore[union-attr]
    per = bn.DomainBatchNorm(2, 3, shared_affine=False)
    assert per.gamma is not None and per.gamma.shape == (3, 2)
    per.gamma[1] = 4.0
    assert per.domains[1].gamma.tolist() == [4.0, 4.0]  # type: ignore[union-attr]
    plain = bn.DomainBatchNorm(2, 2, affine=False)
    assert plain.gamma is None and plain.domains[0].gamma is None


@pytest.mark.parametrize(
    ("domain", "kind", "match"),
    [(None, TypeError, "needs the domain"), (1.0, TypeError, "must be an int"),
     (True, TypeError, "must be an int"), (-1, ValueError, "out of range"),
     (3, ValueError, "0 <= domain < 3")],
)  # fmt: skip
def test_a_bad_domain_is_a_clear_error_and_changes_nothing(
    domain: Any, kind: type[Exception], match: str
) -> None:
    rng = np.random.default_rng(1)
    layer = bn.DomainBatchNorm(2, 3, shared_affine=False)
    y = layer(rng.normal(size=(8, 2)), domain=1)
    before, dy = snapshot(layer), rng.normal(size=(8, 2))
    with pytest.raises(kind, match=match):
        layer(rng.normal(size=(8, 2)), domain=domain)
    assert snapshot(layer) == before
    assert layer.backward(dy).shape == y.shape  # still the domain 1 forward
    assert layer.dgamma is not None and layer.dgamma[1].any() and not layer.dgamma[0].any()


def test_bad_input_changes_nothing() -> None:
    layer = bn.DomainBatchNorm(2, 2)
    before = snapshot(layer)
    with pytest.raises(ValueError):
        layer(np.ones((4, 3)), domain=0)
    assert snapshot(layer) == before


@pytest.mark.parametrize(("value", "kind"), [(0, ValueError), (2.0, TypeError), ("2", TypeError)])
def test_num_domains_is_checked(value: Any, kind: type[Exception]) -> None:
    with pytest.raises(kind, match="num_domains"):
        bn.DomainBatchNorm(2, value)


def test_backward_before_forward() -> None:
    with pytest.raises(RuntimeError):
        bn.DomainBatchNorm(2, 2).backward(np.ones((3, 2)))


def trained(shared: bool = True, **options: Any) -> bn.DomainBatchNorm:
    rng = np.random.default_rng(2)
    layer = bn.DomainBatchNorm(3, 2, shared_affine=shared, **options)
    for d in (0, 1, 1):
        layer(rng.normal(2.0 * d, 1.0, size=(8, 3)), domain=d)
    if layer.gamma is not None and layer.beta is not None:
        layer.gamma[...] = rng.uniform(0.5, 2.0, size=layer.gamma.shape)
        layer.beta[...] = rng.normal(size=layer.beta.shape)
    return layer


def test_state_dict_keys_and_round_trip() -> None:
    layer = trained(shared=False)
    state = layer.state_dict()
    assert list(state)[:5] == [f"domains.0.{k}" for k in
                               ("weight", "bias", "running_mean", "running_var",
                                "num_batches_tracked")]  # fmt: skip
    fresh = bn.DomainBatchNorm(3, 2, shared_affine=False)
    fresh.load_state_dict(state)
    assert snapshot(fresh) == snapshot(layer)
    assert fresh.gamma is not None and layer.gamma is not None
    assert fresh.gamma.tobytes() == layer.gamma.tobytes()  # the views were written


def test_shared_affine_refuses_different_weights() -> None:
    layer = bn.DomainBatchNorm(3, 2)
    state = trained(shared=False).state_dict()
    before = snapshot(layer)
    with pytest.raises(ValueError, match="different 'weight' values for domains"):
        layer.load_state_dict(state)
    assert snapshot(layer) == before


@pytest.mark.parametrize(
    "options",
    [{}, {"shared": False}, {"momentum": None, "eps": 1e-3}, {"affine": False},
     {"ghost_batch_size": 4, "unbiased": False}, {"axis": -1}],
)  # fmt: skip
def test_save_and_load_round_trip(tmp_path: Path, options: dict[str, Any]) -> None:
    layer = trained(**options).eval()
    path = layer.save(tmp_path / "dbn")
    assert path.suffix == ".npz"
    back = bn.DomainBatchNorm.load(path)
    assert snapshot(back) == snapshot(layer)
    assert repr(back) == repr(layer)
    assert not back.training and back.shared_affine == layer.shared_affine
    x = np.random.default_rng(3).normal(size=(5, 3))
    assert back(x, domain=1).tobytes() == layer(x, domain=1).tobytes()


def test_frozen_is_saved(tmp_path: Path) -> None:
    layer = trained().freeze()
    back = bn.DomainBatchNorm.load(layer.save(tmp_path / "f.npz"))
    assert back.frozen and all(d.frozen for d in back.domains)


def test_load_refuses_other_files(tmp_path: Path) -> None:
    path = bn.BatchNorm(3).save(tmp_path / "plain.npz")
    with pytest.raises(ValueError, match="not a valid DomainBatchNorm file"):
        bn.DomainBatchNorm.load(path)
    layer = trained()
    entries = dict(np.load(layer.save(tmp_path / "d.npz")))
    entries["domains.5.running_mean"] = np.zeros(3)
    np.savez(tmp_path / "bad.npz", **entries)
    with pytest.raises(ValueError, match="unknown entries"):
        bn.DomainBatchNorm.load(tmp_path / "bad.npz")


def test_precise_bn_per_domain() -> None:
    rng = np.random.default_rng(4)
    layer = trained()
    before0 = layer.domains[0].state_dict()
    batches = [rng.normal(5.0, 3.0, size=(10, 3)) for _ in range(4)]
    bn.precise_bn(lambda x: layer(x, domain=1), batches, 4, layers=[layer.domains[1]])
    close(layer.domains[1].running_mean, np.concatenate(batches).mean(axis=0))
    close(layer.domains[1].running_var, np.concatenate(batches).var(axis=0, ddof=1))
    after0 = layer.domains[0].state_dict()
    assert all(after0[k].tobytes() == v.tobytes() for k, v in before0.items())
    assert layer.training


def test_model_helpers_and_synchronize_see_every_domain() -> None:
    model = {"norm": bn.DomainBatchNorm(2, 2)}
    assert [n for n, _ in bn.batchnorms(model)] == ["norm.domains.0", "norm.domains.1"]
    assert next(iter(bn.model_state_dict(model))) == "norm.domains.0.weight"
    assert len(bn.freeze_all(model)) == 2 and model["norm"].frozen
    group = dist.thread_groups(1)[0]
    assert len(dist.synchronize(model, group)) == 2
    assert all(d.group is group for d in model["norm"].domains)
