"""RCGPipeline: encoder -> representation diffusion -> MAGE -> VQ decoder, in one object.

The pipeline owns device and dtype, validates inputs, and is the one thing the transforms, the
dataset builder and the CLI call.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .config import (
    CONFIG_NAME,
    FIELDS_ADDED_LATER,
    WEIGHTS_NAME,
    ConfigError,
    PipelineConfig,
    SamplingDefaults,
)
from .files import sha256_file
from .models.encoder import RepresentationEncoder
from .models.mage import MAGE
from .models.rdm import RepresentationDenoiser
from .models.tokenizer import VQTokenizer
from .official import read_official_files
from .presets import PIPELINE_PRESETS, preset_config
from .sampling.diffusion import DDIMSampler, NoiseSchedule
from .sampling.maskgit import keep_source_tokens, maskgit_decode
from .settings import DEFAULT_NOISE_LEVEL, FULL_REPAINT, SEED_BOUND, UNSET, GenerationSettings
from .state_dicts import compare_state

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _parameter_budget(limit: int, config_path: str, weights_path: str):
    """Stop building modules (in this thread) once more than ``limit`` parameters are registered:
    a config asking for far more tensors than the weights file holds fails at once, not after
    building a million layers."""
    thread, count = threading.get_ident(), 0

    def hook(module, name, param):
        nonlocal count
        if threading.get_ident() == thread:
            count += 1
            if count > limit:
                raise ConfigError(f"{config_path} describes a model with more than {limit} parameter tensors; "
                                  f"{weights_path} holds far fewer: the config does not match the weights")

    handle = torch.nn.modules.module.register_module_parameter_registration_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _check_state_shapes(own: dict[str, tuple], found: dict[str, tuple], *, source: str) -> None:
    """One ValueError naming ``source`` and its missing, unexpected and mis-shaped keys."""
    diff = compare_state(own, found)
    if diff:
        def show(keys):
            return ", ".join(keys[:8]) + (f" ... (+{len(keys) - 8})" if len(keys) > 8 else "")
        parts = []
        if diff.missing:
            parts.append(f"missing {len(diff.missing)} keys: {show(diff.missing)}")
        if diff.unexpected:
            parts.append(f"unexpected {len(diff.unexpected)} keys: {show(diff.unexpected)}")
        if diff.wrong_shape:
            parts.append("wrong shapes: " + ", ".join(
                "{} expected {} found {}".format(k, *diff.shapes(k)) for k in diff.wrong_shape[:8]))
        raise ValueError(f"{source} does not match this pipeline's config: " + "; ".join(parts))


# Storage dtypes save_pretrained writes floating-point weights in; a pipeline always computes in
# float32 (bf16 autocast on CUDA), whatever its file stores.
WEIGHTS_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_FLOAT_STORAGE = {"F64", "F32", "F16", "BF16"}  # safetensors' names of the floating dtypes
_FLOAT16_MAX = torch.finfo(torch.float16).max


def _storage_state(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``state`` with its floating-point tensors in ``dtype`` (integer buffers as they are); a value
    that float16 cannot hold is an error naming its tensors, not a silent inf."""
    if dtype not in WEIGHTS_DTYPES:
        raise ValueError(f"`dtype` must be one of {', '.join(f'torch.{n}' for n in WEIGHTS_DTYPES.values())}, "
                         f"got {dtype!r}")
    if dtype == torch.float16:
        too_big = [k for k, v in state.items() if v.is_floating_point() and v.numel()
                   and v.abs().max().item() > _FLOAT16_MAX]
        if too_big:
            raise ValueError(f"cannot store as float16: {', '.join(too_big[:8])} hold values beyond "
                             f"+-{_FLOAT16_MAX:g}; save with dtype=torch.float32 (or torch.bfloat16)")
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def _check_state_kinds(own: dict[str, torch.Tensor], found: dict[str, str], *, source: str) -> None:
    """Weights may be stored in any float dtype (cast to float32 on load); integer buffers must
    be stored as integers."""
    wrong = [f"{k} ({found[k]})" for k, v in own.items()
             if k in found and v.is_floating_point() != (found[k] in _FLOAT_STORAGE)]
    if wrong:
        raise ValueError(f"{source}: tensors stored with the wrong kind of dtype (weights must be floating "
                         f"point, counters integers): {', '.join(wrong[:8])}")


