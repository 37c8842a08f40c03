"""The FineTuneJob v1alpha1 API as Python models: the one source of truth.

The operator and every CLI parse, default and validate a spec with these models, and
`kubetune.api.crd` generates `crds/finetunejob.yaml` from them. A field's docstring is its
description in the CRD (and so in `kubectl explain`). Validation that JSON schema cannot say
is written twice on purpose, once as a CEL rule for the API server (`x-kubernetes-validations`)
and once as a pydantic validator for local runs; tests/test_api_crd.py checks that they agree.
"""

from __future__ import annotations

import copy
import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    StringConstraints,
    WithJsonSchema,
    model_validator,
)
from pydantic.alias_generators import to_camel

from kubetune.api import defaults, podtemplate

GROUP = "kubetune.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
SINGULAR = "finetunejob"
SHORT_NAMES = ["ftj"]
CATEGORIES = ["kubetune"]  # not "all": `kubectl get all` must not list (or delete) jobs

DATASET_SOURCES = ("unsplash", "google", "openverse", "wikimedia", "urls", "huggingface", "imagefolder")
PHASES = ("Pending", "Collecting", "Training", "Suspended", "Succeeded", "Failed")

# Bounds a real API has: every string a maxLength, every list maxItems, every number a maximum,
# names and label values their Kubernetes patterns. The API server refuses what the operator
# could not build (a Secret name that is no DNS name, a 1e300 s timeout, 200000 nodes).
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
# resource.Quantity, unsigned: 500m, 2, 1.5Gi, 1e3
QUANTITY = r"^([0-9]+(\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[numkMGTPE]|[eE][+-]?[0-9]+)?$"
NO_CONTROL = r"^[^\x00-\x1f\x7f]*$"  # one line: no newlines, NULs or escapes
REVISION = r"^[A-Za-z0-9._/-]*$"

NonEmptyStr = Annotated[str, StringConstraints(min_length=1, max_length=253)]
Text = Annotated[str, StringConstraints(min_length=1, max_length=1000, pattern=NO_CONTROL)]
Column = Annotated[str, StringConstraints(min_length=1, max_length=256, pattern=NO_CONTROL)]
Uri = Annotated[str, StringConstraints(min_length=1, max_length=2048, pattern=NO_CONTROL)]
ObjectName = Annotated[str, StringConstraints(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN)]
OptionalObjectName = Annotated[str, StringConstraints(max_length=253, pattern=f"^$|{DNS_SUBDOMAIN}")]
SecretKey = Annotated[str, StringConstraints(min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")]
LabelValue = Annotated[str, StringConstraints(max_length=63, pattern=LABEL_VALUE)]
QuantityStr = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=QUANTITY)]


def _quantity(value: Any) -> int | str:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 10**15:
        return value
    if isinstance(value, str) and len(value) <= 64 and re.fullmatch(QUANTITY, value):
        return value
    raise ValueError(f"must be a Kubernetes quantity such as 500m, 2 or 16Gi (got {value!r:.70})")


# int-or-string, as Kubernetes writes quantities (`cpu: 2`, `memory: 16Gi`); one validator, so
# an error names the field and not a union member
Quantity = Annotated[
    int | str,
    PlainValidator(_quantity),
    WithJsonSchema(
        {"x-kubernetes-int-or-string": True, "minimum": 0, "maximum": 10**15, "maxLength": 64, "pattern": QUANTITY}
    ),
]
S3Uri = Annotated[
    str, StringConstraints(max_length=1024, pattern=r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/[^\x00-\x1f\x7f]*)?$")
]
# A URI pods read: in a cluster only s3:// (a local path would be the pod's own file, e.g.
# /proc/self/environ). Local runs (`kubetune run`, `kubetune collect`) may name local files,
# so the pattern is the API server's alone; operator pods refuse local lists themselves.
ClusterUri = Annotated[Uri, Field(json_schema_extra={"pattern": r"^s3://[a-z0-9][-a-z0-9.]*(/.*)?$"})]
License = Annotated[str, StringConstraints(min_length=1, max_length=32, pattern=r"^[a-z0-9.+-]+$")]
Split = Annotated[str, StringConstraints(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9._+\[\]:%-]+$")]
Revision = Annotated[str, StringConstraints(min_length=1, max_length=256, pattern=REVISION)]


class ApiModel(BaseModel):
    """Common settings: camelCase on the wire, no coercion, no unknown fields.

    `strict` makes YAML's `no` (a boolean) an error for a string field instead of "False", and
    `extra="forbid"` matches kubectl's strict field validation of unknown fields.
    """

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        alias_generator=to_camel,
        populate_by_name=True,
        use_attribute_docstrings=True,
        validate_default=False,
    )


def validations(*rules: tuple[str, str]) -> dict[str, Any]:
    """Pydantic json_schema_extra carrying CEL rules as (rule, message) pairs into the CRD."""
    return {"x-kubernetes-validations": [{"rule": rule, "message": message} for rule, message in rules]}


# ---------------------------------------------------------------------------------------------
# spec.dataset


class SecretKeyRef(ApiModel):
    """A key of a Secret in the FineTuneJob's namespace. Its value is passed to pods as a
    secretKeyRef and never copied into the spec, status, logs or events."""

    name: ObjectName
    """Name of the Secret."""
    key: SecretKey
    """Key within the Secret whose value is used."""


