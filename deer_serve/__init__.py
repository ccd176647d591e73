"""deer-serve: DEER speculative decoding (a block-diffusion drafter, an autoregressive verifier).

The core (this package minus `deer_serve.training` extras) imports neither Ray, pydantic nor vLLM.
"""

__version__ = "0.1.0"
