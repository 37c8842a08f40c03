"""`--strategy fsdp`: the denoiser's parameters, gradients and optimizer state sharded across every
process of every node with torch's FSDP2 (`fully_shard`), checkpoints written in parallel with
torch.distributed.checkpoint (DCP).

accelerate 1.16 still starts the processes and the process group, but FSDP2 is driven here:
accelerate's `FullyShardedDataParallelPlugin` is silently ignored when the processes run on CPUs
(AcceleratorState only turns MULTI_GPU-like types into DistributedType.FSDP; MULTI_CPU stays DDP),
so the CPU tests could not exercise it, and the training loop needs the sharded tensors anyway
(checkpoints, EMA, gathering the published model).

What is sharded: each block of the denoiser (every element of a child ModuleList: FLUX's
transformer_blocks and single_transformer_blocks, SD3's transformer_blocks, a UNet's down/up
blocks, and its mid_block), then the root (embeddings, norms, the output projection). Parameters
stay fp32 shards (the master weights); with bf16, FSDP2 all-gathers them as bf16 for the forward
and backward and reduces gradients in fp32 (MixedPrecisionPolicy). The EMA is an EMA of the local
shards (the same elementwise update on each shard), so it costs 4 bytes per parameter / world.

Checkpoints: `<denoiser>_sharded/` in checkpoint-N holds DCP's files (one `__<rank>_0.distcp` per
rank, written by that rank, and `.metadata`) of the model, optimizer and EMA state; `optimizer.pt`
holds the LR schedule. DCP reshards on load, so a checkpoint resumes on another world size too
(the global batch must still match, as for every resume).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("kubetune.trainer")

BYTES_PER_PARAM = 16  # fp32 weights (4) + fp32 gradients (4) + AdamW's two fp32 moments (8)
SHARDED_SUFFIX = "_sharded"


def choose(strategy: str, trainable_params: int, world: int, gpu_memory: int | None) -> str:
    """`ddp` or `fsdp`. auto: FSDP when the weights, gradients and AdamW state of the trainable
    parameters (16 bytes each) would not fit one GPU's memory (`gpu_memory` bytes; None: no GPU),
    and there is more than one process to shard across; DDP otherwise (always on CPU)."""
    if strategy != "auto":
        return strategy
    if gpu_memory is None or world < 2:
        return "ddp"
    needed = trainable_params * BYTES_PER_PARAM
    picked = "fsdp" if needed > gpu_memory else "ddp"
    log.info(
        "--strategy auto: %s (%.1f GiB of weights, gradients and AdamW state; %.1f GiB per GPU)",
        picked,
        needed / 2**30,
        gpu_memory / 2**30,
    )
    return picked


def gpu_memory(device: torch.device) -> int | None:
    """Bytes of memory of the process's GPU; None on CPU."""
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None


def blocks(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The denoiser's blocks, each sharded as one unit (all-gathered just before it runs)."""
    found: list[torch.nn.Module] = []
    for name, child in module.named_children():
        if isinstance(child, torch.nn.ModuleList):
            found.extend(child)
        elif name == "mid_block" and child is not None:
            found.append(child)
    return found


class Sharded:
    """The sharded denoiser: how it is wrapped, stepped, checkpointed and gathered."""

    def __init__(
        self,
        denoiser: torch.nn.Module,
        device: torch.device,
        world: int,
        precision: str,
        cpu_offload: bool,
        from_first_process: bool = False,
    ):
        """`from_first_process`: only process 0's denoiser holds weights (the others' are on the
        meta device); each process gets its shards of them."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        if world == 1 and not torch.distributed.is_initialized():
            # accelerate starts no process group for one process; FSDP needs one (of one)
            from kubetune.launch import free_port

            backend = "nccl" if device.type == "cuda" else "gloo"
            address = f"tcp://127.0.0.1:{free_port()}"
            torch.distributed.init_process_group(backend, init_method=address, rank=0, world_size=1)
        self.mesh = init_device_mesh(device.type, (world,))
        param_dtype = torch.bfloat16 if precision == "bf16" else None
        settings: dict[str, Any] = {
            "mesh": self.mesh,
            "mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32),
            "offload_policy": CPUOffloadPolicy() if cpu_offload else OffloadPolicy(),
        }
        first = self.mesh.get_rank() == 0
        # process 0's full weights, kept from before sharding (the same tensors: no copy)
        full = dict(denoiser.state_dict()) if from_first_process and first else {}
        for block in blocks(denoiser):
            fully_shard(block, **settings)
        fully_shard(denoiser, **settings)
        if from_first_process:
            self._receive_weights(denoiser, full, device, first)
        self.denoiser = denoiser
        local = sum(p.to_local().numel() for p in denoiser.parameters())
        log.info(
            "--strategy fsdp: %d blocks sharded across %d processes (%d of %d parameters here)%s",
            len(blocks(denoiser)),
            world,
            local,
            sum(p.numel() for p in denoiser.parameters()),
            "; optimizer state and shards in CPU memory" if cpu_offload else "",
        )

    @staticmethod
    def _receive_weights(denoiser: torch.nn.Module, full: dict[str, torch.Tensor], device: torch.device, first: bool):
        """Every process's shards of process 0's weights (torch's broadcast_from_rank0), and its
        buffers (those not in the state dict too), sent from process 0."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        if not first:
            denoiser.to_empty(device=device)
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(denoiser, full, options=options)
        for buffer in denoiser.buffers():
            torch.distributed.broadcast(buffer.data, src=0)
        full.clear()
        log.info("--strategy fsdp: the denoiser's weights read by process 0 only, sharded to the others")

    @staticmethod
    def local(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to_local() if hasattr(tensor, "to_local") else tensor

    def clip_grad_norm(self, params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
        """The global gradient norm (every shard's), after clipping to `max_norm`."""
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    @contextlib.contextmanager
    def no_sync(self, sync: bool) -> Iterator[None]:
        # gradients are reduce-scattered after every micro-batch: accumulating unsharded gradients
        # instead would cost what sharding saves
        yield

    # -- checkpoints -----------------------------------------------------------------------------

    def _state(self, optimizer: Any, ema: Any, names: list[str]) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, optim = get_state_dict(self.denoiser, optimizer)
        state: dict[str, Any] = {"model": model, "optimizer": optim}
        if ema is not None:
            state["ema"] = dict(zip(names, ema.shadow_params, strict=True))
        return state

    def save(self, folder: Path, optimizer: Any, ema: Any, names: list[str]) -> None:
        """Every process writes its shards of the model, optimizer and EMA (collective)."""
        import torch.distributed.checkpoint as dcp

        dcp.save(self._state(optimizer, ema, names), checkpoint_id=str(folder))

    def load(self, folder: Path, optimizer: Any, ema: Any, names: list[str]) -> None:
        """The shards of `save`, resharded by DCP when the world size differs (collective)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = self._state(optimizer, ema, names)
        dcp.load(state, checkpoint_id=str(folder))  # in place; the EMA's shadow tensors included
        set_state_dict(self.denoiser, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])

    def full_denoiser(self, denoiser_type: Any, main: bool) -> Any:
        """An ordinary module with the full weights on the main process (None elsewhere), for
        save_pretrained; collective: every process sends its shards."""
        from accelerate import init_empty_weights
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(self.denoiser, options=options)
        if not main:
            return None
        with init_empty_weights():  # parameters on the meta device: no second random init of the model
            plain = denoiser_type.from_config(self.denoiser.config)
        plain.load_state_dict(state, assign=True)
        return plain.float().eval()
