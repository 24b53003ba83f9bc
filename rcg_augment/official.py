"""The authors' checkpoint files -> a pipeline config and a state dict.

Each official file has one converter, a pure ``state_dict -> Converted`` function (in the manner
of timm's ``checkpoint_filter_fn``). A converter maps every key it knows to this package's
names, sets aside the keys the official code stores but never uses (each with its reason in
``IGNORED``), and raises :class:`OfficialCheckpointError` on anything else, so nothing is ever
dropped silently. Files are read with ``torch.load(weights_only=True)``; the only class beyond
tensors and containers those files hold is ``argparse.Namespace`` (the training arguments),
which is allow-listed.

:func:`read_official_files` turns a set of files into a :class:`~rcg_augment.config.PipelineConfig`
and one state dict, checking every part (and every embedded copy) against the modules the config
describes; :meth:`RCGPipeline.from_official <rcg_augment.pipeline.RCGPipeline.from_official>`
builds the pipeline from them. Nothing here imports the pipeline.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import torch

from .config import PipelineConfig
from .files import sha256_file
from .models.encoder import RepresentationEncoder
from .models.mage import MAGE
from .models.rdm import RepresentationDenoiser
from .models.tokenizer import VQTokenizer
from .presets import preset_config
from .sampling.diffusion import NoiseSchedule
from .state_dicts import compare_state

# Provenance of the official weights (README and model metadata say the same).
OFFICIAL_SOURCES = {
    "encoder": {
        "name": "MoCo v3 ViT (vit-b-300ep / RCG's ViT-L)",
        "license": "CC BY-NC 4.0",
        "source": "https://dl.fbaipublicfiles.com/moco-v3/vit-b-300ep/vit-b-300ep.pth.tar (ViT-B); "
                  "ViT-L: LTH14/rcg README",
    },
    "rdm": {"name": "RCG representation diffusion model", "license": "MIT (LTH14/rcg)",
            "source": "LTH14/rcg README (Google Drive)"},
    "mage": {"name": "RCG MAGE pixel generator", "license": "MIT (LTH14/rcg, LTH14/mage)",
             "source": "LTH14/rcg README (Google Drive)"},
    "tokenizer": {"name": "MaskGIT VQGAN (vqgan_jax_strongaug.ckpt)", "license": "MIT (LTH14/mage)",
                  "source": "LTH14/rcg README (Google Drive)"},
}

# Keys the official files store that no forward pass reads, by file kind, with the reason.
IGNORED: dict[str, list[tuple[str, str]]] = {
    "encoder": [
        (r"^(module\.)?momentum_encoder\.", "MoCo's momentum encoder: training only"),
        (r"^(module\.)?predictor\.", "MoCo's predictor: training only"),
    ],
    "rdm": [
        (r"^(alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod|"
         r"log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod|"
         r"posterior_variance|posterior_log_variance_clipped|posterior_mean_coef1|posterior_mean_coef2)$",
         "derived from `betas`, which is checked against this package's schedule"),
        (r"^model_ema\.(decay|num_updates)$", "EMA bookkeeping"),
        (r"^cond_stage_model\.", "class embedding of the unconditional RDM: never read"),
    ],
    "mage": [
        (r"^(cls_token|mask_token|pos_embed|decoder_pos_embed)$",
         "MAE leftovers: MAGE embeds tokens with token_emb and uses decoder_pos_embed_learned"),
        (r"^patch_embed\.", "MAE leftover: MAGE reads tokens, not patches"),
        (r"^decoder_pred\.", "MAE leftover (pixel head); MAGE predicts with mlm_layer"),
        (r"^token_emb\.position_ids$", "the constant arange(257)"),
    ],
    "tokenizer": [],
}


class OfficialCheckpointError(ValueError):
    """An official checkpoint file that is unreadable, of the wrong kind, or of the wrong shape."""


class Converted(NamedTuple):
    """A converter's result: state dicts per pipeline part, the source keys set aside, and for
    each part the key in the file that every converted key came from."""

    parts: dict[str, dict[str, torch.Tensor]]
    ignored: list[str]
    origins: dict[str, dict[str, str]] | None = None


def _sample(keys, n: int = 6) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" ... (+{len(keys) - n} more)" if len(keys) > n else "")


def _ignored(kind: str, key: str) -> bool:
    return any(re.search(pattern, key) for pattern, _ in IGNORED[kind])


def load_official_checkpoint(path: str | os.PathLike) -> dict:
    """One of the authors' PyTorch checkpoint files (``.pth``, ``.pth.tar``, ``.ckpt``) as the dict
    it holds: ``torch.load`` with ``weights_only=True``; only ``argparse.Namespace`` is allow-listed.
    (A training run's own checkpoints are read by
    :func:`rcg_augment.training.checkpoints.load_training_checkpoint`.)

    Raises :class:`OfficialCheckpointError` naming the file for missing, truncated, non-checkpoint
    or code-carrying (refused) files.
    """
    path = Path(path)
    if not path.is_file():
        raise OfficialCheckpointError(f"{path}: no such file")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise OfficialCheckpointError(
            f"{path}: refused. It is not a plain weights file: loading it would need objects that "
            f"weights_only loading does not allow (the file may carry code). Details: {str(err).splitlines()[0]}"
        ) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, KeyError, IndexError) as err:
        raise OfficialCheckpointError(f"{path}: cannot be read as a PyTorch checkpoint (truncated or not a "
                                      f"checkpoint): {err}") from err
    if not isinstance(obj, Mapping):
        raise OfficialCheckpointError(f"{path}: expected a dict at the top level, found {type(obj).__name__}")
    return dict(obj)


def _tensors(obj, where: str) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise OfficialCheckpointError(f"{where}: expected a state dict of tensors, found {type(obj).__name__}")
    return dict(obj)


# ---------------------------------------------------------------------------- converters
_VIT_L_QUIRKS = [
    (re.compile(r"blocks\.13\.norm13\."), "blocks.13.norm1."),
    (re.compile(r"blocks\.13\.mlp\.fc13\."), "blocks.13.mlp.fc1."),
    (re.compile(r"blocks\.14\.norm14\."), "blocks.14.norm2."),
    (re.compile(r"blocks\.14\.mlp\.fc14\."), "blocks.14.mlp.fc2."),
]


def _encoder_key(rest: str) -> str:
    for pattern, repl in _VIT_L_QUIRKS:
        rest = pattern.sub(repl, rest)
    return rest if rest.startswith("head.") else "vit." + rest


def convert_mocov3_encoder(state_dict: Mapping[str, torch.Tensor]) -> Converted:
    """MoCo v3 file (``module.base_encoder.*``) -> ``RepresentationEncoder`` keys (``vit.*``, ``head.*``).

    Also accepts the bare ``base_encoder.*`` form (``module.`` stripped). RCG's ViT-L key quirks
    (``norm13``/``fc13``/``norm14``/``fc14``) are renamed.
    """
    out, origin, ignored, unknown = {}, {}, [], []
    for key, value in state_dict.items():
        m = re.match(r"^(module\.)?base_encoder\.(.+)$", key)
        if m:
            out[_encoder_key(m.group(2))] = value
            origin[_encoder_key(m.group(2))] = key
        elif _ignored("encoder", key):
            ignored.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise OfficialCheckpointError(f"unexpected keys for a MoCo v3 file: {_sample(unknown)}")
    if not out:
        raise OfficialCheckpointError("no `module.base_encoder.*` keys: not a MoCo v3 checkpoint")
    return Converted({"encoder": out}, ignored, {"encoder": origin})


def _embedded_encoder(key: str) -> str | None:
    m = re.match(r"^pretrained_encoder\.(.+)$", key)
    return _encoder_key(m.group(1)) if m else None


def rdm_ema_key(our_key: str) -> str:
    """LitEma's flattened name for an RDM network key (dots removed, under ``model_ema.``)."""
    return "model_ema.diffusion_model" + our_key.replace(".", "")


