"""Benchmarks of mora_kernels against LoRA and the original release; run with ``python -m mora_kernels bench``."""
