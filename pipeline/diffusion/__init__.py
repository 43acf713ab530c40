"""Diffusion LMs: which kind a model is, its FFN sites by structure, the samplers whose denoising steps
collection and the closed loop observe, and a tiny LLaDA-layout model for tests.

Two kinds (:func:`~actsparse.pipeline.diffusion.kinds.diffusion_kind`):

* **masked** diffusion, LLaDA and Dream (remote code, ``config.model_type`` ``llada`` / ``dream``): the answer
  starts as ``gen_length`` mask tokens and every denoising step is one full bidirectional forward over prompt +
  answer; :mod:`~actsparse.pipeline.diffusion.masked` is LLaDA's sampler;
* **block** diffusion, ``diffusion_gemma`` (native in transformers 5): an encoder writes the context's KV cache
  and a decoder denoises a canvas of random tokens, canvas after canvas, with the model's own ``generate``,
  which :mod:`~actsparse.pipeline.diffusion.block` observes.

Both report every denoising forward pass to ``before_step`` / ``after_step`` callbacks as a
:class:`~actsparse.pipeline.diffusion.kinds.DiffusionStep`; FFN hooks active around the call
(``pipeline.recorder.SiteRecorder``, ``analyze.sparsifier.Sparsifier``) fire once per step, on the
architecture :func:`~actsparse.pipeline.diffusion.sites.resolve_diffusion_ffn` returns.
"""