class PromptSearch(ApiModel):
    """Common fields of the image-search sources."""

    prompts: list[Text] = Field(min_length=1, max_length=1000)
    """Search queries. Each image found for a prompt is captioned with that prompt."""
    images_per_prompt: int = Field(default=20, ge=1, le=10_000)
    """How many images to keep for each prompt (after filtering and deduplication)."""


class UnsplashSource(PromptSearch):
    """Photos from the Unsplash Search API (`GET /search/photos`). Unsplash's guidelines
    discourage using photos to train AI models: you must hold the right to do so."""

    size: Literal["raw", "full", "regular", "small", "thumb"] = "regular"
    """Which Unsplash size variant to download; `raw` is resized by Unsplash to the dataset
    resolution, so no bandwidth is wasted."""
    access_key_secret_ref: SecretKeyRef
    """Secret key holding the Unsplash API access key (`Authorization: Client-ID`)."""


class GoogleSource(PromptSearch):
    """Images from the Google Custom Search JSON API (`searchType=image`; at most 100 results
    per query)."""

    images_per_prompt: int = Field(default=20, ge=1, le=100)
    """How many images to keep for each prompt; the API returns at most 100 per query."""
    api_key_secret_ref: SecretKeyRef
    """Secret key holding the Custom Search API key."""
    search_engine_id_secret_ref: SecretKeyRef
    """Secret key holding the Programmable Search Engine id (`cx`)."""
    safe_search: bool = True
    """Ask Google to filter explicit results (`safe=active`)."""


class OpenverseSource(PromptSearch):
    """Openly licensed images from the Openverse search API."""

    license_type: Literal["all", "all-cc", "commercial", "modification"] = "all"
    """Openverse `license_type` filter: `commercial` allows commercial use, `modification`
    allows derivatives."""
    licenses: list[License] = Field(default_factory=list, max_length=32)
    """Openverse `license` filter, e.g. `by`, `by-sa`, `cc0`, `pdm`. Empty means any."""
    client_id_secret_ref: SecretKeyRef | None = None
    """Secret key holding an Openverse OAuth client id (raises the anonymous rate limit)."""
    client_secret_secret_ref: SecretKeyRef | None = None
    """Secret key holding the matching Openverse OAuth client secret."""


class WikimediaSource(PromptSearch):
    """Files from Wikimedia Commons through the MediaWiki API, with license and author."""

    contact: Annotated[str, StringConstraints(max_length=256, pattern=NO_CONTROL)] = ""
    """Contact (e-mail or URL) added to the User-Agent, as Wikimedia's policy asks."""


class UrlsSource(ApiModel):
    """A list of image URLs with captions: JSON Lines, CSV or Parquet."""

    uri: ClusterUri
    """Where the list is: `s3://bucket/key` (a local path only for `kubetune run` on your own
    machine)."""
    format: Literal["auto", "jsonl", "csv", "parquet"] = "auto"
    """File format; `auto` decides by the file extension."""
    url_column: Column = "url"
    """Column (or JSON key) holding the image URL."""
    caption_column: Column = "caption"
    """Column (or JSON key) holding the caption."""


class HuggingFaceSource(ApiModel):
    """A dataset on the Hugging Face Hub, read by streaming so a subset is not downloaded whole."""

    name: Annotated[str, StringConstraints(min_length=1, max_length=1024, pattern=NO_CONTROL)]
    """Dataset repository id, e.g. `lambdalabs/naruto-blip-captions`."""
    split: Split = "train"
    """Split to read."""
    revision: Annotated[str, StringConstraints(max_length=256, pattern=REVISION)] = ""
    """Git revision of the dataset repository; empty means the default branch."""
    image_column: Column = "image"
    """Column holding the image."""
    caption_column: Column = "text"
    """Column holding the caption."""
    max_samples: int | None = Field(default=None, ge=1, le=1_000_000_000)
    """Take at most this many rows."""
    token_secret_ref: SecretKeyRef | None = None
    """Secret key holding a Hugging Face token, for gated or private datasets."""


class ImageFolderSource(ApiModel):
    """An imagefolder that already exists (`metadata.jsonl` with `file_name` and `text`). It is
    used as it is: no collector runs."""

    uri: Uri
    """Folder holding `metadata.jsonl` (or `train/metadata.jsonl`), e.g. `s3://bucket/datasets/mine/`."""