def convert_rdm(
    state_dict: Mapping[str, torch.Tensor], *, network_keys: list[str], schedule: NoiseSchedule,
    use_ema: bool = True,
) -> Converted:
    """RDM file ``model`` dict -> ``rdm`` (network) and ``encoder`` (its embedded copy) parts.

    ``network_keys`` are this package's RDM state-dict keys (LitEma's flattened names are mapped
    back through them). With ``use_ema`` the EMA weights are taken when the file has them, as the
    official sampler does. ``betas`` must equal ``schedule``'s (the other schedule buffers are
    derived from it).
    """
    ema_names = {rdm_ema_key(k): k for k in network_keys}
    raw, ema, encoder, ignored, unknown = {}, {}, {}, [], []
    origin: dict[str, dict[str, str]] = {"raw": {}, "ema": {}, "encoder": {}}
    for key, value in state_dict.items():
        enc_key = _embedded_encoder(key)
        if key.startswith("model.diffusion_model."):
            raw[key[len("model.diffusion_model."):]] = value
            origin["raw"][key[len("model.diffusion_model."):]] = key
        elif key in ema_names:
            ema[ema_names[key]] = value
            origin["ema"][ema_names[key]] = key
        elif enc_key is not None:
            encoder[enc_key] = value
            origin["encoder"][enc_key] = key
        elif key == "betas":
            expected = schedule.betas.to(value.dtype)
            if value.shape != expected.shape or not torch.allclose(value.double(), expected.double(), rtol=1e-5, atol=1e-8):
                raise OfficialCheckpointError(
                    f"`betas` differ from this package's schedule (T={schedule.num_timesteps}, "
                    f"first {schedule.betas[0].item():.6g}, last {schedule.betas[-1].item():.6g}); found shape "
                    f"{tuple(value.shape)}, first/last {value.flatten()[0].item():.6g}/{value.flatten()[-1].item():.6g}"
                )
            ignored.append(key)
        elif _ignored("rdm", key):
            ignored.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise OfficialCheckpointError(f"unexpected keys for an RDM file: {_sample(unknown)}")
    if not raw:
        raise OfficialCheckpointError("no `model.diffusion_model.*` keys: not an RDM checkpoint")
    if use_ema and ema:
        network, ignored, origins = ema, ignored + ["model.diffusion_model." + k for k in raw], {"rdm": origin["ema"]}
    else:
        network, ignored, origins = raw, ignored + [rdm_ema_key(k) for k in ema], {"rdm": origin["raw"]}
    parts = {"rdm": network}
    if encoder:
        parts["encoder"], origins["encoder"] = encoder, origin["encoder"]
    return Converted(parts, ignored, origins)


