"""Shared helpers for the TileLang tests: fresh random inputs and the float64 recurrence to compare with."""
from __future__ import annotations

import torch

from kda_compile.reference import KDAOptions, kda_reference
from kda_inputs import make_inputs, rel_err  # noqa: F401  (re-exported for the tests)

FLAGS = ("use_qk_l2norm_in_kernel", "use_gate_in_kernel", "use_beta_sigmoid_in_kernel", "allow_neg_eigval",
         "state_v_first")


def inputs(dtype, device="cpu", *, B=2, T=70, H=2, HV=None, K=32, V=32, gate="log", beta_logits=False,
           initial_state=True, cu_seqlens=None, state_v_first=False):
    return make_inputs(B=B, T=T, H=H, HV=HV, K=K, V=V, dtype=dtype, device=device, gate=gate,
                       beta_logits=beta_logits, initial_state=initial_state, cu_seqlens=cu_seqlens,
                       state_v_first=state_v_first)


def recurrence64(a: dict, **kw):
    """``(o, final_state)`` of the float64 token recurrence for the same arguments."""
    x = {n: (t.double() if torch.is_tensor(t) and t.is_floating_point() else t) for n, t in a.items()}
    lower = kw.get("lower_bound") if kw.get("use_gate_in_kernel") else None
    opts = KDAOptions(scale=kw.get("scale") or a["q"].shape[-1] ** -0.5,
                      use_qk_l2norm_in_kernel=kw.get("use_qk_l2norm_in_kernel", False),
                      use_gate_in_kernel=kw.get("use_gate_in_kernel", False),
                      use_beta_sigmoid_in_kernel=kw.get("use_beta_sigmoid_in_kernel", False),
                      allow_neg_eigval=kw.get("allow_neg_eigval", False), lower_bound=lower,
                      state_v_first=kw.get("state_v_first", False))
    return kda_reference(x["q"], x["k"], x["v"], x["g"], x["beta"], x.get("initial_state"), x.get("cu_seqlens"),
                         x.get("A_log"), x.get("dt_bias"), opts, algorithm="recurrent")