class Captioning(ApiModel):
    """Captions generated by an image-to-text model in the trainer pods before the latent cache is
    built (on their GPUs, split over them), stored beside the dataset's own text (kept) under
    `.kubetune/captions/`, and reused by resumes and later jobs with the same settings."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            ("self.mode != 'prefix' || (has(self.trigger) && self.trigger != '')", "mode prefix needs a trigger"),
        )
    )

    model: Uri
    """A transformers image-to-text or image-text-to-text model (BLIP, Florence-2, a small VLM):
    Hugging Face Hub id, or an `s3://` folder."""
    mode: Literal["replace", "append", "prefix"] = "replace"
    """What training reads: the generated caption (`replace`), the original text followed by it
    (`append`), or `trigger` followed by it (`prefix`)."""
    prompt: Annotated[str, StringConstraints(max_length=1000, pattern=NO_CONTROL)] = ""
    """Instruction for instruction models (e.g. `<MORE_DETAILED_CAPTION>` for Florence-2); BLIP
    takes it as the start of the caption."""
    trigger: Annotated[str, StringConstraints(max_length=256, pattern=NO_CONTROL)] = ""
    """The word or phrase put before each caption in mode `prefix` (e.g. `sks lighthouse`)."""
    max_new_tokens: int = Field(default=30, ge=1, le=1024)
    """Longest generated caption, in tokens."""
    batch_size: int = Field(default=8, ge=1, le=1024)
    """Images captioned at once per GPU."""

    @model_validator(mode="after")
    def _prefix_needs_trigger(self) -> Captioning:
        if self.mode == "prefix" and not self.trigger:
            raise ValueError("mode prefix needs a trigger")
        return self


class RelevanceFilter(ApiModel):
    """Drop images whose CLIP similarity to their original text (the prompt they were found for,
    or the dataset's caption) is below a threshold. Computed in the trainer pods beside
    captioning; the scores are stored beside the dataset under `.kubetune/clip-scores/`."""

    min_clip_score: float = Field(ge=0, le=1)
    """Lowest cosine similarity of CLIP's image and text embeddings kept (CLIPScore / 100; 0.2 to
    0.3 is typical of matching pairs for ViT-B/32)."""
    model: Uri = "openai/clip-vit-base-patch32"
    """The CLIP model: Hugging Face Hub id, or an `s3://` folder."""


class Dataset(ApiModel):
    """Where the training images and captions come from. Set exactly one source."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            (
                "[" + ", ".join(f"has(self.{s})" for s in DATASET_SOURCES) + "].exists_one(x, x)",
                "exactly one dataset source must be set: " + ", ".join(DATASET_SOURCES),
            ),
        )
    )

    unsplash: UnsplashSource | None = None
    """Search Unsplash for each prompt."""
    google: GoogleSource | None = None
    """Search Google Images (Custom Search JSON API) for each prompt."""
    openverse: OpenverseSource | None = None
    """Search Openverse for each prompt."""
    wikimedia: WikimediaSource | None = None
    """Search Wikimedia Commons for each prompt."""
    urls: UrlsSource | None = None
    """Download a list of URLs with captions."""
    huggingface: HuggingFaceSource | None = None
    """Read a Hugging Face dataset."""
    imagefolder: ImageFolderSource | None = None
    """Use an existing imagefolder; nothing is collected."""
    captioning: Captioning | None = None
    """Generate captions with an image-to-text model (the original text is kept beside them)."""
    filter: RelevanceFilter | None = None
    """Drop off-topic images by CLIP score."""
    resolution: int = Field(default=512, ge=64, le=8192)
    """Stored images are resized so their shorter side is this many pixels (aspect kept, never
    upscaled)."""
    min_size: int = Field(default=256, ge=1, le=8192)
    """Images whose shorter side is below this many pixels are skipped."""
    dedupe: bool = True
    """Drop exact duplicates (same decoded content)."""
    near_dedupe: bool = False
    """Also drop near-duplicates (same perceptual hash)."""
    allow_private_network: bool = False
    """Allow downloads from loopback, private and link-local addresses (off: protects cloud
    metadata endpoints and in-cluster services)."""

    @model_validator(mode="after")
    def _exactly_one_source(self) -> Dataset:
        if sum(getattr(self, s) is not None for s in DATASET_SOURCES) != 1:
            raise ValueError("exactly one dataset source must be set: " + ", ".join(DATASET_SOURCES))
        return self

    @property
    def source_name(self) -> str:
        return next(s for s in DATASET_SOURCES if getattr(self, s) is not None)

    @property
    def source(self) -> ApiModel:
        return getattr(self, self.source_name)  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------------------------
# spec.model, spec.training


class BaseModelSpec(ApiModel):
    """The diffusers Stable Diffusion (1.x, 2.x or XL) pipeline to start from."""

    base: Uri
    """Hugging Face Hub id (e.g. `stable-diffusion-v1-5/stable-diffusion-v1-5`) or an `s3://`
    folder holding a diffusers pipeline."""
    revision: Revision = "main"
    """Hub revision (branch, tag or commit)."""
    variant: Annotated[str, StringConstraints(max_length=64, pattern=r"^[A-Za-z0-9._-]*$")] = ""
    """Weights variant to load, e.g. `fp16`; empty loads the default weights."""
    token_secret_ref: SecretKeyRef | None = None
    """Secret key holding a Hugging Face token, for gated or private models."""
    family: Literal["auto", "", "sd", "sdxl", "sd3", "flux"] = "auto"
    """The model family: `sd` (Stable Diffusion 1.x/2.x), `sdxl` (Stable Diffusion XL), `sd3`
    (Stable Diffusion 3/3.5) or `flux` (FLUX.1); `auto` (or empty) takes it from the pipeline's
    `model_index.json`."""


