"""bench-train --fp32-matmul: bf16 linear layers multiply in fp32, for CPUs without AVX512-BF16.

There torch's bf16 GEMM takes its reference path: one 256x8192x3072 input-gradient product (`grad @ weight`, the
layout every linear's backward uses) takes ~30 s in bf16 against 0.25 s in fp32 on the project's CPU box, which puts
a real-size bf16 step out of reach. This keeps everything a bf16 run keeps in bf16 (the parameters and their ZeRO
partitions, the gathers, activations, gradients) and upcasts only the operands of each product, one layer at a time.
It saves the bf16 weight for backward, not an fp32 copy, so memory is a bf16 run's plus one layer's transient
operands. CPU benchmarks only: on a GPU the bf16 tensor cores are the point.
"""

from __future__ import annotations

import torch


_BLOCK_VALUES = 1 << 24  # 64 MB of fp32 weight at a time: the whole (128256 x 3072) text head would be 1.6 GB


def _blocks(weight):
    """(first row, fp32 copy) of each block of the weight's output rows, one block alive at a time."""
    rows = max(1, _BLOCK_VALUES // weight.shape[1])
    for i in range(0, weight.shape[0], rows):
        yield i, weight[i:i + rows].float()


class _Fp32Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight, bias)
        xf = x.float()
        out = torch.cat([xf.matmul(w.t()) for _, w in _blocks(weight)], dim=-1)
        if bias is not None:
            out = out + bias.float()
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias = ctx.saved_tensors
        # A ZeRO-3 weight used outside its own module's hooks (a tied one) may be partitioned again by now.
        regather = getattr(getattr(weight, "ds_status", None), "name", None) == "NOT_AVAILABLE"
        if regather:
            weight.all_gather()
        try:
            g = grad.float()
            grad_x = grad_w = grad_b = None
            if ctx.needs_input_grad[0]:
                grad_x = sum(g[..., i:i + len(w)].matmul(w) for i, w in _blocks(weight)).to(x.dtype)
            if ctx.needs_input_grad[1]:
                rows = g.reshape(-1, g.shape[-1]).t()
                grad_w = rows.matmul(x.float().reshape(-1, x.shape[-1])).to(weight.dtype)
            if bias is not None and ctx.needs_input_grad[2]:
                grad_b = g.reshape(-1, g.shape[-1]).sum(0).to(bias.dtype)
            return grad_x, grad_w, grad_b
        finally:
            if regather:
                weight.partition()


def _fp32_linear(x, weight, bias=None):
    if x.dtype == torch.float32:
        return _ORIGINAL(x, weight, bias)
    return _Fp32Linear.apply(x, weight, bias)


_ORIGINAL = torch.nn.functional.linear


def multiply_linears_in_fp32() -> None:
    """Route torch.nn.functional.linear (nn.Linear and peft's LoRA layers call it) through the fp32 product. Call it
    after the model is built: zero.Init installs its own linear while it runs."""
    torch.nn.functional.linear = _fp32_linear
