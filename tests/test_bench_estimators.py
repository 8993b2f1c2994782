"""Estimators get their tensor inputs: the bench's densities, fidelity recall and the eval's prefill density
estimate a dynamic method's plan through MethodSpec.estimate_plan, so seer's gate weights reach its gate."""

from __future__ import annotations

import pytest
import torch

import attnlab
from attnlab.bench.fidelity import fidelity_rows, mass_recall
from attnlab.bench.planning import densities, estimated_plan
from attnlab.bench.workloads import random_workload
from attnlab.catalog.dynamic.seer import SeerParams
from attnlab.catalog.dynamic.seer import estimate as seer_estimate
from attnlab.eval.density import prefill_density
from attnlab.patterns import Pattern

SEER = attnlab.get("seer")
CPU = torch.device("cpu")


def _weights(h: int, h_kv: int, d: int, seed: int, gate: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w_q": torch.randn(h, d, gate, generator=g) * 3 * d**-0.5,
        "w_k": torch.randn(h_kv, 3, d, gate, generator=g) * 3 * d**-0.5,
    }


def _params(kw: dict) -> SeerParams:
    p = SEER.make_params(kw)
    assert isinstance(p, SeerParams)
    return p


def _qk(n: int = 256, h: int = 2, d: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, h, n, d, generator=g), torch.randn(1, h, n, d, generator=g)


def test_densities_and_estimated_plan_give_seer_its_weights() -> None:
    q, k = _qk()
    params = _params({"block": 16, "threshold": 0.1})
    w = _weights(2, 2, 16, seed=1)
    own = seer_estimate(q, k, params, causal=True, scale=16**-0.5, **w)
    weightless = seer_estimate(q, k, params, causal=True, scale=16**-0.5)
    assert not torch.equal(own.dense_mask(), weightless.dense_mask())  # the weights change the plan
    plan = estimated_plan(SEER, params, q, k, True, w)
    assert torch.equal(plan.dense_mask(), own.dense_mask())
    assert densities(SEER, params, 256, 256, True, CPU, q, k, w) == (own.density, own.block_density)
    assert densities(SEER, params, 256, 256, True, CPU, q, k) == (
        weightless.density,
        weightless.block_density,
    )
    with pytest.raises(ValueError, match="has no estimator"):
        estimated_plan(attnlab.get("sliding_window"), {}, q, k, True)


def test_fidelity_recall_and_density_come_from_the_plan_with_the_weights() -> None:
    """fidelity_rows gives seer the weights its call gets; recall and density are those of the weighted
    plan (not the weightless gate's)."""
    n, h, d = 512, 2, 16
    work = random_workload(n, h, d, CPU)
    _, q, k, _v = work.layers[0]
    w = _weights(h, h, d, seed=2)

    def inputs(method: str, q_: torch.Tensor, k_: torch.Tensor, v_: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(w) if method == "seer" else {}

    rows = [
        r
        for r in fidelity_rows(work, ("seer",), (Pattern.CAUSAL_SELF,), "first", inputs=inputs)
        if r["method"] == "seer"
    ]
    assert [r["head"] for r in rows] == list(range(h))
    params = _params(SEER.bench_params(n)[0])
    scale = d**-0.5
    probs = torch.softmax(
        (q @ k.transpose(-1, -2) * scale).masked_fill(
            ~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf")
        ),
        -1,
    )
    own = seer_estimate(q, k, params, causal=True, scale=scale, **w)
    weightless = seer_estimate(q, k, params, causal=True, scale=scale)
    want = mass_recall(SEER, params, probs, True, own)
    other = mass_recall(SEER, params, probs, True, weightless)
    assert want is not None and other is not None and want != pytest.approx(other, abs=1e-6)
    assert [r["mass_recall"] for r in rows] == pytest.approx(want, abs=1e-6)
    assert all(r["density"] == own.density and r["block_density"] == own.block_density for r in rows)


def test_prefill_density_passes_each_layer_its_inputs() -> None:
    q, k = _qk()
    params = {"block": 16, "threshold": 0.1}
    p = _params(params)
    layers = [(q, k, 16**-0.5), (k, q, 16**-0.5)]
    ws = [_weights(2, 2, 16, seed=3), _weights(2, 2, 16, seed=4)]
    want = (
        sum(
            float(seer_estimate(a, b, p, causal=True, scale=s, **w).density)
            for (a, b, s), w in zip(layers, ws, strict=True)
        )
        / 2
    )
    assert prefill_density(SEER, params, 256, layers, CPU, inputs=ws) == pytest.approx(want)
    weightless = prefill_density(SEER, params, 256, layers, CPU)
    assert weightless != pytest.approx(want)
    with pytest.raises(ValueError, match="1 sets of tensor inputs for 2 layers"):
        prefill_density(SEER, params, 256, layers, CPU, inputs=ws[:1])