class AspectBuckets(ApiModel):
    """Aspect-ratio bucketing: each image is trained at the bucket (height x width, both sides
    multiples of `step`, area about `resolution` squared) nearest its shape, instead of a square
    crop; a batch holds one bucket. SDXL is conditioned on each image's true size and crop."""

    enabled: bool = False
    """Train in aspect-ratio buckets (`--enable_bucket`)."""
    step: int = Field(default=defaults.BUCKET_STEP, ge=8, le=512, multiple_of=8)
    """Bucket sides are multiples of this many pixels."""
    min_side: int | None = Field(default=None, ge=8, le=8192, multiple_of=8)
    """Shortest bucket side in pixels; unset: half of `training.resolution`."""
    max_side: int | None = Field(default=None, ge=8, le=16384, multiple_of=8)
    """Longest bucket side in pixels; unset: twice `training.resolution`."""


class DreamBooth(ApiModel):
    """DreamBooth subject training (diffusers' train_dreambooth.py): every image of the dataset is
    the subject, trained with `instancePrompt`; with `priorPreservation` each batch also holds class
    images (generated from `classPrompt` by the base model when missing, and kept beside the
    dataset under `.kubetune/class-images/` for later jobs) whose loss keeps the class's prior."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            (
                "!self.priorPreservation || (has(self.classPrompt) && self.classPrompt != '')",
                "classPrompt is required when priorPreservation is true",
            ),
        )
    )

    instance_prompt: Text
    """The prompt of every instance image, naming the subject with a rare token, e.g. `a photo of sks dog`."""
    class_prompt: Annotated[str, StringConstraints(max_length=1000, pattern=NO_CONTROL)] = ""
    """The prompt of the class images, e.g. `a photo of dog`; required with `priorPreservation`."""
    prior_preservation: bool = False
    """Add the prior-preservation loss on class images (against overfitting and language drift)."""
    prior_loss_weight: float = Field(default=1.0, ge=0, le=10)
    """Weight of the class images' loss."""
    num_class_images: int = Field(default=100, ge=1, le=10000)
    """Class images used; the missing ones are generated with the base model before training."""
    sample_batch_size: int = Field(default=4, ge=1, le=64)
    """Class images generated at once per GPU."""

    @model_validator(mode="after")
    def _prior_preservation_needs_class_prompt(self) -> DreamBooth:
        if self.prior_preservation and not self.class_prompt:
            raise ValueError("classPrompt is required when priorPreservation is true")
        return self


