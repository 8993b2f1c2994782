"""Pipeline stages of the delta rule's sequential passes: 3 for 16-bit inputs with K <= 128 (timed on the
H100), else the previous counts (2 forward, 1 reverse: float32 or K > 128 at 3 stages is over the H100's
shared memory), and the previous count again when the GPU refuses 3 stages' shared memory (Triton's
OutOfResources at launch, e.g. sm_86 / sm_89). The kernels are replaced by recorders of their launch options
(no Triton launch)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from triton.runtime.errors import OutOfResources

from attnlab.kernels.linear import launch_delta, op


class Recorder:
    """Stands for a Triton kernel: ``kernel[grid](*args, **kw)`` records num_stages, refusing ``refuse``."""

    def __init__(self, refuse: tuple[int, ...] = ()) -> None:
        self.stages: list[int] = []
        self.refuse = refuse

    def __getitem__(self, grid: Any) -> Any:
        def launch(*args: Any, **kw: Any) -> None:
            self.stages.append(kw.get("num_stages", 0))
            if kw.get("num_stages") in self.refuse:
                raise OutOfResources(233472, 232448, "shared memory")

        return launch


def _forward_stages(
    dtype: torch.dtype, dk: int, mp: pytest.MonkeyPatch, refuse: tuple[int, ...] = ()
) -> list[int]:
    rec = Recorder(refuse)
    mp.setattr(op, "delta_h_v2_kernel", rec)
    mp.setattr(launch_delta, "IMPORTED_INTERPRETED", False)
    k = torch.zeros(1, 2, 64, dk, dtype=dtype)
    w = torch.zeros(1, 2, 64, dk, dtype=dtype)
    u = torch.zeros(1, 2, 64, 32)
    gc = torch.zeros(1, 2, 64)
    ht = torch.zeros(1, 2, dk, 32)
    launch_delta.delta_h_v2(k, w, u, gc, None, ht, None, True, 64)
    return rec.stages


def _reverse_stages(
    dtype: torch.dtype, dk: int, mp: pytest.MonkeyPatch, refuse: tuple[int, ...] = (), channel: bool = False
) -> list[int]:
    rec = Recorder(refuse)
    mp.setattr(op, "delta_bwd_dh_v2_kernel", rec)
    mp.setattr(op, "delta_bwd_du_local_kernel", Recorder())
    mp.setattr(launch_delta, "IMPORTED_INTERPRETED", False)
    q = torch.zeros(1, 2, 64, dk, dtype=dtype)
    do = torch.zeros(1, 2, 64, 32, dtype=dtype)
    gc = torch.zeros(1, 2, 64, dk) if channel else torch.zeros(1, 2, 64)
    aqk = torch.zeros(1, 2, 64, 64) if channel else None
    launch_delta._delta_bwd_dh(q, q, do, gc, q.clone(), aqk, None, 0.1, 64, None)
    return rec.stages


def test_forward_pass_stages(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _forward_stages(torch.bfloat16, 128, monkeypatch) == [3]
    assert _forward_stages(torch.float16, 64, monkeypatch) == [3]
    assert _forward_stages(torch.float32, 128, monkeypatch) == [2]  # (float32 operands: over 227 KB at 3)
    assert _forward_stages(torch.bfloat16, 256, monkeypatch) == [2]
    assert _forward_stages(torch.bfloat16, 128, monkeypatch, refuse=(3,)) == [3, 2]
    with pytest.raises(OutOfResources):
        _forward_stages(torch.bfloat16, 128, monkeypatch, refuse=(3, 2))


def test_reverse_pass_stages(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _reverse_stages(torch.bfloat16, 128, monkeypatch) == [3]
    assert _reverse_stages(torch.float32, 64, monkeypatch) == [1]
    assert _reverse_stages(torch.bfloat16, 256, monkeypatch) == [1]
    assert _reverse_stages(torch.bfloat16, 128, monkeypatch, refuse=(3,)) == [3, 1]
    with pytest.raises(OutOfResources):
        _reverse_stages(torch.bfloat16, 128, monkeypatch, refuse=(3, 1))
    # per-channel gates keep their 2 stages
    assert _reverse_stages(torch.bfloat16, 128, monkeypatch, channel=True) == [2]


def test_a_launch_override_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    """``LAUNCH_OVERRIDES`` (the benchmark's sweep) sets the stages whatever the default."""
    monkeypatch.setitem(op.LAUNCH_OVERRIDES, "delta_h_v2", {"num_stages": 4})
    assert _forward_stages(torch.bfloat16, 128, monkeypatch) == [4]


def test_one_stage_of_the_per_channel_reverse_pass_is_refused_on_a_gpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Triton 3.6 compiled the per-channel reverse pass wrong at 1 stage on the H100: an override asking for
    it is refused with a message (compiled kernels only: the interpreter has no stages)."""
    monkeypatch.setitem(op.LAUNCH_OVERRIDES, "delta_bwd_dh_v2_channel", {"num_stages": 1})
    monkeypatch.setattr(launch_delta, "IMPORTED_INTERPRETED", False)
    with pytest.raises(ValueError, match=r"num_stages=1: Triton 3.6 compiled it wrong for the H100"):
        launch_delta._channel_dh_cfg()
    monkeypatch.setitem(op.LAUNCH_OVERRIDES, "delta_bwd_dh_v2_channel", {"num_stages": 3})
    assert launch_delta._channel_dh_cfg() == {"num_warps": 8, "num_stages": 3}
    monkeypatch.setattr(launch_delta, "IMPORTED_INTERPRETED", True)
    monkeypatch.setitem(op.LAUNCH_OVERRIDES, "delta_bwd_dh_v2_channel", {"num_stages": 1})
    assert launch_delta._channel_dh_cfg()["num_stages"] == 1