def convert_mage(state_dict: Mapping[str, torch.Tensor]) -> Converted:
    """MAGE file weights -> ``mage``, plus the embedded ``encoder`` and ``tokenizer`` (``vqgan.*``)."""
    mage, encoder, tokenizer, ignored = {}, {}, {}, []
    origins: dict[str, dict[str, str]] = {"mage": {}, "encoder": {}, "tokenizer": {}}
    for key, value in state_dict.items():
        enc_key = _embedded_encoder(key)
        if enc_key is not None:
            encoder[enc_key] = value
            origins["encoder"][enc_key] = key
        elif key.startswith("vqgan."):
            tokenizer[key[len("vqgan."):]] = value
            origins["tokenizer"][key[len("vqgan."):]] = key
        elif _ignored("mage", key):
            ignored.append(key)
        else:
            mage[key] = value
    if "token_emb.word_embeddings.weight" not in mage or "latent_prior_proj.weight" not in mage:
        raise OfficialCheckpointError(
            "no `token_emb.word_embeddings.weight`/`latent_prior_proj.weight`: not a representation-conditioned "
            f"MAGE checkpoint (found e.g. {_sample(state_dict)})"
        )
    parts = {"mage": mage}
    if encoder:
        parts["encoder"] = encoder
    if tokenizer:
        parts["tokenizer"] = tokenizer
    return Converted(parts, ignored, {p: origins[p] for p in parts})


def convert_vqgan(state_dict: Mapping[str, torch.Tensor]) -> Converted:
    """VQGAN file -> ``tokenizer`` keys (the official names are kept: encoder/decoder/quantize)."""
    if not any(k.startswith("quantize.") for k in state_dict):
        raise OfficialCheckpointError(f"no `quantize.*` keys: not a VQGAN checkpoint (found e.g. {_sample(state_dict)})")
    return Converted({"tokenizer": dict(state_dict)}, [])