class Training(ApiModel):
    """Training settings: the flags of diffusers' train_text_to_image.py, flag for flag."""

    method: Literal["full", "lora"] = defaults.METHOD
    """`full` fine-tunes the whole UNet; `lora` trains low-rank adapters (much less memory)."""
    lora_rank: int = Field(default=defaults.LORA_RANK, ge=1, le=1024)
    """LoRA rank (method lora)."""
    lora_alpha: int | None = Field(default=None, ge=1, le=4096)
    """LoRA alpha: the update is scaled by alpha / rank; unset: the rank (scale 1)."""
    lora_layers: list[Annotated[str, StringConstraints(max_length=128, pattern=r"^[A-Za-z0-9_.]+$")]] = Field(
        default_factory=list, max_length=64
    )
    """Modules the adapters target, by name suffix (e.g. `to_q`, `ff.net.2`); empty: the family's
    (attention q, k, v, out)."""
    resolution: int = Field(default=defaults.RESOLUTION, ge=8, multiple_of=8, le=8192)
    """Training resolution in pixels; a multiple of 8."""
    center_crop: bool = True
    """Crop the center instead of a random crop."""
    random_flip: bool = True
    """Flip images horizontally at random."""
    buckets: AspectBuckets = Field(default_factory=AspectBuckets)
    """Aspect-ratio buckets (off by default: every image is cropped to a square)."""
    dreambooth: DreamBooth | None = None
    """DreamBooth subject training on the dataset's images (unset: text-to-image fine-tuning on their captions)."""
    train_text_encoder: bool = False
    """Train the text encoders too (`--train_text_encoder`): SD's CLIP, both of SDXL's, FLUX's CLIP,
    SD3's two CLIPs; T5 stays frozen. Full weights, or LoRA adapters on their attention with method
    `lora`. Not with `trainer.strategy: fsdp`."""
    text_encoder_learning_rate: float | None = Field(default=None, gt=0, le=1)
    """The text encoders' peak learning rate with `trainTextEncoder`; unset: `learningRate`."""
    batch_size: int = Field(default=1, ge=1, le=4096)
    """Images per process per step (`--train_batch_size`)."""
    gradient_accumulation_steps: int = Field(default=4, ge=1, le=4096)
    """Micro-batches accumulated per optimizer step."""
    gradient_checkpointing: bool = True
    """Recompute activations in the backward pass: less memory, about 20% slower."""
    mixed_precision: Literal["fp32", "fp16", "bf16"] = "bf16"
    """Autocast precision; weights stay fp32. `fp32` is the original script's `no`."""
    optimizer: Literal["adamw", "adamw_8bit", "adafactor"] = defaults.OPTIMIZER
    """`adamw` (torch); `adamw_8bit`: AdamW with 8-bit moments (bitsandbytes, which the trainer image
    must include), 6 instead of 12 bytes per parameter with the fp32 gradient; `adafactor`
    (transformers): factored second moments, no first moment, at this learning rate (no relative
    step). Not with `trainer.strategy: fsdp`, which shards AdamW."""
    max_train_steps: int = Field(default=100, ge=1, le=100_000_000)
    """Optimizer steps to train."""
    learning_rate: float = Field(default=1e-5, gt=0, le=1)
    """Peak learning rate."""
    scale_lr: bool = False
    """Multiply the learning rate by processes x batch size x accumulation steps."""
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = defaults.LR_SCHEDULER
    """Learning-rate schedule."""
    lr_warmup_steps: int = Field(default=0, ge=0, le=100_000_000)
    """Steps of linear warm-up."""
    max_grad_norm: float = Field(default=defaults.MAX_GRAD_NORM, ge=0, le=1e6)
    """Gradient clipping norm; 0 disables clipping."""
    adam_beta1: float = Field(default=defaults.ADAM_BETA1, ge=0, lt=1)
    """AdamW beta1."""
    adam_beta2: float = Field(default=defaults.ADAM_BETA2, ge=0, lt=1)
    """AdamW beta2."""
    adam_weight_decay: float = Field(default=defaults.ADAM_WEIGHT_DECAY, ge=0, le=10)
    """AdamW weight decay."""
    adam_epsilon: float = Field(default=defaults.ADAM_EPSILON, gt=0, le=1)
    """AdamW epsilon."""
    use_ema: bool = True
    """Keep an exponential moving average of the trained weights and publish it."""
    allow_tf32: bool = True
    """Allow TF32 matmuls and convolutions on Ampere and newer GPUs."""
    compile: bool = False
    """Compile the UNet with torch.compile (slower start, faster steps)."""
    seed: int | None = Field(default=None, ge=0, le=4_294_967_295)
    """Random seed; unset picks one and records it in the checkpoint."""
    snr_gamma: float | None = Field(default=None, gt=0, le=1000)
    """Min-SNR loss weighting gamma (5.0 is the paper's choice); unset uses plain MSE."""
    noise_offset: float = Field(default=0.0, ge=0, le=1)
    """Noise offset (0.05-0.1 helps very dark or bright images)."""
    prediction_type: Literal["", "epsilon", "v_prediction"] = ""
    """Training target; empty keeps the scheduler's own."""
    weighting_scheme: Literal["", "sigma_sqrt", "logit_normal", "mode", "cosmap", "none"] = ""
    """Flow-matching families (flux, sd3): timestep density and loss weighting; empty: the stock
    script's (flux: none, sd3: logit_normal)."""
    logit_mean: float = Field(default=0.0, ge=-10, le=10)
    """Mean of the logit_normal timestep density."""
    logit_std: float = Field(default=1.0, gt=0, le=10)
    """Standard deviation of the logit_normal timestep density."""
    mode_scale: float = Field(default=1.29, ge=-10, le=10)
    """Scale of the mode timestep density."""
    guidance_scale: float = Field(default=3.5, ge=0, le=100)
    """FLUX.1-dev: the distilled guidance given to the transformer while training."""
    max_sequence_length: int | None = Field(default=None, ge=1, le=4096)
    """T5 tokens per caption (flux, sd3); unset: the stock script's (flux 512, sd3 77)."""
    max_train_samples: int | None = Field(default=None, ge=1, le=1_000_000_000)
    """Use at most this many images of the dataset."""
    dataloader_num_workers: int = Field(default=2, ge=0, le=64)
    """Data loading worker processes per training process."""
    checkpoint_every_steps: int = Field(default=defaults.CHECKPOINT_EVERY_STEPS, ge=1, le=100_000_000)
    """Save a resumable checkpoint to storage every this many steps (and when preempted). A full
    SD 1.5 checkpoint (UNet, EMA, AdamW state) is about 14 GB: the stock script's 500 steps."""
    checkpoints_to_keep: int = Field(default=2, ge=1, le=1000)
    """Keep this many most recent complete checkpoints."""
    resume_mismatch: Literal["refuse", "restart"] = "refuse"
    """When the checkpoint in storage was written with other settings (method, model, global
    batch size, resolution, LoRA rank, data): `refuse` fails the job (reason InvalidInput);
    `restart` trains again from step 0 and deletes the old checkpoints once the new run's first
    checkpoint is complete."""
    max_nonfinite_steps: int = Field(default=0, ge=0, le=1000)
    """Skip up to this many steps whose loss or gradients are NaN/inf, then fail the job (reason
    TrainingDiverged). 0 fails at the first. Nothing non-finite is checkpointed or published."""
    validation_prompts: list[Text] = Field(default_factory=list, max_length=64)
    """Prompts rendered to sample images at every checkpoint and at the end."""
    validation_every_steps: int | None = Field(default=None, ge=1, le=100_000_000)
    """Render validation samples every this many steps; unset means at every checkpoint."""
    validation_guidance_scale: float = Field(default=defaults.VALIDATION_GUIDANCE_SCALE, ge=0, le=100)
    """Classifier-free guidance scale of the validation samples (7.5, the diffusers pipeline's
    default); 1 renders them without guidance, for a model never trained on empty captions."""


# ---------------------------------------------------------------------------------------------
# spec.trainer, spec.collector, spec.storage, spec.runPolicy


