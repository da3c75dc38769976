"""Sampling: from encoded prompts and a reference latent to the edited latent.

- ``latents``: noise, packing into 2x2 tokens, and the tokens' position ids;
- ``guidance``: classifier-free guidance with Step1X-Edit's per-token norm rescale;
- ``loop``: the one Euler loop (``denoise``) and what it reads (``DiTText``, ``Guidance``, ``Flow``);
- ``official``, ``diffusers``: the two reference flows it runs (schedule, model time, guidance order,
  Euler step, noise): the official v1.0/v1.1 code, and the diffusers pipeline of v1.2 and text-to-image.

The model knows nothing of this package; ComfyUI drives the same model with its own samplers.
"""