# ---------------------------------------------------------------------------- files
def _weights(obj: dict, kind: str, path: Path, use_ema: bool) -> dict[str, torch.Tensor]:
    """Pick the weights out of an official file's top level, as the authors' loaders do."""
    if kind == "encoder":
        inner = obj.get("state_dict", obj)
    elif kind == "rdm":
        inner = obj.get("state_dict", obj.get("model"))
    elif kind == "mage":
        ema = obj.get("model_ema")
        inner = ema if use_ema and isinstance(ema, Mapping) and ema else obj.get("model")
    else:
        inner = obj.get("state_dict", obj)
    if inner is None:
        raise OfficialCheckpointError(f"no weights found; top-level keys are {_sample(obj)}")
    return _tensors(inner, "the weights")


def convert_official_file(path: str | os.PathLike, kind: str, *, pipeline=None, use_ema: bool = True) -> Converted:
    """Read one official file of ``kind`` ("encoder" | "rdm" | "mage" | "tokenizer") and convert it.

    ``pipeline``: for ``kind="rdm"``, the :class:`~rcg_augment.RCGPipeline` or
    :class:`~rcg_augment.config.PipelineConfig` the weights are meant for (its RDM's key names and
    noise schedule); the other kinds need nothing.
    """
    if kind not in IGNORED:
        raise ValueError(f"`kind` must be one of {sorted(IGNORED)}, got {kind!r}")
    path = Path(path)
    obj = load_official_checkpoint(path)
    try:
        sd = _weights(obj, kind, path, use_ema)
        if kind == "encoder":
            return convert_mocov3_encoder(sd)
        if kind == "rdm":
            if pipeline is None:
                raise ValueError("convert_official_file(kind='rdm') needs `pipeline`: the RCGPipeline or "
                                 "PipelineConfig it will load into")
            rdm_config = getattr(pipeline, "config", pipeline).rdm
            with torch.device("meta"):  # the key names only: no memory
                network_keys = list(RepresentationDenoiser(rdm_config).state_dict())
            return convert_rdm(sd, network_keys=network_keys, schedule=NoiseSchedule.from_config(rdm_config),
                               use_ema=use_ema)
        if kind == "mage":
            return convert_mage(sd)
        return convert_vqgan(sd)
    except OfficialCheckpointError as err:
        raise OfficialCheckpointError(f"{path} (passed as `{kind}`): {err}") from err


def _check_part(own: Mapping[str, torch.Tensor], state: dict[str, torch.Tensor], *, part: str, path: Path,
                arch: str, origins: Mapping[str, str] | None = None, embedded: bool = False) -> None:
    """Raise :class:`OfficialCheckpointError` unless ``state`` has exactly the keys of ``own`` (the
    module's state dict), each of its shape and kind (floating point or integer). ``origins`` maps
    keys back to the file's names (so the message names the key as stored); ``embedded`` marks a
    copy another file carries."""
    origins = origins or {}

    def named(k: str) -> str:
        return k if origins.get(k, k) == k else f"{k} (stored as {origins[k]})"

    diff = compare_state(own, state)
    if diff:
        what = f"the {part} copy it embeds does" if embedded else f"its {part} weights do"
        lines = [f"{path}: {what} not fit the official arch={arch!r} {part}."]
        if diff.wrong_shape:
            lines.append("Wrong shapes (expected vs found): " + "; ".join(
                "{} {} vs {}".format(named(k), *diff.shapes(k)) for k in diff.wrong_shape[:5]))
        if diff.wrong_kind:
            lines.append("Wrong dtypes (expected vs found): " + "; ".join(
                f"{named(k)} {own[k].dtype} vs {state[k].dtype}" for k in diff.wrong_kind[:5]))
        if diff.missing:
            lines.append(f"Expected but not found ({len(diff.missing)}): {_sample(diff.missing)}")
        if diff.unexpected:
            lines.append(f"Found but not expected ({len(diff.unexpected)}): "
                         f"{_sample([named(k) for k in diff.unexpected])}")
        lines.append("Check that the file is the right one and that `arch` ('base' or 'large') matches it.")
        if embedded:
            lines.append(f"(Embedded copies are checked even when a separate `{part}=` file is loaded: "
                         "with the right arch, a mismatch means the file is damaged.)")
        raise OfficialCheckpointError(" ".join(lines))


