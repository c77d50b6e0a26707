"""Plain-language explanations: the one home of every line that explains a term to an artist.

Every report, prompt and error that shows a technical term takes its explanation from here, so
the same term is always explained the same way. `Explainer` adds the line the first time a term
appears in one piece of output and stays quiet after that.
"""

from __future__ import annotations

from dataclasses import dataclass, field

TERMS: dict[str, str] = {
    # --- the run ---
    "lora": "a small add-on file that teaches a base model your character or style",
    "base_model": "the big image model your LoRA is trained on top of and later used with",
    "family": "which kind of base model this is (SD 1.5, SDXL, Pony or Flux); each needs different settings",
    "dataset": "the folder of training pictures, each with a text file describing it",
    "caption": "the text file next to a picture that says what is in it",
    "backend": "the training program that does the actual work: kohya, SimpleTuner, ai-toolkit or lorabuild's own",
    "preset": "a ready-made starting point: quick, standard or thorough",
    "gate": "a check that must pass before the next, more expensive step is allowed to start",
    "dry_run": "a few real training steps to prove everything works before the long run",
    "checkpoint": "a saved snapshot of the LoRA part-way through training, so you can compare or resume",
    "resume": "continue an interrupted training from its newest checkpoint instead of starting over",
    "run_folder": "the folder where lorabuild keeps everything about one training",
    "spec": "your training.yaml: the one file that describes what to train and how",
    # --- training parameters ---
    "learning_rate": "how big a step the model takes each time it learns; too high ruins it, too low learns nothing",
    "text_encoder_lr": "learning rate for the part that reads captions; usually lower or switched off",
    "epochs": "how many times training goes through your whole dataset",
    "repeats": "how many times each picture is shown per epoch; more repeats for small datasets",
    "batch_size": "how many pictures the model looks at together in one step; bigger needs more memory",
    "gradient_accumulation": "add up several small batches before learning: a bigger batch without the memory",
    "effective_batch": "batch size × gradient accumulation: how many pictures count towards each learning step",
    "steps": "one learning step: the model looks at one (effective) batch and adjusts itself once",
    "resolution": "the picture size used for training, in pixels; the base model has a size it was made for",
    "rank": "how much the LoRA can learn (its size); higher captures more detail but makes bigger files",
    "alpha": "scales the LoRA's strength during training; usually half the rank or equal to it",
    "optimizer": "the method that decides how the model adjusts itself after each step",
    "optimizer_args": "extra settings passed to the optimizer",
    "lr_scheduler": "how the learning rate changes over the run (stays constant, or slowly goes down)",
    "lr_warmup_steps": "steps at the start where the learning rate rises gently from zero",
    "mixed_precision": "doing most maths in a 16-bit number format to save memory and time",
    "gradient_checkpointing": "saves memory by recomputing some work instead of storing it; a bit slower",
    "seed": "a number that fixes the randomness, so the same settings give the same result",
    "max_train_steps": "stop after this many steps, whatever the epoch count says",
    "noise_offset": "a small tweak that helps the LoRA learn very dark and very bright pictures",
    "min_snr_gamma": "evens out how much each noise level counts during training; 5 is common",
    "flip_aug": "also train on mirror images; doubles variety but breaks asymmetric designs",
    "shuffle_caption": "shuffle the comma-separated tags in captions so no tag order is memorised",
    "keep_tokens": "how many leading caption tags stay in place when captions are shuffled",
    "clip_skip": "use an earlier layer of the caption reader; anime-style SD 1.5 models expect 2",
    "cache_latents": "convert pictures into the model's compressed form once, instead of every step",
    "cache_text_encoder_outputs": "read every caption once and keep the result, saving memory and time",
    "train_text_encoder": "also teach the caption reader; more likeness, more risk of overfitting",
    "base_precision": "the number format the frozen base model is kept in (smaller formats save memory)",
    "save_precision": "the number format of the saved LoRA file; fp16 halves its size",
    "network_dropout": "randomly ignores part of the LoRA during training to avoid memorising",
    "bucketing": "sorts pictures of different shapes into groups, so nothing has to be cropped square",
    "every_n_epochs": "save a checkpoint after every this many epochs",
    "keep_last": "how many checkpoints to keep; older ones are deleted to save disk space",
    "plateau_epochs": "warn when the loss has not improved for this many epochs",
    # --- the rest of the spec ---
    "version": "the spec format's version; always 1 for now",
    "name": "the LoRA's short name; it names the run folder and the finished file",
    "demo": "lorabuild's tiny built-in model for trying things out; it learns simple shapes on any computer",
    "vae": "the part of the model that turns pictures into its compressed form and back; a separate file "
    "replaces the model's own",
    "caption_extension": "the ending of your caption files' names, e.g. .txt for picture1.txt",
    "backend_path": "where the training program is installed",
    "backend_python": "the Python that runs the training program (its own environment)",
    "grimoire": "the folder that holds every run folder and lorabuild's bookkeeping",
    "compute_target": "where training runs: this computer (local), a machine over SSH, or a rented cloud GPU "
    "(runpod, vastai)",
    "gpu_count": "how many graphics cards training uses",
    "ssh": "how to reach the remote machine over SSH: its address, user name, port and key file",
    "remote_dir": "the working folder on the remote machine",
    "max_price_per_hour": "the most you will pay per hour for a cloud GPU, in US dollars",
    "min_reliability": "skip cloud machines less reliable than this (0 to 1)",
    "region": "where in the world the cloud machine should be",
    "disk_gb": "disk space to rent with the cloud machine, in GB",
    "image": "the software image the cloud machine starts from",
    "max_hours": "a deadline: the cloud machine deletes itself after this many hours, so it never runs up a bill",
    "instance": "a rented cloud computer with a GPU; it costs money every minute until it is deleted",
    "ssh_login": "SSH: the secure way lorabuild logs in to another computer to run commands and copy files",
    "host_key": "the fingerprint SSH recognises a machine by; a different one means a different machine",
    "offer": "one GPU a cloud provider has for rent right now, at its current price per hour",
    "self_delete": "the rented computer deletes itself with its own limited key, even if your computer is gone",
    "plateau_min_delta": "how much the smoothed loss must improve to count as progress",
    "divergence_epochs": "warn when the loss has gone up for this many epochs in a row",
    "divergence_tolerance": "how much the loss may rise (0.15 = 15%) before it counts as going up",
    "spike_factor": "a loss this many times above its recent average counts as an explosion",
    "ema_beta": "how slowly the smoothed loss follows the real one (closer to 1 = smoother)",
    "stop_on_nan": "stop training at once when the loss becomes NaN (not a number)",
    "sample_prompts": "prompts for sample pictures rendered during training, to watch the LoRA learn",
    "sample_every_n_epochs": "render the sample pictures after every this many epochs",
    "sample_steps": "how many denoising steps each sample picture takes; more is slower but cleaner",
    # --- numbers in reports ---
    "loss": "how wrong the model's guesses are; it should drift down, though it jumps around a lot",
    "smoothed_loss": "the loss averaged over recent steps, so the trend is visible through the noise",
    "vram": "the memory on your graphics card; training must fit in it",
    "ram": "your computer's main memory; the builtin trainer uses it when there is no graphics card",
    "gpu": "the graphics card that does the training",
    "cuda": "NVIDIA's software layer that lets programs use the graphics card",
    "pytorch": "the maths library every one of these trainers is built on",
    "driver": "the NVIDIA program that lets your computer talk to its graphics card",
    "oom": "out of memory: the training needed more memory than the card has",
    "safety_margin": "we keep 20% of memory free, because real usage spikes above any estimate",
    "safetensors": "the safe, standard file format for model weights",
    "plateau": "the loss has stopped going down, so the model may have stopped learning",
    "divergence": "the loss is going up instead of down, so something may be wrong",
    "explosion": "the loss became NaN (not a number) or jumped hugely: training has broken",
}


def explain(term: str) -> str:
    """The one-line explanation of `term`; a KeyError names a term nobody explained yet."""
    return TERMS[term]


@dataclass
class Explainer:
    """Adds a term's explanation the first time it appears in one piece of output."""

    seen: set[str] = field(default_factory=set)

    def first(self, term: str) -> str:
        """The explanation the first time `term` is asked for, '' afterwards."""
        if term in self.seen:
            return ""
        self.seen.add(term)
        return TERMS[term]

    def lines_given(self) -> list[str]:
        """The explanations already given in this piece of output."""
        return [TERMS[t] for t in self.seen]

    def label(self, term: str, shown: str | None = None) -> str:
        """`shown` (default: the term) followed by its explanation in brackets the first time."""
        text = shown or term.replace("_", " ")
        line = self.first(term)
        return f"{text} ({line})" if line else text