def _kubernetes(schema: dict[str, Any]) -> Any:
    """A validator for a field whose value is a Kubernetes object (kept as the dict it is), checked
    against `schema`: the Kubernetes API's own, cut to what kubetune accepts (kubetune.api.podtemplate)."""

    def check(value: Any) -> dict[str, Any]:
        problem = podtemplate.validate(schema, value)
        if problem:
            # ".field: ..." (load.py joins it to the field's path), or ": ..." about the value itself
            if problem.startswith(": "):  # load.py adds the value itself
                problem = problem[2:].split(" (got ")[0]
            raise ValueError(problem)
        return copy.deepcopy(value)

    return PlainValidator(check)


_AFFINITY = podtemplate.affinity_schema()
_TRAINER_POD = podtemplate.pod_template_schema("trainer")
_COLLECTOR_POD = podtemplate.pod_template_schema("collector")
Affinity = Annotated[dict[str, Any], _kubernetes(_AFFINITY), WithJsonSchema(podtemplate.for_crd(_AFFINITY))]
TrainerPodTemplate = Annotated[
    dict[str, Any], _kubernetes(_TRAINER_POD), WithJsonSchema(podtemplate.for_crd(_TRAINER_POD))
]
CollectorPodTemplate = Annotated[
    dict[str, Any], _kubernetes(_COLLECTOR_POD), WithJsonSchema(podtemplate.for_crd(_COLLECTOR_POD))
]


class ResourceRequirements(ApiModel):
    """Container resources, as in a Pod spec: quantities such as `500m`, `2`, `16Gi`."""

    requests: dict[str, Quantity] = Field(default_factory=dict, max_length=32)
    """Resources the pods are scheduled by."""
    limits: dict[str, Quantity] = Field(default_factory=dict, max_length=32)
    """Most the pods may use."""

    def items(self) -> list[tuple[str, dict[str, int | str]]]:
        """The set kinds as a Pod spec writes them (`requests`, `limits`)."""
        kinds = (("requests", self.requests), ("limits", self.limits))
        return [(kind, dict(values)) for kind, values in kinds if values]


class Toleration(ApiModel):
    """A pod toleration, as in a Pod spec."""

    key: Annotated[str, StringConstraints(max_length=317, pattern=r"^[A-Za-z0-9./_-]*$")] = ""
    """Taint key to tolerate; empty with operator `Exists` tolerates every taint."""
    operator: Literal["Exists", "Equal"] = "Equal"
    """`Equal` matches the value; `Exists` any value."""
    value: LabelValue = ""
    """Taint value (operator `Equal`)."""
    effect: Literal["", "NoSchedule", "PreferNoSchedule", "NoExecute"] = ""
    """Taint effect to tolerate; empty means all."""
    toleration_seconds: int | None = Field(default=None, ge=0, le=31_536_000)
    """How long a `NoExecute` taint is tolerated; unset means forever."""


class PodSettings(ApiModel):
    """Scheduling and resources of a component's pods."""

    image: Annotated[str, StringConstraints(max_length=512, pattern=r"^[^\s]*$")] = ""
    """Container image; empty uses the operator's default for this component."""
    resources: ResourceRequirements = Field(default_factory=ResourceRequirements)
    """Container resources (requests and limits), as in a Pod spec."""
    node_selector: dict[str, LabelValue] = Field(default_factory=dict, max_length=64)
    """Node labels the pods must match."""
    tolerations: list[Toleration] = Field(default_factory=list, max_length=64)
    """Pod tolerations, as in a Pod spec."""
    affinity: Affinity = Field(default_factory=dict)
    """Pod affinity, as in a Pod spec (the same as podTemplate.spec.affinity, and merged over it)."""
    priority_class_name: OptionalObjectName = ""
    """PriorityClass of the pods."""
    service_account_name: OptionalObjectName = ""
    """ServiceAccount the pods run as (e.g. for IAM roles to reach S3)."""


class Trainer(PodSettings):
    """The distributed training pods: one pod per node, one process per GPU."""

    nodes: int = Field(default=1, ge=1, le=1000)
    """Number of trainer pods (machines)."""
    gpus_per_node: int = Field(default=1, ge=0, le=16)
    """GPUs per pod (`nvidia.com/gpu`); 0 trains on CPU with one process per pod."""
    shm_size: QuantityStr = "8Gi"
    """Size of the memory-backed /dev/shm (dataloader workers and NCCL need it)."""
    staging_size: Annotated[str, StringConstraints(max_length=64, pattern=f"^$|{QUANTITY}")] = ""
    """Size limit of the pods' /tmp volume (an emptyDir on the node's disk): checkpoint staging (at
    most two checkpoints being written and uploaded, and one being resumed) and the base model's
    download. A full SD 1.5 checkpoint is about 14 GB and the model about 5 GB. Empty: the
    operator's default (chart value `trainer.stagingSize`, 64Gi)."""
    port: int = Field(default=29500, ge=1024, le=65535)
    """Rendezvous port of the rank-0 pod."""
    pod_template: TrainerPodTemplate = Field(default_factory=dict)
    """A strategic-merge overlay of the trainer pods' template (env, volumes, imagePullSecrets, labels...);
    the operator's own fields win. See docs/operator.md."""
    strategy: Literal["auto", "ddp", "fsdp"] = defaults.STRATEGY
    """`ddp`: every process holds the whole model (data parallel). `fsdp`: the model's weights,
    gradients and optimizer state are sharded across every GPU of every node (torch FSDP2; full
    fine-tunes, for models such as FLUX.1 whose AdamW state does not fit one GPU). `auto`: `fsdp`
    when the trained parameters' weights, gradients and AdamW state (16 bytes each) would not fit
    one GPU, else `ddp`."""
    fsdp_cpu_offload: bool = False
    """With `strategy: fsdp`: keep weight shards, gradients and optimizer state in CPU memory (the
    optimizer steps on the CPU): less GPU memory, slower steps."""


