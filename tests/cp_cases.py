"""Cases run inside the gloo worker processes of tests/test_context_parallel.py.

Every worker builds the same global inputs (fixed seed), runs the single-process ``chunk_kda`` on the whole
pack, then its own share under context parallelism, and reports relative errors of its outputs, the final
state and the gradients against the single-process run.  The parent process checks the numbers.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from kda_compile import chunk_kda
import kda_compile
from kda_compile.context_parallel import build_cp_context, chunk_kda_cp, shard, unshard
from kda_compile.cp_conv import exchange_conv_halo


def rel_err(out, ref) -> float:
    out, ref = out.double(), ref.double()
    return (out - ref).norm().item() / max(ref.norm().item(), 1e-300)


def global_inputs(offsets, H, HV, K, V, seed, gate_in_kernel):
    """Float64 inputs of the whole pack, gate parameters and loss weights (the same on every rank)."""
    gen = torch.Generator().manual_seed(seed)
    T, N = offsets[-1], len(offsets) - 1

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    x = dict(q=rand(1, T, H, K), k=rand(1, T, H, K), v=rand(1, T, HV, V), beta=rand(1, T, HV),
             g=rand(1, T, HV, K) if gate_in_kernel else F.logsigmoid(rand(1, T, HV, K) + 2.0))
    x["initial_state"] = rand(N, HV, K, V) * 0.5
    params = dict(A_log=rand(HV) * 0.3, dt_bias=rand(HV * K) * 0.3) if gate_in_kernel else {}
    weights = dict(o=rand(1, T, HV, V), final=rand(N, HV, K, V))
    return x, params, weights


def _to(tensors: dict, device) -> dict:
    return {key: t.to(device) for key, t in tensors.items()}


def _single_process(x, params, w, cu, opts, dtype):
    """The whole pack in one process, in ``dtype``: outputs and gradients by name (global tensors)."""
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    inp = {key: t.to(state_dtype if key == "initial_state" else dtype).clone().requires_grad_()
           for key, t in x.items()}
    par = {key: t.to(dtype).clone().requires_grad_() for key, t in params.items()}
    o, s = chunk_kda(**inp, **par, cu_seqlens=cu, **opts)
    ((o * w["o"].to(dtype)).sum() + (s * w["final"].to(dtype)).sum()).backward()
    return {"o": o, "final_state": s, **{"d" + key: t.grad for key, t in {**inp, **par}.items()}}


def run_kda_case(case, rank, world):
    """One chunk_kda case: per metric (o, final state, every gradient) the relative error against the
    single-process run in the same dtype; for float32 also (CP vs float64, single process vs float64)."""
    offsets, dtype = case["offsets"], case["dtype"]
    gate_in_kernel, v_first = case.get("gate_in_kernel", False), case.get("state_v_first", False)
    x, params, w = global_inputs(offsets, case["H"], case["HV"], case["K"], case["V"], case["seed"],
                                 gate_in_kernel)
    opts = dict(use_qk_l2norm_in_kernel=True, use_beta_sigmoid_in_kernel=True, use_gate_in_kernel=gate_in_kernel,
                output_final_state=True, state_v_first=v_first)
    if v_first:
        x["initial_state"] = x["initial_state"].transpose(-1, -2).contiguous()
        w["final"] = w["final"].transpose(-1, -2).contiguous()
    device = case.get("device", "cpu")
    x, params, w = _to(x, device), _to(params, device), _to(w, device)
    cu = torch.tensor(offsets, dtype=torch.long, device=device)
    ref = _single_process(x, params, w, cu, opts, dtype)
    ref64 = _single_process(x, params, w, cu, opts, torch.float64) if dtype != torch.float64 else None
    # context parallel
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    ctx = build_cp_context(cu.cpu(), layout=case.get("layout", "contiguous"), rank_pieces=case.get("pieces"))
    cp_in = {key: shard(t.to(dtype), ctx).requires_grad_() for key, t in x.items() if key != "initial_state"}
    cp_in["initial_state"] = x["initial_state"].to(state_dtype).requires_grad_()
    cp_par = {key: t.to(dtype).requires_grad_() for key, t in params.items()}
    if case.get("public_api"):  # FLA's spelling: chunk_kda(..., cp_context=ctx)
        o, s = kda_compile.chunk_kda(**cp_in, **cp_par, cp_context=ctx, **opts)
    else:
        o, s = chunk_kda_cp(**cp_in, **cp_par, cp_context=ctx, pass1_wide=case.get("pass1_wide"), **opts)
    loss = (o * shard(w["o"].to(dtype), ctx)).sum() + ((s * w["final"].to(dtype)).sum() if rank == 0 else 0)
    loss.backward()
    # shared leaves (replicated on every rank): their gradient is the sum over ranks, as DDP would reduce it
    shared = {key: t.grad if t.grad is not None else torch.zeros_like(t)
              for key, t in [("initial_state", cp_in["initial_state"]), *cp_par.items()]}
    for grad in shared.values():
        dist.all_reduce(grad)
    mine = {"o": o, "final_state": s, **{"d" + key: (shared[key] if key in shared else t.grad)
                                        for key, t in {**cp_in, **cp_par}.items()}}
    local = {"o", *("d" + key for key in cp_in if key != "initial_state")}  # per-token: compare this rank's share

    def view(name, tensor):
        return shard(tensor, ctx) if name in local else tensor

    errors = {}
    for name, value in mine.items():
        errors[name] = (rel_err(value, view(name, ref[name])),) + (
            () if ref64 is None else (rel_err(value, view(name, ref64[name])),
                                      rel_err(view(name, ref[name]), view(name, ref64[name]))))
    # the output reassembled from every rank equals the single-process output (checks shard/unshard too)
    if case.get("unshard"):
        errors["o_unsharded"] = (rel_err(all_tokens(o, ctx), ref["o"]),)
    return errors


def all_tokens(local, ctx):
    """The global tensor ``[1, T, ...]`` from every rank's ``local [1, T_local, ...]`` (detached)."""
    sizes = [sum(b - a for a, b in ps) for ps in ctx.rank_pieces]   # gloo gathers equal sizes: pad
    padded = local.new_zeros(1, max(sizes), *local.shape[2:])
    padded[:, :local.shape[1]] = local.detach()
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    return unshard([t[:, :n] for t, n in zip(gathered, sizes)], ctx)