def derive_generator(generator: torch.Generator | None, device: torch.device) -> torch.Generator | None:
    """A generator on ``device`` seeded from ``generator`` (CPU generators can't draw on CUDA)."""
    if generator is None or generator.device.type == device.type:
        return generator
    seed = int(torch.randint(0, SEED_BOUND, (1,), generator=generator).item())
    return torch.Generator(device=device).manual_seed(seed)


class RCGPipeline(nn.Module):
    """Representation-conditioned generation for augmentation.

    Example::

        pipe = RCGPipeline.from_preset("tiny")
        images = torch.rand(4, 3, 32, 32)
        variants = pipe.reconstruct(images, noise_level=0.3, generator=torch.Generator().manual_seed(0))
    """

    def __init__(self, config: PipelineConfig):
        super().__init__()
        self.config = config
        self.encoder = RepresentationEncoder(config.encoder)
        self.rdm = RepresentationDenoiser(config.rdm)
        self.tokenizer = VQTokenizer(config.tokenizer)
        self.mage = MAGE(config.mage)
        self.schedule = NoiseSchedule.from_config(config.rdm)
        self.eval()

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_preset(cls, name: str, **overrides) -> RCGPipeline:
        """A randomly initialised pipeline of a preset in :data:`~rcg_augment.presets.PIPELINE_PRESETS`:
        ``"tiny"`` (32 px, CPU-trainable), ``"rcg-b"``, ``"rcg-l"``.

        ``overrides`` may set ``in_channels`` (encoder, tokenizer) or replace whole sections with
        ``encoder=EncoderConfig(...)`` etc. (see :func:`~rcg_augment.presets.preset_config`).
        """
        return cls(preset_config(name, **overrides))

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | os.PathLike, *, device: str | torch.device | None = None, revision: str | None = None,
        cache_dir: str | os.PathLike | None = None, local_files_only: bool = False, token: str | bool | None = None,
    ) -> RCGPipeline:
        """Load a saved pipeline: a bundled name (``"digits-tiny"``), a directory written by
        :meth:`save_pretrained`, or a Hugging Face Hub id (``"org/name"``, ``"org/name@v1"``).

        ``revision`` (branch, tag or commit), ``cache_dir``, ``local_files_only`` and ``token`` apply
        to Hub ids, as in ``huggingface_hub.snapshot_download``; ``HF_HUB_OFFLINE=1`` reads the
        cache only. Only ``config.json`` and ``model.safetensors`` are read, and they are checked
        against each other before any weights load. Weights stored as float16 or bfloat16 (see
        :meth:`save_pretrained`) are cast to float32: the pipeline computes in float32 whatever
        its file stores.

        Example::

            pipe = RCGPipeline.from_pretrained("my-org/rcg-digits", revision="v1.0", device="cuda")
        """
        from .zoo import resolve_model_dir

        directory = resolve_model_dir(name_or_path, revision=revision, cache_dir=cache_dir,
                                      local_files_only=local_files_only, token=token)
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for p in (config_path, weights_path):
            if not p.is_file():
                raise FileNotFoundError(f"{directory} is not a saved RCGPipeline: {p.name} is missing")
        try:
            data = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
            raise ConfigError(f"{config_path}: not valid JSON ({err})") from err
        config = PipelineConfig.from_dict(data, source=str(config_path))
        try:  # the header alone: names and shapes, no tensor data
            with safe_open(str(weights_path), framework="pt") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
                dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
        except Exception as err:  # safetensors raises its own error types for corrupt files
            raise ValueError(f"{weights_path}: not a readable safetensors file ({err})") from err
        # A config.json asking for a huge model must fail on the shapes, before any allocation:
        # build the modules on the meta device (no memory) and compare with the file's header.
        try:
            with torch.device("meta"), _parameter_budget(2 * len(shapes) + 64, str(config_path), str(weights_path)):
                skeleton = cls(config)
        except ConfigError:
            raise
        except (TypeError, ValueError, RuntimeError, OverflowError) as err:
            raise ConfigError(f"{config_path}: cannot build the model it describes ({err})") from err
        _check_state_shapes({k: tuple(v.shape) for k, v in skeleton.state_dict().items()}, shapes,
                            source=str(weights_path))
        _check_state_kinds(skeleton.state_dict(), dtypes, source=str(weights_path))
        del skeleton
        pipe = cls(config)
        try:
            state = load_file(str(weights_path))
        except Exception as err:  # safetensors raises its own error types for corrupt files
            raise ValueError(f"{weights_path}: not a readable safetensors file ({err})") from err
        # float16 / bfloat16 storage: computed in float32 (the parameters' own dtype)
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
        pipe.load_state_dict_checked(state, source=str(weights_path))
        if device is not None:
            pipe.to(device)
        return pipe

    @classmethod
    def from_official(
        cls, *, encoder: str | os.PathLike | None = None, rdm: str | os.PathLike | None = None,
        mage: str | os.PathLike | None = None, tokenizer: str | os.PathLike | None = None, arch: str = "base",
        use_ema: bool = True, device: str | torch.device | None = None, verify_sha256: bool = True,
    ) -> RCGPipeline:
        """A pipeline from the authors' checkpoint files (converted by :mod:`rcg_augment.official`).

        Args:
            encoder: MoCo v3 file (``vit-b-300ep.pth.tar`` or RCG's ViT-L file). Optional when the
                RDM or MAGE file is given: both embed a copy of the encoder.
            rdm: RDM file (``.pth``), required.
            mage: MAGE file (``.pth``), required; it embeds the encoder and the VQGAN too.
            tokenizer: ``vqgan_jax_strongaug.ckpt``; optional (MAGE's embedded copy is used otherwise).
            arch: ``"base"`` (ViT-B encoder, MAGE-B) or ``"large"``.
            use_ema: take EMA weights where a file has them (the official evaluation does).
            device: move the pipeline here.
            verify_sha256: record each file's sha256 in the pipeline metadata.

        Example::

            pipe = RCGPipeline.from_official(rdm="rdm-mocov3vitb.pth", mage="mage-vitb.pth", arch="base")
        """
        files = read_official_files(encoder=encoder, rdm=rdm, mage=mage, tokenizer=tokenizer, arch=arch,
                                    use_ema=use_ema, verify_sha256=verify_sha256)
        pipe = cls(files.config)
        pipe.load_state_dict_checked(files.state_dict, source="the official files")
        pipe.eval()
        if device is not None:
            pipe.to(device)
        return pipe

    def load_state_dict_checked(self, state: dict[str, torch.Tensor], *, source: str) -> None:
        """Strict load with one error that names the source, missing, unexpected and mis-shaped keys."""
        _check_state_shapes({k: tuple(v.shape) for k, v in self.state_dict().items()},
                            {k: tuple(v.shape) for k, v in state.items()}, source=source)
        self.load_state_dict(state, strict=True)

    def save_pretrained(
        self, directory: str | os.PathLike, *, metadata: dict | None = None, dtype: torch.dtype = torch.float32,
        push_to_hub: bool = False, repo_id: str | None = None, **hub_options,
    ) -> Path:
        """Write ``config.json``, ``model.safetensors`` (no pickle) and a model card ``README.md``
        (see :func:`rcg_augment.hub.model_card`) into ``directory``.

        ``dtype``: how the floating-point weights are stored: ``torch.float32`` (default, exact),
        ``torch.float16`` (half the size; :meth:`from_pretrained` casts them back to float32, so
        the loaded pipeline computes with the float16-rounded weights: see :meth:`fingerprint`)
        or ``torch.bfloat16``. A weight beyond float16's range (+-65504) refuses float16.
        The storage dtype is recorded as ``metadata["weights_dtype"]`` when it is not float32;
        ``metadata["weights_sha256"]`` is the sha256 of the file as written.

        Example::

            pipe.save_pretrained("digits-tiny-fp16", dtype=torch.float16)  # 20 MB instead of 40

        ``push_to_hub=True`` then uploads the folder to ``repo_id`` (``"namespace/name"``);
        ``hub_options`` (``revision``, ``private``, ``token``, ``commit_message``, ``create_pr``)
        go to :func:`rcg_augment.hub.upload_model`. A README.md not written by this method is kept.
        """
        if push_to_hub and not repo_id:
            raise ValueError("save_pretrained(push_to_hub=True) needs `repo_id`, e.g. repo_id='my-org/rcg-digits'")
        if hub_options and not push_to_hub:
            raise TypeError(f"save_pretrained() got Hub options {sorted(hub_options)} without push_to_hub=True")
        state = _storage_state({k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}, dtype)
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        weights_path = directory / WEIGHTS_NAME
        tmp = weights_path.with_suffix(".tmp")
        tmp.touch()
        mode = tmp.stat().st_mode & 0o777  # what a new file gets here (the umask), as config.json does
        save_file(state, str(tmp))  # safetensors writes its file 0600
        os.chmod(tmp, mode)
        os.replace(tmp, weights_path)
        digest = sha256_file(weights_path)
        self.config.metadata.update(metadata or {})
        self.config.metadata["weights_sha256"] = digest
        if dtype == torch.float32:
            self.config.metadata.pop("weights_dtype", None)
        else:
            self.config.metadata["weights_dtype"] = WEIGHTS_DTYPES[dtype]
        (directory / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        from .hub import upload_model, write_model_card

        write_model_card(directory, self.config, repo_id=repo_id)
        if push_to_hub:
            upload_model(directory, repo_id, **hub_options)
        return directory

    def push_to_hub(self, repo_id: str, *, metadata: dict | None = None, dtype: torch.dtype = torch.float32,
                    **hub_options):
        """Upload this pipeline (config, safetensors weights in ``dtype`` as in :meth:`save_pretrained`,
        model card) to the Hub as ``repo_id``.

        ``hub_options``: ``revision`` (a branch, created if missing), ``private``, ``token``,
        ``commit_message``, ``create_pr``. Returns the ``huggingface_hub.CommitInfo``.

        Example::

            pipe.push_to_hub("my-org/rcg-digits")
            RCGPipeline.from_pretrained("my-org/rcg-digits")
        """
        from .hub import push_pipeline

        return push_pipeline(self, repo_id, metadata=metadata, dtype=dtype, **hub_options)

    # ----------------------------------------------------------------- properties
    @property
    def image_size(self) -> int:
        """Pixel resolution the generator works at (inputs of other sizes are resized)."""
        return self.config.tokenizer.image_size

    @property
    def in_channels(self) -> int:
        return self.config.tokenizer.in_channels

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def fingerprint(self) -> str:
        """sha256 over config and weights: identifies a model for caches.

        It hashes the config (without ``metadata``; fields added later hash as absent while at
        their default) and then, key by key in sorted order, the bytes of the tensors the
        pipeline holds and computes with: float32 after :meth:`from_pretrained`, whatever the
        file stores. So it does not depend on the storage dtype: a pipeline saved as float16
        and loaded back has one fingerprint, which differs from its float32 original's (its
        weights are rounded) and equals that of the rounded weights saved as float32. The
        file's own hash is ``metadata["weights_sha256"]``.
        """
        config = self.config.to_dict() | {"metadata": {}}
        # Config fields added after models and caches existed hash as if absent while at their
        # default, so a cache built before the field existed still matches its model.
        for section, fields in FIELDS_ADDED_LATER.items():
            for name, default in fields.items():
                if config[section].get(name) == default:
                    config[section].pop(name)
        h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
        for k, v in sorted(self.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().to("cpu").contiguous().numpy().tobytes())
        return h.hexdigest()

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()  # float32 on CPU: no fast bf16 there

    # ----------------------------------------------------------------- input checks
    def _check_images(self, images: torch.Tensor) -> torch.Tensor:
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"`images` must be a torch.Tensor (B, C, H, W) in [0, 1], got {type(images).__name__}")
        if images.ndim != 4:
            raise ValueError(f"`images` must have shape (B, C, H, W), got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise TypeError(f"`images` must be a float tensor in [0, 1], got dtype {images.dtype}")
        if images.shape[1] != self.in_channels:
            raise ValueError(
                f"`images` has {images.shape[1]} channels but this model expects {self.in_channels}; "
                "convert the images first (RCGAugment does this for PIL/tensor inputs)"
            )
        if images.shape[-1] < 1 or images.shape[-2] < 1:
            raise ValueError(f"`images` has an empty spatial size {tuple(images.shape[-2:])}")
        if images.numel() and not torch.isfinite(images).all():
            raise ValueError("`images` contains NaN or infinite values")
        if images.numel() and (images.min() < -1e-3 or images.max() > 1 + 1e-3):
            raise ValueError(
                f"`images` must be in [0, 1], got values in [{images.min().item():.3g}, {images.max().item():.3g}]"
            )
        return images.to(self.device, torch.float32).clamp(0, 1)

    def _resize(self, images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if tuple(images.shape[-2:]) == tuple(size):
            return images
        return F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)

    def resolve_settings(self, settings: GenerationSettings | None = None, **overrides) -> GenerationSettings:
        """``settings`` with ``overrides`` on top (None values ignored), every field filled from
        this model's defaults and validated against it (before any work): the one validation of
        a call. The methods below call it once at their top and pass what it returns down."""
        if settings is None:
            settings = UNSET
        elif not isinstance(settings, GenerationSettings):
            raise TypeError(f"`settings` must be a GenerationSettings or None, got {type(settings).__name__}")
        return settings.resolve(self.config, **overrides)

    def sampler(self, rdm_steps: int | None = None, eta: float | None = None, *,
                settings: GenerationSettings | None = None) -> DDIMSampler:
        """The DDIM sampler of the RDM at ``settings`` / ``rdm_steps`` / ``eta`` (None: the model's defaults)."""
        return self._sampler(self.resolve_settings(settings, rdm_steps=rdm_steps, eta=eta))

    def _sampler(self, s: GenerationSettings) -> DDIMSampler:
        return DDIMSampler(self.schedule, s.rdm_steps, s.eta)

    # ----------------------------------------------------------------- stages
    # The public methods check their inputs and resolve their settings once; the `_` methods
    # below them take checked inputs and resolved settings and trust them.
    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [0, 1] -> normalised representations (B, rep_dim)."""
        return self._encode(self._check_images(images))

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[0] == 0:
            return images.new_zeros(0, self.config.encoder.rep_dim)
        with self._autocast():
            return self.encoder(images).float()

    @torch.inference_mode()
    def tokenize(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [0, 1] -> their VQ token indices (B, grid * grid), at ``image_size``
        (resized first when H, W differ): what ``reconstruct`` keeps of a source when
        ``repaint_fraction`` < 1, computed once here to pass as its ``source_tokens``."""
        return self._tokenize(self._check_images(images))

    def _tokenize(self, images: torch.Tensor) -> torch.Tensor:
        images = self._resize(images.to(self.device, torch.float32), (self.image_size, self.image_size))
        with self._autocast():
            return self.tokenizer.encode(images).flatten(1)

    def _check_representations(self, rep: torch.Tensor, n: int) -> torch.Tensor:
        d = self.config.encoder.rep_dim
        if not isinstance(rep, torch.Tensor) or not rep.is_floating_point():
            raise TypeError(f"`representations` must be a float tensor ({n}, {d}), got "
                            f"{type(rep).__name__ if not isinstance(rep, torch.Tensor) else rep.dtype}")
        if tuple(rep.shape) != (n, d):
            raise ValueError(f"`representations` must have shape ({n}, {d}) (one per image, as `encode` "
                             f"returns them), got {tuple(rep.shape)}")
        if rep.numel() and not torch.isfinite(rep).all():
            raise ValueError("`representations` contains NaN or infinite values")
        return rep.to(self.device, torch.float32)

    def _check_tokens(self, tokens: torch.Tensor, n: int) -> torch.Tensor:
        length, vocab = self.config.tokenizer.grid_size ** 2, self.config.tokenizer.codebook_size
        if not isinstance(tokens, torch.Tensor) or tokens.is_floating_point() or tokens.dtype == torch.bool:
            raise TypeError(f"`source_tokens` must be an integer tensor ({n}, {length}) as `tokenize` returns it")
        if tuple(tokens.shape) != (n, length):
            raise ValueError(f"`source_tokens` must have shape ({n}, {length}) (one row per image, as "
                             f"`tokenize` returns them), got {tuple(tokens.shape)}")
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= vocab):
            raise ValueError(f"`source_tokens` must be codebook indices in [0, {vocab}), got values in "
                             f"[{int(tokens.min())}, {int(tokens.max())}]")
        return tokens.to(self.device, torch.long)

    @torch.inference_mode()
    def denoise_representations(
        self, rep: torch.Tensor, noise_level: float | torch.Tensor, *, generator: torch.Generator | None = None,
        settings: GenerationSettings | None = None, rdm_steps: int | None = None, eta: float | None = None,
    ) -> torch.Tensor:
        """Noise representations to ``noise_level`` (float or per-row tensor in [0, 1]) and DDIM-denoise
        them, at ``settings``' ``rdm_steps`` and ``eta`` (the keywords override it; None: the model's defaults)."""
        return self._denoise(rep, noise_level, self.resolve_settings(settings, rdm_steps=rdm_steps, eta=eta),
                             generator)

    def _denoise(self, rep: torch.Tensor, noise_level: float | torch.Tensor, s: GenerationSettings,
                 generator: torch.Generator | None) -> torch.Tensor:
        sampler = self._sampler(s)
        generator = derive_generator(generator, rep.device)
        z_t, steps = sampler.renoise(rep.float(), noise_level, generator=generator)
        with self._autocast():
            return sampler.denoise(self.rdm, z_t, steps, generator=generator).float()

    @torch.inference_mode()
    def render(
        self, rep: torch.Tensor, *, generator: torch.Generator | None = None, settings: GenerationSettings | None = None,
        cfg: float | None = None, temperature: float | None = None, num_iter: int | None = None,
        source: torch.Tensor | None = None, repaint_fraction: float | None = None, token_temperature: float | None = None,
    ) -> torch.Tensor:
        """Representations (B, rep_dim) -> images (B, C, image_size, image_size) in [0, 1].

        ``settings`` (a :class:`GenerationSettings`; None: the model's defaults) with the keyword
        overrides on top; ``rdm_steps`` and ``eta`` do not act here. ``source`` (B, C,
        image_size, image_size) in [0, 1] with ``repaint_fraction`` < 1: MAGE starts from the
        source's VQ tokens with that share of them (drawn at random per image) masked, and paints
        only those.
        """
        s = self.resolve_settings(settings, cfg=cfg, temperature=temperature, num_iter=num_iter,
                                  repaint_fraction=repaint_fraction, token_temperature=token_temperature)
        return self._render(rep, s, generator, source)

    def _render(self, rep: torch.Tensor, s: GenerationSettings, generator: torch.Generator | None,
                source: torch.Tensor | None, codes: torch.Tensor | None = None) -> torch.Tensor:
        """``codes``: the source's VQ tokens (B, grid * grid) when already known (then ``source``
        is not tokenized again)."""
        rep = rep.to(self.device, torch.float32)
        generator = derive_generator(generator, self.device)
        with self._autocast():
            start = None
            if (source is not None or codes is not None) and s.repaint_fraction < FULL_REPAINT:
                if codes is None:
                    codes = self._tokenize(source)
                start = keep_source_tokens(codes, s.repaint_fraction, self.config.mage.mask_token_id,
                                           generator=generator)
            tokens = maskgit_decode(self.mage, rep, num_iter=s.num_iter, temperature=s.temperature, cfg=s.cfg,
                                    generator=generator, start_tokens=start, token_temperature=s.token_temperature)
            images = self.tokenizer.decode(tokens)
        return images.float().clamp(0, 1)

    # ----------------------------------------------------------------- user-facing
    @torch.inference_mode()
    def reconstruct(
        self, images: torch.Tensor, noise_level: float | torch.Tensor = DEFAULT_NOISE_LEVEL, *,
        generator: torch.Generator | None = None, settings: GenerationSettings | None = None, cfg: float | None = None,
        temperature: float | None = None, num_iter: int | None = None, rdm_steps: int | None = None,
        eta: float | None = None, repaint_fraction: float | None = None, token_temperature: float | None = None,
        representations: torch.Tensor | None = None, source_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """New images with the same semantics: encode, renoise + denoise the representation, render.

        Args:
            images: float tensor (B, C, H, W) in [0, 1], C == ``in_channels``; any H, W (resized to
                ``image_size`` and back).
            noise_level: in [0, 1], a float or a (B,) tensor. 0 keeps the image's representation
                (variety comes from MAGE's sampling alone); 1 ignores the image (an unconditional
                sample); in between, noise to that fraction of the RDM schedule and denoise.
            generator: seeds every random draw; the same seed gives the same output on CPU.
            settings: a :class:`GenerationSettings` (None: the model's defaults); the keyword
                arguments below override its fields.
            cfg, temperature, num_iter: MAGE guidance scale (>= 0), re-masking temperature,
                decoding steps. rdm_steps, eta: DDIM steps and eta for the RDM.
            repaint_fraction: share of the source's VQ token map MAGE paints anew, in [0.5, 1]:
                1 (default for the official models) generates every token from the
                representation; lower keeps a random (1 - repaint_fraction) of the source's
                tokens, so variants stay closer to their source (see ``GenerationSettings``).
            token_temperature: temperature of MAGE's draw of each code, > 0: 1 is the official
                sampling; lower follows the representation more faithfully, with less variety.
            representations: the images' representations (B, rep_dim) as :meth:`encode` returns
                them, when already computed (many variants of one source, a filter that needs them
                too): the images are then not encoded again. Same values, same output.
            source_tokens: the images' VQ tokens (B, grid * grid) as :meth:`tokenize` returns
                them, likewise; used only when ``repaint_fraction`` < 1.

        Returns:
            A float tensor of the input's shape, in [0, 1].

        Example::

            s = GenerationSettings(num_iter=8, repaint_fraction=0.7)
            out = pipe.reconstruct(images, 0.3, settings=s, generator=torch.Generator().manual_seed(0))
        """
        images = self._check_images(images)
        if images.shape[0] == 0:
            return images.clone()
        size = tuple(images.shape[-2:])
        s = self.resolve_settings(settings, cfg=cfg, temperature=temperature, num_iter=num_iter, rdm_steps=rdm_steps,
                                  eta=eta, repaint_fraction=repaint_fraction, token_temperature=token_temperature)
        n = images.shape[0]
        rep = self._encode(images) if representations is None else self._check_representations(representations, n)
        codes = None if source_tokens is None else self._check_tokens(source_tokens, n)
        rep = self._denoise(rep, noise_level, s, generator)
        out = self._render(rep, s, generator, images if s.repaint_fraction < FULL_REPAINT else None, codes)
        return self._resize(out, size)

    @torch.inference_mode()
    def generate(
        self, n: int, *, generator: torch.Generator | None = None, settings: GenerationSettings | None = None,
        cfg: float | None = None, temperature: float | None = None, num_iter: int | None = None,
        rdm_steps: int | None = None, eta: float | None = None, token_temperature: float | None = None,
    ) -> torch.Tensor:
        """``n`` unconditional samples: the RDM samples representations, MAGE renders them.

        ``settings`` and the keyword overrides as in :meth:`reconstruct` (``repaint_fraction``
        does not act: there is no source)."""
        if n < 0:
            raise ValueError(f"`n` must be >= 0, got {n}")
        s = self.resolve_settings(settings, cfg=cfg, temperature=temperature, num_iter=num_iter, rdm_steps=rdm_steps,
                                  eta=eta, token_temperature=token_temperature)
        if n == 0:
            return torch.zeros(0, self.in_channels, self.image_size, self.image_size, device=self.device)
        gen = derive_generator(generator, self.device)
        with self._autocast():
            rep = self._sampler(s).sample(self.rdm, (n, self.config.rdm.rep_dim), generator=gen,
                                          device=self.device).float()
        return self._render(rep, s, gen, None)

    @torch.inference_mode()
    def interpolate(
        self, a: torch.Tensor, b: torch.Tensor, alphas, *, generator: torch.Generator | None = None,
        settings: GenerationSettings | None = None, cfg: float | None = None, temperature: float | None = None,
        num_iter: int | None = None, token_temperature: float | None = None,
    ) -> torch.Tensor:
        """Images along the path between the representations of ``a`` and ``b``.

        ``a``, ``b``: (B, C, H, W) in [0, 1] (or (C, H, W)); ``alphas``: sequence of floats in [0, 1].
        Returns (len(alphas), B, C, H, W) at the inputs' size. Intermediate representations are
        linear mixes, re-normalised per sample; every alpha uses the same sampling seed.
        ``settings`` and the keyword overrides as in :meth:`render`.
        """
        if a.ndim == 3:
            a = a[None]
        if b.ndim == 3:
            b = b[None]
        if a.shape != b.shape:
            raise ValueError(f"`a` and `b` must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
        alphas = [float(x) for x in alphas]
        if not alphas or any(not 0.0 <= x <= 1.0 for x in alphas):
            raise ValueError(f"`alphas` must be a non-empty sequence in [0, 1], got {alphas}")
        s = self.resolve_settings(settings, cfg=cfg, temperature=temperature, num_iter=num_iter,
                                  token_temperature=token_temperature)
        ra, rb = self.encode(a), self.encode(b)
        seed = None if generator is None else int(torch.randint(0, SEED_BOUND, (1,), generator=generator).item())
        frames = []
        for alpha in alphas:
            mix = (1 - alpha) * ra + alpha * rb
            mix = (mix - mix.mean(-1, keepdim=True)) / mix.std(-1, keepdim=True).clamp(min=1e-6)
            g = None if seed is None else torch.Generator(device=self.device).manual_seed(seed)
            frames.append(self._resize(self._render(mix, s, g, None), tuple(a.shape[-2:])))
        return torch.stack(frames)

__all__ = ["CONFIG_NAME", "ConfigError", "PIPELINE_PRESETS", "PipelineConfig", "RCGPipeline", "SamplingDefaults",
           "WEIGHTS_DTYPES", "WEIGHTS_NAME", "derive_generator"]