# The preset each official `arch` is, and the module each pipeline part is.
ARCH_PRESETS = {"base": "rcg-b", "large": "rcg-l"}
_PART_MODULES = {"encoder": RepresentationEncoder, "rdm": RepresentationDenoiser, "mage": MAGE,
                 "tokenizer": VQTokenizer}


class OfficialFiles(NamedTuple):
    """What :func:`read_official_files` returns: the pipeline's config (metadata with the files'
    provenance) and its full state dict (``encoder.*``, ``rdm.*``, ``tokenizer.*``, ``mage.*``)."""

    config: PipelineConfig
    state_dict: dict[str, torch.Tensor]


def read_official_files(
    *, encoder: str | os.PathLike | None = None, rdm: str | os.PathLike | None = None,
    mage: str | os.PathLike | None = None, tokenizer: str | os.PathLike | None = None, arch: str = "base",
    use_ema: bool = True, verify_sha256: bool = True,
) -> OfficialFiles:
    """The authors' checkpoint files -> the config and state dict of an RCG pipeline.

    The arguments are those of :meth:`RCGPipeline.from_official
    <rcg_augment.pipeline.RCGPipeline.from_official>`, which builds the pipeline from the result.
    Each part comes from its own file when given, else from a copy another file embeds; every
    copy found is checked against the part's module (built on the meta device: no memory).
    """
    if arch not in ARCH_PRESETS:
        raise ValueError(f"`arch` must be 'base' or 'large', got {arch!r}")
    if rdm is None or mage is None:
        raise ValueError("from_official needs at least `rdm=` and `mage=` files (the encoder and tokenizer are "
                         "embedded in the MAGE file and may be given separately)")
    config = preset_config(ARCH_PRESETS[arch])
    files = {"encoder": encoder, "rdm": rdm, "mage": mage, "tokenizer": tokenizer}
    # Where each part comes from, best first: its own file, then the copies other files embed.
    candidates: dict[str, list[tuple[Path, str, dict, dict]]] = {p: [] for p in files}
    order = ["encoder", "tokenizer", "mage", "rdm"]
    for kind in order:
        if files[kind] is None:
            continue
        path = Path(files[kind])
        converted = convert_official_file(path, kind, pipeline=config, use_ema=use_ema)
        for part, state in converted.parts.items():
            candidates[part].append((path, kind, state, (converted.origins or {}).get(part, {})))
    provenance, full_state = {}, {}
    for part in ("encoder", "rdm", "mage", "tokenizer"):
        if not candidates[part]:
            raise ValueError(f"no {part} weights: pass `{part}=` (no given file embeds them)")
        with torch.device("meta"):
            own = _PART_MODULES[part](getattr(config, part)).state_dict()
        # The copies not loaded are checked too: a damaged embedded key must not pass unnoticed
        # just because a separate file stood in for it.
        for path, kind, state, origins in candidates[part]:
            _check_part(own, state, part=part, path=path, arch=arch, origins=origins, embedded=kind != part)
        path, _, state, _ = candidates[part][0]
        full_state.update({f"{part}.{k}": v for k, v in state.items()})
        provenance[part] = {**OFFICIAL_SOURCES[part], "file": path.name}
        if verify_sha256:
            provenance[part]["sha256"] = sha256_file(path)
    config.metadata.update({"preset": ARCH_PRESETS[arch], "official": provenance,
                            "license": "encoder weights CC BY-NC 4.0 (MoCo v3); RCG/MAGE MIT"})
    return OfficialFiles(config, full_state)



def __getattr__(name: str):
    if name == "load_checkpoint":  # its name before the training loop got a loader of its own
        warnings.warn("rcg_augment.official.load_checkpoint is now load_official_checkpoint", DeprecationWarning,
                      stacklevel=2)
        return load_official_checkpoint
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "ARCH_PRESETS", "IGNORED", "OFFICIAL_SOURCES", "Converted", "OfficialCheckpointError", "OfficialFiles",
    "convert_mage", "convert_mocov3_encoder", "convert_official_file", "convert_rdm", "convert_vqgan",
    "load_official_checkpoint", "rdm_ema_key", "read_official_files",
]
