"""Kimi Linear step of ``python -m kda_compile demo``: write a tiny random Kimi Linear checkpoint (Moonshot's
layout), load it with :meth:`HybridModel.from_pretrained`, and, when transformers is installed, load the same
folder into transformers' ``KimiLinearForCausalLM`` and compare: logits, greedy tokens, and transformers' KDA on
its own fallback against transformers' KDA on kda_compile (:mod:`kda_compile.integrations.transformers`)."""
from __future__ import annotations

import tempfile
import time

import torch

from .model import HybridConfig, HybridModel


def _transformers_kimi():
    """(KimiLinearForCausalLM, None) or (None, the reason it cannot run here)."""
    try:
        import transformers
    except ImportError:
        return None, "transformers is not installed (pip install 'kda_compile[transformers]')"
    try:
        from transformers import KimiLinearForCausalLM
    except ImportError:
        return None, f"transformers {transformers.__version__} has no KimiLinearForCausalLM (needs >= 5.24)"
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return KimiLinearForCausalLM, None


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


@torch.no_grad()
def run_kimi_demo(seed: int = 0, prompt_len: int = 24, new_tokens: int = 16) -> dict:
    """Print the step's lines; returns ``ok``, ``transformers`` (ran or not) and, when it ran, ``logits_err``
    and the tokens/s of transformers' fallback and of transformers on kda_compile."""
    torch.manual_seed(seed)
    source = HybridModel(HybridConfig.tiny_kimi())
    with tempfile.TemporaryDirectory(prefix="kda_compile_kimi_") as folder:
        source.save_pretrained(folder)
        model = HybridModel.from_pretrained(folder)
        cfg = model.config
        print(f"Kimi Linear checkpoint demo: {cfg.num_layers} layers ({' '.join(cfg.layer_types)}; MLP "
              f"{' '.join(cfg.mlp_types)}), {cfg.num_experts} experts top-{cfg.num_experts_per_token}, written in "
              f"Moonshot's layout and read back by HybridModel.from_pretrained")
        prompt = torch.randint(3, cfg.vocab_size, (1, prompt_len))
        ours = model.generate(prompt, new_tokens)
        hf_cls, why = _transformers_kimi()
        if hf_cls is None:
            print(f"  transformers step skipped: {why}")
            return {"ok": True, "transformers": False}
        from .integrations import transformers as integration
        hf = hf_cls.from_pretrained(folder, dtype=torch.float32).eval()
        ref = hf(prompt).logits
        err = ((model(prompt) - ref).norm() / ref.norm()).item()
        fallback = integration.fallback_implementation()
        generate = lambda: hf.generate(prompt, max_new_tokens=new_tokens, do_sample=False)  # noqa: E731
        generate()                                                                      # warm-up
        theirs, fallback_s = _timed(generate)
        with integration.use_kda_compile():
            generate()
            routed, routed_s = _timed(generate)
    same = torch.equal(ours, theirs) and torch.equal(routed, theirs)
    ok = err < 1e-4 and same
    print(f"  transformers KimiLinearForCausalLM on the same folder: logits rel. error {err:.1e}; greedy tokens "
          f"{'identical' if same else 'DIFFERENT'} (ours, transformers, transformers on kda_compile)")
    print(f"  transformers generate, KDA on its {fallback} fallback: {new_tokens / fallback_s:8.1f} tokens/s; "
          f"KDA routed to kda_compile: {new_tokens / routed_s:8.1f} tokens/s")
    print(f"  {'OK' if ok else 'MISMATCH'}: our model equals transformers' on a Kimi Linear checkpoint")
    return {"ok": ok, "transformers": True, "logits_err": err, "tokens_per_s_fallback": new_tokens / fallback_s,
            "tokens_per_s_kda_compile": new_tokens / routed_s}


if __name__ == "__main__":
    run_kimi_demo()