def causal_conv(x, weight, offsets):
    """Depthwise causal convolution of a varlen pack ``x [1, T, D]``, ``weight [D, W]`` (float64 math)."""
    W = weight.shape[1]
    out = []
    for a, b in zip(offsets[:-1], offsets[1:]):
        seq = F.pad(x[0, a:b].T.unsqueeze(0), (W - 1, 0))
        out.append(F.conv1d(seq, weight.unsqueeze(1), groups=weight.shape[0])[0].T)
    return torch.cat(out).unsqueeze(0)


def run_conv_case(case, rank, world):
    """The halo exchange: a convolution of each local piece with its halo equals the global convolution."""
    offsets, width = case["offsets"], case["conv_size"]
    gen = torch.Generator().manual_seed(case["seed"])
    device = case.get("device", "cpu")
    x, weight, w = (t.to(device) for t in (torch.randn(1, offsets[-1], 3, generator=gen, dtype=torch.float64),
                                           torch.randn(3, width, generator=gen, dtype=torch.float64),
                                           torch.randn(1, offsets[-1], 3, generator=gen, dtype=torch.float64)))
    x_ref = x.clone().requires_grad_()
    y_ref = causal_conv(x_ref, weight, offsets)
    (y_ref * w).sum().backward()
    ctx = build_cp_context(torch.tensor(offsets), conv1d_kernel_size=width, rank_pieces=case.get("pieces"),
                           layout=case.get("layout", "contiguous"))
    x_loc = shard(x, ctx).requires_grad_()
    halo = exchange_conv_halo(x_loc, ctx)
    # a local piece: its halo, then its tokens, convolved without padding, but restarting at local sequence
    # starts (the halo already holds zeros before the piece's own sequence start)
    outs, offset = [], 0
    for i, (a, b) in enumerate(ctx.local_pieces):
        cuts = [a] + [o for o in offsets if a < o < b] + [b]
        prev = halo[i]
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            seq = torch.cat([prev, x_loc[0, offset + lo - a: offset + hi - a]])
            outs.append(F.conv1d(seq.T.unsqueeze(0), weight.unsqueeze(1), groups=3)[0].T)
            prev = x_loc.new_zeros(width - 1, 3)
        offset += b - a
    y = torch.cat(outs).unsqueeze(0)
    (y * shard(w, ctx)).sum().backward()
    return {"conv": (rel_err(y, shard(y_ref, ctx)),), "dx_conv": (rel_err(x_loc.grad, shard(x_ref.grad, ctx)),)}


def run_case(case, rank, world):
    """One case inside a spawned worker (tests/cp_spawn.py): the halo case when it names a ``conv_size``, else a
    chunk_kda case."""
    return (run_conv_case if "conv_size" in case else run_kda_case)(case, rank, world)
