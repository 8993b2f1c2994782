"""Exact faster CPU paths for two dense variants that attnlab eval runs on their eager N x N path on a CPU.

- ``sink``: softmax through torch's CPU flash SDPA, which also returns the log-sum-exp, then
  ``O = O_softmax * sigmoid(lse - s_h)`` (the rescaling sink.py's Flex path uses);
- ``selective``: ``tau_i * scale * q_i . k_j = scale * (tau_i q_i) . k_j``, so SDPA on ``q * tau``.

Each is timed against ``backend="eager"`` at the small organism's prefill shape (B=1, H=5, N=4096, D=64,
causal, fp32) and checked against it. One thread (``OMP_NUM_THREADS=1``); a shared CPU, so the times are
rough. Run: ``OMP_NUM_THREADS=1 python benchmarks/results/cpu-2026-11-23-s3/eval-variants/cpu_paths_probe.py``.
"""

from __future__ import annotations

import time

import torch

import attnlab


def timed(fn):  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    torch.manual_seed(0)
    b, h, n, d = 1, 5, 4096, 64
    q, k, v = (torch.randn(b, h, n, d) for _ in range(3))
    sinks = torch.randn(h)
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu

    def sink_sdpa() -> torch.Tensor:
        out, lse = flash(q, k, v, 0.0, True, attn_mask=None, scale=d**-0.5)[:2]
        return out * torch.sigmoid(lse - sinks[None, :, None])[..., None]

    fast, t_fast = timed(sink_sdpa)
    ref, t_ref = timed(
        lambda: attnlab.attention(q, k, v, method="sink", causal=True, backend="eager", sinks=sinks)
    )
    print(f"sink: sdpa+lse {t_fast:.2f} s, eager {t_ref:.2f} s, max |diff| {(fast - ref).abs().max():.1e}")
    tau = 0.25 + torch.rand(b, h, n)
    fast, t_fast = timed(
        lambda: torch.nn.functional.scaled_dot_product_attention(q * tau[..., None], k, v, is_causal=True)
    )
    ref, t_ref = timed(
        lambda: attnlab.attention(q, k, v, method="selective", causal=True, backend="eager", temperature=tau)
    )
    print(
        f"selective: sdpa(q * tau) {t_fast:.2f} s, eager {t_ref:.2f} s, max |diff| {(fast - ref).abs().max():.1e}"
    )


if __name__ == "__main__":
    main()
