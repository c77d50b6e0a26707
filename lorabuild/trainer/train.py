"""The training run: from a checked config to a LoRA file, with checkpoints and resume.

This module owns the order of a run (pre-flight file checks before the slow imports, model,
dataset cache, LoRA, optimizer, resume, the step loop, checkpoints, the final file) and the
determinism rules of docs/trainer.md: the sample order of an epoch comes from a generator
seeded by (seed, epoch) and each step's noise and timesteps from one seeded by (seed, step),
drawn for the whole effective batch at once. A resumed run therefore repeats exactly what
the interrupted one would have done, and so does a run whose effective batch is split
differently into batch size × accumulation (up to float rounding).
"""

from __future__ import annotations

import copy
import gc
import hashlib
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from lorabuild.trainer import checkpoints as ckpt
from lorabuild.trainer.config import StepPlan, TrainerConfig, plan_steps
from lorabuild.trainer.dataset import DatasetFiles, dataset_files
from lorabuild.trainer.demo import is_demo_model
from lorabuild.trainer.events import Emitter, Interrupted, TrainerError
from lorabuild.trainer.model import check_model_folder

if TYPE_CHECKING:
    import torch

    from lorabuild.trainer.lora import LoRANetwork

STATE_FORMAT: Final = 1


MEMORY_HEADROOM_ENV = "LORABUILD_MEMORY_HEADROOM_MB"


