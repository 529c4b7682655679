"""Compile every Triton kernel of taciturn for an H100 (sm_90) without a GPU, and print what the
PTX holds as JSON: {kernel variant: {instruction: count}}. Run by test_triton_compile.py in a
process of its own, where TRITON_INTERPRET is 0 (the kernels are then JIT functions, which
``triton.compile`` takes; the interpreter runs the same code but never lowers it to PTX)."""
import json
import re

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from taciturn.kernels import triton_sign as ts
from taciturn.kernels import triton_update as tu

P, F, W, I = "*fp32", "fp32", "*i32", "i32"
ITEMS = {"items_ptr": "*i64", "n_items": I}
SIGNATURES = {
    ts._encode_kernel: {"x_ptr": "*bf16", "h_ptr": P, "alpha": F, **ITEMS, "scales_ptr": P, "words_ptr": W,
                        "head_words": I},
    ts._partial_kernel: {"x_ptr": P, "h_ptr": P, "alpha": F, **ITEMS, "out_ptr": "*fp64"},
    ts._combine_kernel: {"partial_ptr": "*fp64", **ITEMS, "spans_ptr": "*i64", "count": I, "out_ptr": P},
    ts._decode_kernel: {"words_ptr": W, **ITEMS, "out_ptr": P, "head_words": I},
    ts._mean_kernel: {"rows_ptr": W, "n": I, "row_words": I, "n_float": F, "inv_n": F, **ITEMS, "acc_ptr": P,
                      "h_ptr": P, "alpha": F, "y_ptr": P, "head_words": I},
    tu._amsgrad_kernel: {"x_ptr": P, "g_ptr": "*bf16", "m_ptr": P, "v_ptr": P, "vmax_ptr": P, "n": "i64",
                         **{k: F for k in ("b1", "a1", "b2", "a2", "eps", "step")}},
    tu._adam_kernel: {"x_ptr": P, "g_ptr": P, "m_ptr": P, "v_ptr": P, "n": "i64",
                      **{k: F for k in ("b1", "a1", "b2", "a2", "c2", "inv_c2", "eps", "step")}},
    tu._momentum_kernel: {"buf_ptr": P, "g_ptr": P, "out_ptr": P, "n": "i64", "mu": F},
}
B = {"BLOCK": 1024}
VARIANTS = [
    ("encode l1 ef", ts._encode_kernel, dict(SCALE=1, GIVEN=False, HAS_H=True, UPDATE=2, SEGMENTS=False, **B)),
    ("encode l2 given markov", ts._encode_kernel,
     dict(SCALE=2, GIVEN=True, HAS_H=True, UPDATE=1, SEGMENTS=False, **B)),
    ("encode none", ts._encode_kernel, dict(SCALE=0, GIVEN=False, HAS_H=False, UPDATE=0, SEGMENTS=False, **B)),
    ("encode segments", ts._encode_kernel, dict(SCALE=1, GIVEN=False, HAS_H=True, UPDATE=1, SEGMENTS=True, **B)),
    ("partial l2", ts._partial_kernel, dict(SCALE=2, HAS_H=True, SEGMENTS=False, **B)),
    ("partial segments", ts._partial_kernel, dict(SCALE=1, HAS_H=True, SEGMENTS=True, **B)),
    ("combine l2", ts._combine_kernel, dict(SCALE=2)),
    ("decode l1 add", ts._decode_kernel, dict(SCALE=1, ACCUMULATE=True, **B)),
    ("decode none", ts._decode_kernel, dict(SCALE=0, ACCUMULATE=False, **B)),
    ("mean markov", ts._mean_kernel, dict(SCALE=1, HAS_ACC=True, HAS_H=True, RECIPROCAL=True, **B)),
    ("mean ef", ts._mean_kernel, dict(SCALE=1, HAS_ACC=False, HAS_H=True, RECIPROCAL=True, **B)),
    ("amsgrad", tu._amsgrad_kernel, dict(CUDA=True, **B)),
    ("adam", tu._adam_kernel, dict(CUDA=True, **B)),
    ("momentum nesterov", tu._momentum_kernel, dict(NESTEROV=True, **B)),
]
OPS = ("fma.rn.f32", "mul.rn.f32", "add.rn.f32", "div.rn.f32", "div.full.f32", "div.approx", "sqrt.rn.f32",
       "sqrt.approx", "red.global", "atom.global", "relaxed.or.b32")


def main():
    target = GPUTarget("cuda", 90, 32)
    out = {}
    for name, fn, constexprs in VARIANTS:
        signature = {**SIGNATURES[fn], **{k: "constexpr" for k in constexprs}}
        if constexprs.get("SEGMENTS"):
            signature["x_ptr"] = "*i64"  # the address of element 0 per item
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=target,
                                  options={"enable_fp_fusion": False})
        ptx = compiled.asm["ptx"]
        out[name] = {op: len(re.findall(r"\b" + re.escape(op), ptx)) for op in OPS}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
