"""The flow-matching families (FLUX.1, SD 3.5), as diffusers' train_dreambooth(_lora)_flux.py and
train_dreambooth_lora_sd3.py train them: a transformer predicts the velocity `noise - latents` at
a point `(1 - sigma) * latents + sigma * noise` of the straight path between them; the timestep
is drawn from `--weighting_scheme`'s density (logit-normal, mode, or uniform for cosmap,
sigma_sqrt and none) and the error weighed by the same scheme (diffusers.training_utils).

The draw uses each sample's own generator (diffusers' `compute_density_for_timestep_sampling`
with `generator=`), so resume is exact and N processes draw what one draws."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from kubetune.trainer.families.base import FamilyError, ModelFamily


class FlowMatchingFamily(ModelFamily):
    denoiser_folder = "transformer"
    scheduler_class = "FlowMatchEulerDiscreteScheduler"
    lora_in_diffusers_keys = False
    objective = "flow matching"
    default_weighting: ClassVar[str] = "none"
    default_max_sequence_length: ClassVar[int] = 512
    precondition: ClassVar[bool] = False
    """SD3's `--precondition_outputs`: the loss compares `noisy - sigma * prediction` with the latents."""

    def configure(self, cfg: Any) -> None:
        super().configure(cfg)
        if cfg.snr_gamma is not None:
            raise FamilyError(
                f"--snr_gamma: not for the {self.name} family (flow matching weighs its loss by --weighting_scheme)"
            )
        if cfg.input_perturbation:
            raise FamilyError(f"--input_perturbation: not for the {self.name} family (a DDPM-only option)")
        if cfg.prediction_type:
            raise FamilyError(f"--prediction_type: not for the {self.name} family (it predicts the flow velocity)")

    @property
    def weighting_scheme(self) -> str:
        return str(self.cfg.weighting_scheme or self.default_weighting)

    @property
    def max_sequence_length(self) -> int:
        return int(self.cfg.max_sequence_length or self.default_max_sequence_length)

    def cache_settings(self) -> dict[str, Any]:
        return {"maxSequenceLength": self.max_sequence_length}

    def draw_timestep(self, scheduler: Any, generator: torch.Generator) -> torch.Tensor:
        """The index of one sample's timestep in the scheduler's training schedule ([1])."""
        from diffusers.training_utils import compute_density_for_timestep_sampling

        cfg = self.cfg
        u = compute_density_for_timestep_sampling(
            self.weighting_scheme, 1, cfg.logit_mean, cfg.logit_std, cfg.mode_scale, generator=generator
        )
        total = scheduler.config.num_train_timesteps
        return (u * total).long().clamp(0, total - 1)

    def _schedule_on(self, scheduler: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The training schedule's sigmas (fp32) and timesteps on `device`, copied there once rather
        than every step (again only if the scheduler's tensors are replaced)."""
        source = (scheduler.sigmas, scheduler.timesteps)
        cached = getattr(self, "_schedule_cache", None)
        stale = cached is None or cached[0][0] is not source[0] or cached[0][1] is not source[1]
        if stale or cached[1] != str(device):
            cached = (source, str(device), source[0].to(device).float(), source[1].to(device))
            self._schedule_cache = cached
        return cached[2], cached[3]

    def example_losses(
        self, denoiser: Any, scheduler: Any, batch: dict[str, Any], channels_last: bool = False
    ) -> torch.Tensor:
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        latents, noise, index = batch["latents"], batch["noise"], batch["timesteps"]
        all_sigmas, all_timesteps = self._schedule_on(scheduler, latents.device)
        sigmas = all_sigmas[index].view(-1, *[1] * (latents.ndim - 1))
        timesteps = all_timesteps[index]
        noisy = (1.0 - sigmas) * latents + sigmas * noise
        prediction = self.predict(denoiser, noisy, timesteps, batch).float()
        target = noise - latents
        if self.precondition and self.cfg.precondition_outputs:
            prediction, target = prediction * (-sigmas) + noisy, latents
        weighting = compute_loss_weighting_for_sd3(self.weighting_scheme, sigmas)
        error = (weighting.float() * (prediction - target.float()) ** 2).reshape(len(latents), -1)
        return error.mean(dim=1)