def cap_memory(torch: Any) -> None:
    """With LORABUILD_MEMORY_HEADROOM_MB set, cap this process's address space (RLIMIT_AS) at what
    it uses once its libraries and model are loaded, plus that headroom: a real memory limit for a
    shared machine, and how the tests make a large batch genuinely run out of memory."""
    headroom = os.environ.get(MEMORY_HEADROOM_ENV)
    if not headroom or not sys.platform.startswith("linux"):
        return
    import resource

    # oneDNN reports a failed allocation only as "could not create a primitive"; PyTorch's own
    # kernels name it, which keeps a capped run's message the same on every CPU
    torch.backends.mkldnn.enabled = False
    torch.ones(256, 256) @ torch.ones(256, 256)  # start the thread pools before the cap
    with open("/proc/self/status", encoding="ascii") as status:
        size = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
    limit = size + int(float(headroom) * 2**20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


@dataclass
class RunOptions:
    """The command-line switches that change a run but not its config."""

    max_steps: int | None = None
    checkpoints: bool = True
    resume: bool = True
    lora_out: Path | None = None


@dataclass
class StopControl:
    """Shared with the signal handlers. Before training starts a stop request raises at once
    (there is nothing to save); once `armed`, it is only noted and honoured after the step."""

    requested: bool = False
    armed: bool = False
    reason: str = ""
    step: int = 0  # the last step done, for the `interrupted` event

    def request(self, reason: str) -> None:
        first = not self.requested
        self.requested = True
        self.reason = self.reason or reason
        if not self.armed and first:
            raise Interrupted(reason)

    def check(self) -> None:
        if self.requested and not self.armed:
            raise Interrupted(self.reason)


def derive_seed(seed: int, *parts: object) -> int:
    """An independent 63-bit seed for (seed, parts...), the same on every machine."""
    digest = hashlib.sha256("/".join(str(p) for p in (seed, *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _generator(seed: int, *parts: object) -> torch.Generator:
    import torch

    return torch.Generator(device="cpu").manual_seed(derive_seed(seed, *parts))


def resolve_device(name: str) -> torch.device:
    import torch

    if name == "cpu":
        return torch.device("cpu")
    usable = torch.cuda.is_available()
    if name == "cuda" and not usable:
        raise TrainerError(
            "config",
            "The config asks for device 'cuda', but this torch cannot use a CUDA GPU (no GPU, no driver, "
            "or a CPU-only torch build). Fix: set device to 'auto' or 'cpu', or install a CUDA build of "
            "torch.",
            f"torch {torch.__version__}, cuda available: {usable}",
        )
    return torch.device("cuda" if usable else "cpu")


def default_threads(small_model: bool) -> int:
    """The thread count when the config leaves it open: a function of the machine and the
    model only, so losses stay reproducible run to run on that machine."""
    import torch

    if small_model:
        # The demo model's kernels are too small to split: one thread is as fast as two
        # (measured on 2 cores) and cannot be slowed down by competing for cores.
        return 1
    # torch's own default: the physical cores, or OMP_NUM_THREADS.
    return max(1, int(torch.get_num_threads()))


def _steps_in_epoch(plan: StepPlan, epoch: int) -> int:
    return min(plan.steps_per_epoch, plan.total_steps - (epoch - 1) * plan.steps_per_epoch)


@dataclass
class _Position:
    step: int = 0  # optimizer steps done
    epoch: int = 1  # epoch the next step belongs to
    in_epoch: int = 0  # steps of that epoch already done
    epoch_losses: list[float] = field(default_factory=list)


class Run:
    """One invocation of the trainer."""

    def __init__(
        self,
        cfg: TrainerConfig,
        opts: RunOptions,
        emitter: Emitter,
        stop: StopControl,
        started: float | None = None,
    ) -> None:
        self.cfg = cfg
        self.opts = opts
        self.out = emitter
        self.stop = stop
        self.started = time.monotonic() if started is None else started
        self.training_started_at = time.time()
        self.last_checkpoint: Path | None = None
        self.pos = _Position()
        self.sampler: Any = None  # lorabuild.trainer.sampling.Sampler, when there are prompts to render
        self.unet: Any = None

    # ----------------------------------------------------------------- setup

    def preflight(self) -> tuple[DatasetFiles, StepPlan]:
        """Checks that need no torch, so the common mistakes fail in well under a second."""
        cfg = self.cfg
        if cfg.model.demo is None:
            check_model_folder(cfg.model.path)
        files = dataset_files(cfg.dataset)
        t = cfg.training
        plan = plan_steps(
            len(files.images),
            cfg.dataset.repeats,
            t.batch_size,
            t.gradient_accumulation,
            t.epochs,
            t.max_train_steps,
        )
        return files, plan

    def run(self) -> int:
        cfg, t = self.cfg, self.cfg.training
        files, plan = self.preflight()
        self.stop.check()

        import torch

        threads = cfg.threads or default_threads(cfg.model.demo is not None or is_demo_model(cfg.model.path))
        torch.set_num_threads(threads)
        device = resolve_device(cfg.device)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
        self.out.emit("start", pid=os.getpid(), device=device.type, threads=threads, torch=torch.__version__)

        from lorabuild.trainer.lora import LoRANetwork
        from lorabuild.trainer.model import ensure_model, load_model

        loading = time.monotonic()
        ensure_model(cfg.model.path, cfg.model.demo)
        self.stop.check()
        weight_dtype = torch.float32
        if device.type == "cuda" and t.mixed_precision != "no":
            # Frozen weights in half precision halve the memory; the LoRA itself stays fp32.
            weight_dtype = torch.float16 if t.mixed_precision == "fp16" else torch.bfloat16
        model = load_model(cfg.model.path, device, weight_dtype)
        network = LoRANetwork(model.unet, t.rank, t.alpha, derive_seed(t.seed, "lora-init")).to(device)
        cap_memory(torch)  # after every library and the model are loaded: the cap is for training itself
        self.out.emit(
            "model_loaded",
            seconds=round(time.monotonic() - loading, 3),
            model=str(cfg.model.path),
            lora_modules=len(network.module_paths),
            lora_params=network.parameter_count(),
        )
        self.stop.check()

        # Known from the files alone, so announced before the (on real models, long) encoding.
        self.out.emit(
            "dataset",
            images=len(files.images),
            captions=files.caption_files,
            repeats=cfg.dataset.repeats,
            samples_per_epoch=plan.samples_per_epoch,
            steps_per_epoch=plan.steps_per_epoch,
            total_steps=plan.total_steps,
            epochs=plan.epochs,
        )
        from lorabuild.trainer.dataset import encode_dataset

        data = encode_dataset(files, model, t.resolution, t.flip_aug, device)
        self._dataset_warnings(files, data.truncated)
        s = cfg.samples
        if s.prompts and self.opts.checkpoints:  # a dry run renders nothing
            from lorabuild.trainer.sampling import Sampler

            self.sampler = Sampler.prepare(model, s.prompts, s.steps, s.seed, t.resolution, cfg.output.samples)
            self.unet = model.unet
        # Only the UNet (and the VAE, to decode samples) is needed from here on; free the rest
        # before the memory-hungry part.
        model.text_encoder = None
        if self.sampler is None:
            model.vae = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        self.stop.check()

        network.attach()
        if t.gradient_checkpointing:
            model.unet.enable_gradient_checkpointing()
        from lorabuild.trainer.optim import build_optimizer, lr_factor

        optimizer = build_optimizer(t.optimizer, network.parameters(), t.learning_rate, t.optimizer_args)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_factor(t.lr_scheduler, t.lr_warmup_steps, plan.total_steps)
        )
        scaler = torch.amp.GradScaler("cuda") if (device.type == "cuda" and t.mixed_precision == "fp16") else None
        if t.lr_scheduler == "constant" and t.lr_warmup_steps:
            self.out.warning(
                "lr_warmup_steps is ignored with lr_scheduler 'constant'; use 'constant_with_warmup' to warm up."
            )

        if self.opts.checkpoints:
            ckpt.clean_stale_temporaries(cfg.output.checkpoints)
        if self.opts.resume:
            self._resume(network, optimizer, scheduler, scaler, plan)
        self.stop.check()
        return self._train(model, network, data, optimizer, scheduler, scaler, plan, device)

    def _dataset_warnings(self, files: DatasetFiles, truncated: tuple[str, ...]) -> None:
        missing = [p.name for p, c in zip(files.images, files.captions, strict=True) if not c]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            self.out.warning(
                f"{len(missing)} image(s) have no caption (or an empty one) and train with an "
                f"empty prompt: {shown}. Add {self.cfg.dataset.caption_extension} files if that "
                "is not intended."
            )
        if truncated:
            shown = ", ".join(truncated[:5]) + (f" and {len(truncated) - 5} more" if len(truncated) > 5 else "")
            self.out.warning(
                f"{len(truncated)} caption(s) are longer than the text encoder reads and were "
                f"cut off: {shown}. Shorten them to keep every word."
            )

    # ---------------------------------------------------------------- resume

    def _resume(self, network: LoRANetwork, optimizer: Any, scheduler: Any, scaler: Any, plan: StepPlan) -> None:
        import torch

        # A candidate that fails half-way must not leave half its state behind.
        fresh = (
            copy.deepcopy(network.state_dict()),
            copy.deepcopy(optimizer.state_dict()),
            copy.deepcopy(scheduler.state_dict()),
        )
        for candidate in ckpt.resumable(self.cfg.output.checkpoints, self.cfg.resume_key):
            try:
                state = torch.load(candidate.state_file, map_location="cpu", weights_only=True)
                if state.get("format") != STATE_FORMAT:
                    raise ValueError(f"state format {state.get('format')!r}")
                if state["steps_per_epoch"] != plan.steps_per_epoch:
                    raise ValueError(
                        f"it was made with {state['steps_per_epoch']} steps per epoch, this run has "
                        f"{plan.steps_per_epoch} (the effective batch or the dataset changed)"
                    )
                network.load_state_dict(state["lora"])
                optimizer.load_state_dict(state["optimizer"])
                scheduler.load_state_dict(state["scheduler"])
                if scaler is not None and state.get("scaler"):
                    scaler.load_state_dict(state["scaler"])
            except Exception as exc:
                from lorabuild.trainer.events import is_out_of_memory

                if is_out_of_memory(exc):
                    raise
                network.load_state_dict(fresh[0])
                optimizer.load_state_dict(fresh[1])
                scheduler.load_state_dict(fresh[2])
                self.out.warning(
                    f"Checkpoint {candidate.path} cannot be resumed from ({_brief(exc)}); trying an older "
                    "one or starting over."
                )
                continue
            self._restore_rng(state.get("rng") or {})
            step, epoch = int(state["step"]), int(state["epoch"])
            if state["epoch_done"]:
                self.pos = _Position(step=step, epoch=epoch + 1, in_epoch=0)
            else:
                self.pos = _Position(
                    step=step,
                    epoch=epoch,
                    in_epoch=step - (epoch - 1) * plan.steps_per_epoch,
                    epoch_losses=[float(x) for x in state.get("epoch_losses", [])],
                )
            self.training_started_at = float(state.get("training_started_at", self.training_started_at))
            self.last_checkpoint = candidate.path
            self.stop.step = step
            self.out.emit("resumed", step=step, epoch=epoch, checkpoint=str(candidate.path))
            return

    @staticmethod
    def _rng_state() -> dict[str, Any]:
        import torch

        rng: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return rng

    @staticmethod
    def _restore_rng(rng: dict[str, Any]) -> None:
        # Training draws from its own seeded generators; the global states are restored only
        # so that any library randomness also continues where it left off.
        import torch

        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if "python" in rng:
            python_state = rng["python"]
            random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    # ------------------------------------------------------------------ loop

    def _train(
        self,
        model: Any,
        network: LoRANetwork,
        data: Any,
        optimizer: Any,
        scheduler: Any,
        scaler: Any,
        plan: StepPlan,
        device: torch.device,
    ) -> int:
        import torch
        import torch.nn.functional as F

        from lorabuild.trainer.optim import current_lr

        t = self.cfg.training
        unet, noise_scheduler = model.unet, model.noise_scheduler
        latents = data.latents.to(device)
        flipped = data.flipped_latents.to(device) if data.flipped_latents is not None else None
        text = data.text.to(device)
        n_images = latents.shape[0]
        effective = t.batch_size * t.gradient_accumulation
        stop_at = plan.total_steps
        if self.opts.max_steps is not None:
            stop_at = min(stop_at, self.pos.step + self.opts.max_steps)
        autocast: Any = nullcontext()
        if t.mixed_precision != "no":
            amp_dtype = torch.float16 if t.mixed_precision == "fp16" else torch.bfloat16
            autocast = torch.autocast(device_type=device.type, dtype=amp_dtype)
        num_train_timesteps = int(noise_scheduler.config.num_train_timesteps)

        self.stop.step = self.pos.step
        self.stop.armed = True
        while self.pos.step < stop_at:
            epoch = self.pos.epoch
            steps_this_epoch = _steps_in_epoch(plan, epoch)
            order = torch.randperm(plan.samples_per_epoch, generator=_generator(t.seed, "epoch", epoch))
            while self.pos.in_epoch < steps_this_epoch and self.pos.step < stop_at:
                began = time.monotonic()
                step = self.pos.step + 1
                k = self.pos.in_epoch
                samples = order[k * effective : (k + 1) * effective] % n_images
                n = samples.shape[0]
                gen = _generator(t.seed, "step", step)
                noise = torch.randn((n, *latents.shape[1:]), generator=gen)
                timesteps = torch.randint(0, num_train_timesteps, (n,), generator=gen)
                if t.noise_offset:
                    noise = noise + t.noise_offset * torch.randn((n, latents.shape[1], 1, 1), generator=gen)
                flips = torch.rand(n, generator=gen) < 0.5 if flipped is not None else None
                noise, timesteps = noise.to(device), timesteps.to(device)

                step_loss = 0.0
                for m in range(0, n, t.batch_size):
                    idx = samples[m : m + t.batch_size].to(device)
                    x0 = latents[idx]
                    if flipped is not None and flips is not None:
                        x0 = torch.where(flips[m : m + t.batch_size].to(device).view(-1, 1, 1, 1), flipped[idx], x0)
                    eps, ts = noise[m : m + t.batch_size], timesteps[m : m + t.batch_size]
                    noisy = noise_scheduler.add_noise(x0, eps, ts)
                    target = eps if model.prediction_type == "epsilon" else noise_scheduler.get_velocity(x0, eps, ts)
                    with autocast:
                        pred = unet(noisy, ts, encoder_hidden_states=text[idx]).sample
                    # Sum of per-sample means over the step's sample count: the gradient is the
                    # same however the effective batch is split into micro-batches.
                    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3)).sum() / n
                    (scaler.scale(loss) if scaler is not None else loss).backward()
                    step_loss += float(loss.detach())
                if not math.isfinite(step_loss):
                    raise TrainerError(
                        "nan",
                        f"The loss became {step_loss} at step {step}, so the LoRA would be ruined; training "
                        "stopped. This usually means the learning rate is too high (or fp16 overflowed). "
                        "Fix: lower training.learning_rate (e.g. by 10×), use mixed_precision bf16 or no, "
                        "and run again.",
                        f"step {step}, epoch {epoch}, loss {step_loss}, lr {current_lr(optimizer)}",
                    )
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                lr = current_lr(optimizer)
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)

                self.pos.step, self.pos.in_epoch = step, k + 1
                self.pos.epoch_losses.append(step_loss)
                self.stop.step = step
                self.out.emit(
                    "step",
                    step=step,
                    total_steps=plan.total_steps,
                    epoch=epoch,
                    epochs=plan.epochs,
                    loss=step_loss,
                    lr=lr,
                    step_seconds=round(time.monotonic() - began, 4),
                )

                if self.pos.in_epoch == steps_this_epoch:
                    self._end_epoch(network, optimizer, scheduler, scaler, plan)
                if self.stop.requested and self.pos.step < plan.total_steps:
                    return self._interrupt(network, optimizer, scheduler, scaler, plan)
            if self.pos.in_epoch == steps_this_epoch:
                self.pos = _Position(step=self.pos.step, epoch=epoch + 1)
        # Still armed: a signal now is noted but the finished LoRA is written regardless.
        return self._finish(network, plan, completed=self.pos.step >= plan.total_steps)

    def _end_epoch(self, network: LoRANetwork, optimizer: Any, scheduler: Any, scaler: Any, plan: StepPlan) -> None:
        epoch = self.pos.epoch
        losses = self.pos.epoch_losses
        self.out.emit(
            "epoch",
            epoch=epoch,
            epochs=plan.epochs,
            step=self.pos.step,
            mean_loss=sum(losses) / len(losses) if losses else float("nan"),
        )
        if self.sampler is not None:
            cadence = self.cfg.samples.every_n_epochs or self.cfg.checkpoints.every_n_epochs
            if (cadence and epoch % cadence == 0) or epoch == plan.epochs:
                self._render_samples(epoch)
        every = self.cfg.checkpoints.every_n_epochs
        if self.opts.checkpoints and every and epoch % every == 0 and epoch < plan.epochs:
            self._save_checkpoint(
                ckpt.epoch_dir_name(epoch),
                f"{self.cfg.name}-epoch-{epoch:04d}.safetensors",
                network,
                optimizer,
                scheduler,
                scaler,
                plan,
                epoch_done=True,
            )

    def _render_samples(self, epoch: int) -> None:
        began = time.monotonic()
        seed = self.cfg.samples.seed
        paths = self.sampler.render(self.unet, epoch, lambda index: derive_seed(seed, "sample", index))
        for index, path in enumerate(paths):
            self.out.emit("sample", epoch=epoch, index=index + 1, prompt=self.sampler.prompts[index], path=str(path))
        self.out.emit("samples_done", epoch=epoch, count=len(paths), seconds=round(time.monotonic() - began, 3))

    def _interrupt(self, network: LoRANetwork, optimizer: Any, scheduler: Any, scaler: Any, plan: StepPlan) -> int:
        from lorabuild.trainer.events import EXIT_SIGNAL

        saved: Path | None = None
        if self.opts.checkpoints:
            if self.last_checkpoint is not None and self._checkpoint_step(self.last_checkpoint) == self.pos.step:
                saved = self.last_checkpoint  # the epoch save just written is this very point
            else:
                epoch_done = self.pos.in_epoch == _steps_in_epoch(plan, self.pos.epoch)
                step = self.pos.step
                saved = self._save_checkpoint(
                    ckpt.step_dir_name(step),
                    f"{self.cfg.name}-step-{step:08d}.safetensors",
                    network,
                    optimizer,
                    scheduler,
                    scaler,
                    plan,
                    epoch_done=epoch_done,
                )
        self.out.emit("interrupted", step=self.pos.step, checkpoint=str(saved) if saved else None)
        return EXIT_SIGNAL

    @staticmethod
    def _checkpoint_step(path: Path) -> int | None:
        found = ckpt.read_checkpoint(path)
        return found.step if found else None

    # ----------------------------------------------------------------- files

    def metadata(self, plan: StepPlan, step: int, epoch: int) -> dict[str, str]:
        from lorabuild import __version__
        from lorabuild.trainer.optim import optimizer_label

        cfg, t = self.cfg, self.cfg.training
        family = (cfg.model.family or "").lower()
        base_version = (
            "sd_v1"
            if family.startswith(("sd1", "sd_1", "sd-1"))
            else "sd_v2"
            if family.startswith(("sd2", "sd_2", "sd-2"))
            else family or "sd_v1"
        )
        meta = {
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(t.rank),
            "ss_network_alpha": str(t.alpha),
            "ss_base_model_version": base_version,
            "ss_sd_model_name": cfg.model.demo or cfg.model.path.name,
            "ss_steps": str(step),
            "ss_epoch": str(epoch),
            "ss_num_epochs": str(plan.epochs),
            "ss_max_train_steps": str(plan.total_steps),
            "ss_learning_rate": str(t.learning_rate),
            "ss_unet_lr": str(t.learning_rate),
            "ss_optimizer": optimizer_label(t.optimizer, t.optimizer_args),
            "ss_lr_scheduler": t.lr_scheduler,
            "ss_lr_warmup_steps": str(t.lr_warmup_steps),
            "ss_resolution": f"({t.resolution}, {t.resolution})",
            "ss_seed": str(t.seed),
            "ss_noise_offset": str(t.noise_offset),
            "ss_mixed_precision": t.mixed_precision,
            "ss_num_train_images": str(plan.samples_per_epoch),
            "ss_output_name": cfg.name,
            "ss_training_started_at": repr(self.training_started_at),
            "ss_network_args": "{}",
            "lorabuild_version": __version__,
        }
        meta.update(cfg.metadata)
        return meta

    def _state(
        self,
        network: LoRANetwork,
        optimizer: Any,
        scheduler: Any,
        scaler: Any,
        plan: StepPlan,
        epoch_done: bool,
    ) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "step": self.pos.step,
            "epoch": self.pos.epoch,
            "epoch_done": epoch_done,
            "epoch_losses": [] if epoch_done else list(self.pos.epoch_losses),
            "steps_per_epoch": plan.steps_per_epoch,
            "total_steps": plan.total_steps,
            "lora": {k: v.detach().cpu().clone() for k, v in network.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": self._rng_state(),
            "training_started_at": self.training_started_at,
            "resume_key": self.cfg.resume_key,
        }

    def _save_checkpoint(
        self,
        dirname: str,
        lora_name: str,
        network: LoRANetwork,
        optimizer: Any,
        scheduler: Any,
        scaler: Any,
        plan: StepPlan,
        epoch_done: bool,
    ) -> Path:
        import torch
        from safetensors.torch import save_file

        t = self.cfg.training
        tensors = network.export(t.save_precision)
        meta = self.metadata(plan, self.pos.step, self.pos.epoch)
        state = self._state(network, optimizer, scheduler, scaler, plan, epoch_done)
        info = {
            "step": self.pos.step,
            "epoch": self.pos.epoch,
            "resume_key": self.cfg.resume_key,
            "kind": "epoch" if dirname.startswith("epoch-") else "step",
            "lora": lora_name,
            "epoch_done": epoch_done,
        }
        path = ckpt.write_checkpoint(
            self.cfg.output.checkpoints,
            dirname,
            info,
            {
                lora_name: lambda p: save_file(tensors, str(p), metadata=meta),
                ckpt.STATE_FILE: lambda p: torch.save(state, p),
            },
        )
        self.last_checkpoint = path
        self.out.emit(
            "checkpoint", epoch=self.pos.epoch, step=self.pos.step, path=str(path), lora=str(path / lora_name)
        )
        for removed in ckpt.prune(
            self.cfg.output.checkpoints, self.cfg.resume_key, self.cfg.checkpoints.keep_last, keep=path
        ):
            self.out.emit("checkpoint_removed", path=str(removed))
        return path

    def _finish(self, network: LoRANetwork, plan: StepPlan, completed: bool) -> int:
        from lorabuild.trainer.lora import save_lora

        target = self.opts.lora_out or self.cfg.output.lora
        epoch = self.pos.epoch - 1 if self.pos.in_epoch == 0 else self.pos.epoch
        size = save_lora(
            target,
            network.export(self.cfg.training.save_precision),
            self.metadata(plan, self.pos.step, max(epoch, 0)),
        )
        self.out.emit("saved", path=str(target), bytes=size)
        if completed and self.opts.checkpoints:
            # The final file is newer than any interrupt save, which is now dead weight.
            for removed in ckpt.remove_interrupt_saves(self.cfg.output.checkpoints, self.cfg.resume_key):
                self.out.emit("checkpoint_removed", path=str(removed))
        self.out.emit("done", steps=self.pos.step, seconds=round(time.monotonic() - self.started, 3))
        return 0


def _brief(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:200]}"
