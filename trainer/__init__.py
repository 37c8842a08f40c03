"""kubetune's trainer: `kubetune train` / `python -m kubetune.trainer` / `accelerate launch -m
kubetune.trainer`, a drop-in for diffusers' train_text_to_image.py. Importing this package does not
import torch; `kubetune.trainer.train` does."""