class Collector(PodSettings):
    """The dataset collector pods."""

    shards: int = Field(default=1, ge=1, le=256)
    """Pods the collection is split across (an Indexed Job)."""
    workers: int = Field(default=16, ge=1, le=256)
    """Concurrent downloads per pod."""
    timeout_seconds: float = Field(default=30.0, gt=0, le=3600)
    """Per-request timeout: to connect, and between two reads. A whole download (retries and
    redirects included) may take four times as long."""
    active_deadline_seconds: int | None = Field(default=None, ge=60, le=604_800)
    """Fail the collection when it has run this long; unset means one day (and never longer
    than `runPolicy.activeDeadlineSeconds`)."""
    pod_template: CollectorPodTemplate = Field(default_factory=dict)
    """A strategic-merge overlay of the collector pods' template (env, volumes, imagePullSecrets,
    labels...); the operator's own fields win. See docs/operator.md."""


class CredentialsSecretRef(ApiModel):
    """A Secret with the keys `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`."""

    name: ObjectName
    """Name of the Secret."""


class Storage(ApiModel):
    """Where the job keeps everything it makes."""

    uri: S3Uri = Field(json_schema_extra=validations(("self == oldSelf", "storage.uri is immutable")))
    """`s3://bucket/prefix/`. The dataset, cache, checkpoints, samples, progress and the final
    model live under it; deleting the FineTuneJob leaves them in place."""
    endpoint: Annotated[str, StringConstraints(max_length=2048, pattern=r"^(https?://[^\s]+)?$")] = ""
    """S3 endpoint URL for S3-compatible stores (MinIO, Ceph); empty uses AWS."""
    region: Annotated[str, StringConstraints(max_length=64, pattern=r"^[a-z0-9-]*$")] = ""
    """S3 region; empty uses the SDK's default."""
    credentials_secret_ref: CredentialsSecretRef | None = None
    """Secret with S3 credentials; unset uses the pods' own identity (IRSA, instance role)."""


# the Hub's repository ids: namespace/name, each letters, digits, '-', '_', '.', at most 96
HUB_NAME = r"[A-Za-z0-9]([A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
HUB_REPO = f"^{HUB_NAME}/{HUB_NAME}$"


class HubPush(ApiModel):
    """A Hugging Face Hub model repository the trained model is pushed to after it is published to
    `storage.uri`: the model, its card and the final validation samples, in one commit."""

    repo: Annotated[str, StringConstraints(max_length=193, pattern=HUB_REPO)]
    """The repository, `namespace/name` (created when missing)."""
    token_secret_ref: SecretKeyRef
    """Secret key holding a Hub token with write access to `repo`."""
    private: bool = False
    """Create the repository private (an existing repository's visibility is kept)."""
    revision: Annotated[str, StringConstraints(max_length=255, pattern=REVISION)] = ""
    """Branch to push to, created from main when missing; empty means main."""
    push_checkpoints: bool = False
    """Also push each checkpoint's trained weights (not the optimizer state) to `checkpoint-N/` in
    the repository as it is stored, keeping as many as `training.checkpointsToKeep`."""


class Output(ApiModel):
    """Where the model and the run's metrics go besides `storage.uri`."""

    hub: HubPush | None = None
    """Push the model to the Hugging Face Hub."""
    report_to: Literal["tensorboard", "wandb", "mlflow", "all", "none"] = "tensorboard"
    """Experiment trackers (`--report_to`): TensorBoard logs under `logs/` in storage unless `none`;
    `wandb` or `mlflow` also record the settings, loss, learning rate, images/s and validation
    images, configured by their own variables (`WANDB_API_KEY`, `MLFLOW_TRACKING_URI`, ...) set
    through `trainer.podTemplate`; `all`: TensorBoard and those configured."""
    tracker_project_name: Annotated[
        str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._-]*$")
    ] = "text2image-fine-tune"
    """The wandb project or MLflow experiment the run is recorded in."""


class RunPolicy(ApiModel):
    """How failures and time limits are handled."""

    backoff_limit: int = Field(default=3, ge=0, le=1000)
    """Failed attempts allowed before the job fails. Preemptions are counted apart and do not
    use this budget."""
    active_deadline_seconds: int | None = Field(default=None, ge=1, le=31_536_000)
    """Fail the job when it has run this long."""
    queue_name: Annotated[str, StringConstraints(max_length=63, pattern=r"^$|^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")] = ""
    """Kueue LocalQueue; when set, child Jobs are created suspended for Kueue to admit."""


