"""kimi-jax: stream DeepSeek-V3-architecture MoE checkpoints layer by layer through JAX."""

__version__ = "0.2.0"
