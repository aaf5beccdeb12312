"""The fused loss's chunk loop with its element-wise work beside the GEMMs (one process, CUDA).

In the plain loop (fused.py) every chunk runs GEMM -> element-wise -> GEMM on one stream, so
the memory-bound element-wise kernels and the compute-bound GEMMs take turns with the whole
GPU. Here each chunk's teacher rows come in ``splits`` sub-chunks (two teacher buffers of
``C / splits`` rows: the same memory as one of ``C`` rows) and the element-wise step of one
sub-chunk runs on a low-priority stream while the GEMM stream computes the next sub-chunk's
teacher logits, or the previous sub-chunk's hidden-state gradient:

    GEMM stream:   z_S | z_T0 | z_T1 (ew 0 beside) | dh 0 (ew 1 beside) | dh 1 | dW += ...
    side stream:                ew 0                 ew 1

A cuBLAS GEMM holds a whole multiprocessor per thread block, so the element-wise kernels could
only run in the GEMMs' tails; the GEMMs that have an element-wise step beside them therefore
leave ``sm_carveout`` multiprocessors to it (cuBLAS's SM count target). Their thread blocks are
dispatched first (higher stream priority); the element-wise grid fills the multiprocessors left
and spreads over all of them once the GEMM ends.

Only the multi-pass element-wise kernels run here: the single-pass kernel needs its whole grid
resident at once, which a GEMM beside it does not allow.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from megatron_distill.losses.output_layer_grads import OutputLayerGrads, rows

_STREAMS: dict = {}  # device index -> (GEMM stream, element-wise stream), made once


def _streams(device: torch.device) -> tuple[torch.cuda.Stream, torch.cuda.Stream]:
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _STREAMS:
        # lower number = higher priority; out-of-range values are clamped to the device's range
        _STREAMS[key] = (torch.cuda.Stream(key, priority=-8), torch.cuda.Stream(key, priority=0))
    return _STREAMS[key]


@contextlib.contextmanager
def sm_carveout(n_sms: int, blas: str | None = None):
    """GEMMs issued inside leave ``n_sms`` multiprocessors free (cuBLASLt's SM count target,
    through torch's experimental carveout setting); ``blas`` ("cublaslt") also selects the BLAS
    library for them. Both settings are process-wide and restored on exit."""
    if n_sms <= 0 and blas is None:
        yield
        return
    prev_carveout = torch._C._get_sm_carveout_experimental()
    prev_blas = torch.backends.cuda.preferred_blas_library()
    if n_sms > 0:
        torch._C._set_sm_carveout_experimental(n_sms)
    if blas is not None:
        torch.backends.cuda.preferred_blas_library(blas)
    try:
        yield
    finally:
        torch._C._set_sm_carveout_experimental(prev_carveout)
        torch.backends.cuda.preferred_blas_library(prev_blas)


def overlapped_chunks(
    hs: torch.Tensor,
    ws: torch.Tensor,
    ht: torch.Tensor,
    wt: torch.Tensor,
    idx: torch.Tensor | None,
    n: int,
    chunk: int,
    splits: int,
    grads: OutputLayerGrads,
    loss_parts: torch.Tensor,
    loss_grad_: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None],
    sm_carveout_sms: int = 0,
    blas: str | None = None,
) -> None:
    """Run the chunk loop over the ``n`` counted tokens (rows ``idx`` of ``hs`` ``[T, h_s]`` /
    ``ht`` ``[T, h_t]``), ``chunk`` rows at a time, each chunk's teacher rows in ``splits``
    sub-chunks, with the element-wise step on a second stream (module docstring).

    ``loss_grad_(zs_rows, zt_rows, loss_out)`` is the element-wise step of one sub-chunk: it
    writes the rows' loss partials into ``loss_out`` (a column block of ``loss_parts`` ``[P, n]``)
    and overwrites ``zs_rows`` with dL/dz. ``grads`` receives dL/dh row block by row block and
    dL/dW once per chunk. On CPU tensors the same order runs on the one stream there is.
    On return the caller's current stream waits for everything issued here.
    """
    cuda = hs.is_cuda
    v_local = ws.shape[0]
    sub = -(-chunk // splits)
    buf_s = torch.empty((chunk, v_local), dtype=ws.dtype, device=hs.device)
    buf_t = [torch.empty((sub, v_local), dtype=wt.dtype, device=hs.device) for _ in range(min(2, splits))]
    if cuda:
        gemm_stream, ew_stream = _streams(hs.device)
        caller = torch.cuda.current_stream(hs.device)
        gemm_stream.wait_stream(caller)
        ew_stream.wait_stream(caller)
        on_gemm, on_ew = torch.cuda.stream(gemm_stream), torch.cuda.stream(ew_stream)
    else:
        on_gemm = on_ew = contextlib.nullcontext()

    def beside_ew():
        return sm_carveout(sm_carveout_sms, blas) if cuda else contextlib.nullcontext()

    def record():
        return torch.cuda.current_stream().record_event() if cuda else None

    def wait(event) -> None:
        if event is not None:
            torch.cuda.current_stream().wait_event(event)

    for c0 in range(0, n, chunk):
        c1 = min(c0 + chunk, n)
        bounds = [(t0, min(t0 + sub, c1 - c0)) for t0 in range(0, c1 - c0, sub)]
        with on_gemm:
            hs_c = rows(hs, idx, c0, c1)
            zs = buf_s[: c1 - c0]
            torch.mm(hs_c, ws.t(), out=zs)
        ew_done: list = []
        for j, (t0, t1) in enumerate(bounds):
            with on_gemm:
                if j >= 2:
                    wait(ew_done[j - 2])  # the teacher buffer's previous rows are read
                zt = buf_t[j % 2][: t1 - t0]
                with beside_ew() if j >= 1 else contextlib.nullcontext():
                    torch.mm(rows(ht, idx, c0 + t0, c0 + t1), wt.t(), out=zt)
                zt_ready = record()
                if j >= 1:
                    # the previous sub-chunk's dh, beside this sub-chunk's element-wise step
                    wait(ew_done[j - 1])
                    p0, p1 = bounds[j - 1]
                    with beside_ew():
                        grads.add_hidden(zs[p0:p1], c0 + p0, c0 + p1)
            with on_ew:
                wait(zt_ready)
                loss_grad_(zs[t0:t1], zt, loss_parts[:, c0 + t0 : c0 + t1])
                ew_done.append(record())
        with on_gemm:
            wait(ew_done[-1])
            p0, p1 = bounds[-1]
            grads.add_hidden(zs[p0:p1], c0 + p0, c0 + p1)
            grads.add_weight(zs, hs_c, c0)
    if cuda:
        caller.wait_stream(gemm_stream)
        caller.wait_stream(ew_stream)