class FineTuneJobSpec(ApiModel):
    """What to collect, what to train, and where to keep it."""

    suspend: bool = False
    """Suspend the job: running pods stop, training later continues from its checkpoint."""
    dataset: Dataset
    """Training data source and image processing."""
    model: BaseModelSpec
    """The pipeline to fine-tune."""
    training: Training = Field(default_factory=Training)
    """Training hyperparameters."""
    trainer: Trainer = Field(default_factory=Trainer)
    """Training pods."""
    collector: Collector = Field(default_factory=Collector)
    """Collector pods."""
    storage: Storage
    """Where the job's artifacts are stored."""
    output: Output | None = None
    """Where the model is pushed besides `storage.uri`."""
    run_policy: RunPolicy = Field(default_factory=RunPolicy)
    """Retries, deadlines and queueing."""


class JobDefaults(ApiModel):
    """The operator's defaults for every job's pods (chart value `jobDefaults`, the operator's
    --job-defaults file): pod-template overlays applied under each job's own `podTemplate`."""

    collector: CollectorPodTemplate = Field(default_factory=dict)
    """Overlay of every collector pod's template."""
    trainer: TrainerPodTemplate = Field(default_factory=dict)
    """Overlay of every trainer pod's template."""


# ---------------------------------------------------------------------------------------------
# status


class Condition(ApiModel):
    """A condition, as Kubernetes API conventions define it."""

    type: NonEmptyStr
    """Condition type, e.g. Ready, Succeeded, DatasetReady, Training."""
    status: Literal["True", "False", "Unknown"]
    """True, False or Unknown."""
    reason: str = ""
    """CamelCase reason for the last transition."""
    message: str = ""
    """Human-readable details."""
    last_transition_time: datetime | None = None
    """When the status last changed."""
    observed_generation: int | None = None
    """The spec generation this condition was set for."""


class DatasetStatus(ApiModel):
    """What the collector produced."""

    uri: str = ""
    """Where the dataset is."""
    requested: int = 0
    """Images asked for."""
    kept: int = 0
    """Images kept."""
    skipped: dict[str, int] = Field(default_factory=dict)
    """Skipped images by reason."""


class TrainingStatus(ApiModel):
    """Live training progress, from the trainer's progress.json."""

    step: int = 0
    """Optimizer steps done."""
    max_steps: int = 0
    """Optimizer steps to do."""
    progress: str = ""
    """Percent done, e.g. `45%`."""
    epoch: int = 0
    """Current epoch."""
    loss: str = ""
    """Recent training loss (a string so that kubectl prints it as is)."""
    images_per_second: str = ""
    """Recent throughput over all processes."""
    eta_seconds: int | None = None
    """Estimated seconds left."""
    eta: str = ""
    """Estimated time left as a duration, e.g. `12m` or `1h5m` (what `kubectl get ftj -o wide` shows)."""
    latest_checkpoint: str = ""
    """URI of the newest complete checkpoint."""
    updated_at: datetime | None = None
    """When this progress was last read."""


class Attempt(ApiModel):
    """One run of the trainer pods."""

    index: int
    """Attempt number, from 0."""
    reason: str = ""
    """Why it ended: Succeeded, Failed, Preempted, Suspended, or empty while running."""
    start_step: int = 0
    """Step it resumed from."""
    end_step: int | None = None
    """Step it reached."""
    start_time: datetime | None = None
    """When it started."""
    end_time: datetime | None = None
    """When it ended."""


class FineTuneJobStatus(ApiModel):
    """Observed state, written by the operator."""

    phase: Literal["Pending", "Collecting", "Training", "Suspended", "Succeeded", "Failed"] = "Pending"
    """Where the job is in its life."""
    message: str = ""
    """What is happening, or why it failed."""
    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    """Conditions, keyed by type."""
    observed_generation: int | None = None
    """The spec generation last acted on."""
    dataset: DatasetStatus | None = None
    """Collected dataset."""
    training: TrainingStatus | None = None
    """Training progress."""
    restarts: int = 0
    """Failed trainer attempts (these use the backoff budget)."""
    preemptions: int = 0
    """Preempted trainer attempts (these do not)."""
    attempts: list[Attempt] = Field(default_factory=list)
    """Trainer attempts, oldest first."""
    model_uri: str = ""
    """The published diffusers model."""
    samples_uri: str = ""
    """Validation sample images."""
    checkpoints_uri: str = ""
    """Resumable checkpoints."""
    start_time: datetime | None = None
    """When the job started."""
    completion_time: datetime | None = None
    """When the job finished."""


class ObjectMeta(BaseModel):
    """The part of metadata kubetune reads; the rest is kept as it is."""

    model_config = ConfigDict(extra="allow")

    name: str = ""
    namespace: str = ""
    generation: int | None = None
    uid: str = ""


class FineTuneJob(ApiModel):
    """A FineTuneJob: collect a captioned image dataset and fine-tune a Stable Diffusion model."""

    api_version: Literal["kubetune.dev/v1alpha1"] = Field(default="kubetune.dev/v1alpha1", alias="apiVersion")
    kind: Literal["FineTuneJob"] = "FineTuneJob"
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: FineTuneJobSpec
    status: FineTuneJobStatus | None = None
