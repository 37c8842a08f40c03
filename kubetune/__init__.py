"""kubetune: fine-tune Stable Diffusion text-to-image models on Kubernetes."""

__version__ = "0.1.0"
