"""Hub models: one resolver (bundled name -> directory -> Hub id), the Hub cache and offline mode,
revision pinning, push round trip (uploads land in a local cache), and the model card.

Nothing here reaches the network: tests/conftest.py sets HF_HUB_OFFLINE=1, and the "Hub" is a
cache folder in the layout huggingface_hub itself writes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
from huggingface_hub import constants, scan_cache_dir
from huggingface_hub.utils import filter_repo_objects
from PIL import Image

from rcg_augment import RCGAugment, RCGPipeline, RepresentationAugment
from rcg_augment.hub import CARD_MARKER, HUB_FILES, forget_resolved_models, parse_hub_id
from rcg_augment.zoo import WEIGHTS_DIR, available_models, resolve_model_dir
from tests.hub_cache import publish_folder
from tests.training.helpers import micro_pipeline

REPO = "rcg-test/micro"
FAST = {"num_iter": 2, "rdm_steps": 2}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def offline_and_fresh(monkeypatch):
    """Offline as HF_HUB_OFFLINE=1 makes it, and no resolution remembered from another test."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    forget_resolved_models()
    yield
    forget_resolved_models()


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "hub-cache"


def _saved(tmp_path, seed: int, name: str = "saved") -> tuple[Path, RCGPipeline]:
    pipe = micro_pipeline(seed=seed)
    return pipe.save_pretrained(tmp_path / name, metadata={"name": f"micro-{seed}", "license": "MIT (test)"}), pipe


def _same_weights(a: RCGPipeline, b: RCGPipeline) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_hub_ids_are_namespace_slash_name():
    assert parse_hub_id("org/name") == ("org/name", None)
    assert parse_hub_id("org/name@v1.0") == ("org/name", "v1.0")
    assert parse_hub_id("org/name@refs/pr/1") == ("org/name", "refs/pr/1")
    for text in ("name", "/abs/dir", "./org/name", "a/b/c", "org/../x", "org/name.git", "org/", "org name/x"):
        assert parse_hub_id(text) is None, text


def test_the_cache_is_huggingface_hubs_own_layout(tmp_path, cache):
    directory, _ = _saved(tmp_path, 0)
    commit = publish_folder(directory, REPO, cache)
    info = scan_cache_dir(cache)
    [repo] = info.repos
    assert repo.repo_id == REPO and repo.repo_type == "model"
    [revision] = repo.revisions
    assert revision.commit_hash == commit and revision.refs == frozenset({"main"})
    assert {f.file_name for f in revision.files} == set(HUB_FILES)


def test_load_by_id_offline_by_revision_and_pinned_in_the_name(tmp_path, cache):
    first_dir, first = _saved(tmp_path, 0, "v1")
    first_commit = publish_folder(first_dir, REPO, cache, refs=("main", "v1"))
    second_dir, second = _saved(tmp_path, 1, "v2")
    second_commit = publish_folder(second_dir, REPO, cache, refs=("main",))  # main moves on; tag v1 stays
    assert first_commit != second_commit and not _same_weights(first, second)

    latest = RCGPipeline.from_pretrained(REPO, cache_dir=cache)
    assert _same_weights(latest, second) and latest.config.metadata["name"] == "micro-1"
    for pinned in (RCGPipeline.from_pretrained(REPO, cache_dir=cache, revision=first_commit),
                   RCGPipeline.from_pretrained(REPO, cache_dir=cache, revision="v1"),
                   RCGPipeline.from_pretrained(f"{REPO}@v1", cache_dir=cache)):
        assert _same_weights(pinned, first)
    assert resolve_model_dir(REPO, cache_dir=cache, revision="v1").name == first_commit
    with pytest.raises(ValueError, match="pins revision 'v1' but `revision` is 'main'"):
        resolve_model_dir(f"{REPO}@v1", cache_dir=cache, revision="main")


def test_offline_miss_and_unknown_names_say_what_was_tried(tmp_path, cache):
    with pytest.raises(FileNotFoundError, match=r"'rcg-test/absent' \(revision 'main'\) is not in the Hugging Face "
                                                r"cache.*offline \(HF_HUB_OFFLINE=1"):
        RCGPipeline.from_pretrained("rcg-test/absent", cache_dir=cache)
    directory, _ = _saved(tmp_path, 0)
    publish_folder(directory, REPO, cache)
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache"):
        RCGPipeline.from_pretrained(REPO, cache_dir=cache, revision="v9")
    with pytest.raises(FileNotFoundError, match="neither a directory nor a named model.*nor a Hugging Face Hub id"):
        RCGPipeline.from_pretrained("no-such-model")


def test_a_hub_repo_without_safetensors_is_refused(tmp_path, cache):
    directory, _ = _saved(tmp_path, 0)
    (directory / "model.safetensors").unlink()
    (directory / "pytorch_model.bin").write_bytes(b"pickle would be here")
    publish_folder(directory, REPO, cache)
    with pytest.raises(FileNotFoundError, match=r"not a saved RCGPipeline: it lacks model.safetensors"):
        RCGPipeline.from_pretrained(REPO, cache_dir=cache)


def test_hub_copy_gets_the_same_config_and_shape_checks(tmp_path, cache):
    directory, _ = _saved(tmp_path, 0)
    config = json.loads((directory / "config.json").read_text())
    config["mage"]["depth"] = 2  # the weights hold one block
    (directory / "config.json").write_text(json.dumps(config))
    publish_folder(directory, REPO, cache)
    with pytest.raises(ValueError, match="does not match this pipeline's config"):
        RCGPipeline.from_pretrained(REPO, cache_dir=cache)


def test_hf_hub_offline_environment_variable_in_a_fresh_process(tmp_path, cache):
    """The real switch: HF_HUB_OFFLINE=1 and HF_HUB_CACHE in the environment, no arguments."""
    directory, pipe = _saved(tmp_path, 0)
    publish_folder(directory, REPO, cache)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    code = ("from rcg_augment import RCGPipeline; "
            f"print(RCGPipeline.from_pretrained({REPO!r}).fingerprint())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == pipe.fingerprint()


@pytest.fixture
def fake_hub(monkeypatch, cache):
    """HfApi's create/upload calls, answered by publishing into ``cache`` (what a later download would hold)."""
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))

    def create_branch(self, repo_id, *, branch, **kwargs):
        calls.append(("create_branch", repo_id, branch))

    def upload_folder(self, *, repo_id, folder_path, revision=None, allow_patterns=None, ignore_patterns=None,
                      **kwargs):
        names = [p.name for p in Path(folder_path).iterdir() if p.is_file()]
        chosen = list(filter_repo_objects(names, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
        files = {n: (Path(folder_path) / n).read_bytes() for n in chosen}
        from tests.hub_cache import publish_to_cache

        commit = publish_to_cache(files, repo_id, cache, refs=(revision or "main",))
        calls.append(("upload_folder", repo_id, sorted(chosen)))
        return commit

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_branch", create_branch)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    return calls


def test_push_to_hub_then_load_by_id(fake_hub, cache, tmp_path):
    pipe = micro_pipeline(seed=3)
    commit = pipe.push_to_hub(REPO, metadata={"license": "MIT (test)"})
    assert fake_hub[0][:2] == ("create_repo", REPO)
    assert fake_hub[-1] == ("upload_folder", REPO, sorted(HUB_FILES))
    loaded = RCGPipeline.from_pretrained(REPO, cache_dir=cache)
    assert _same_weights(loaded, pipe) and loaded.config.metadata["license"] == "MIT (test)"
    card = (resolve_model_dir(REPO, cache_dir=cache) / "README.md").read_text()
    assert f'RCGPipeline.from_pretrained("{REPO}")' in card

    # save_pretrained(push_to_hub=True) uploads the folder it wrote, to a branch when asked
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("not uploaded")
    pipe.save_pretrained(tmp_path / "out", push_to_hub=True, repo_id=REPO, revision="exp")
    assert ("create_branch", REPO, "exp") in fake_hub
    assert fake_hub[-1] == ("upload_folder", REPO, sorted(HUB_FILES))
    assert _same_weights(RCGPipeline.from_pretrained(REPO, cache_dir=cache, revision="exp"), pipe)
    assert commit is not None
    # float16 storage on the Hub too
    pipe.push_to_hub(REPO, dtype=torch.float16, revision="half")
    half = RCGPipeline.from_pretrained(REPO, cache_dir=cache, revision="half")
    assert half.config.metadata["weights_dtype"] == "float16" and {p.dtype for p in half.parameters()} == {torch.float32}


def test_push_arguments_are_checked(tmp_path):
    pipe = micro_pipeline()
    with pytest.raises(ValueError, match="needs `repo_id`"):
        pipe.save_pretrained(tmp_path / "a", push_to_hub=True)
    with pytest.raises(TypeError, match="without push_to_hub=True"):
        pipe.save_pretrained(tmp_path / "a", private=True)
    with pytest.raises(ValueError, match="`repo_id` must be a Hub id 'namespace/name', got 'just-a-name'"):
        pipe.push_to_hub("just-a-name")


@pytest.fixture
def default_cache(monkeypatch, cache, tmp_path):
    """The Hub id published into the default cache (what HF_HUB_CACHE points at)."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    directory, pipe = _saved(tmp_path, 0)
    publish_folder(directory, REPO, cache)
    return pipe


def test_every_entry_point_takes_a_hub_id(default_cache, tmp_path, capsys):
    """RCGAugment (torchvision and albumentations), RepresentationAugment, `build --model` and
    `finetune --from` all go through zoo.resolve_model_dir."""
    from rcg_augment.albumentations import AlbuRCGAugment
    from rcg_augment.cli import main
    from rcg_augment.training.api import resolve_init

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 12), dtype=np.uint8))
    out = RCGAugment(model=REPO, noise_level=0.5, seed=0, **FAST)(image)
    assert out.size == image.size and out.mode == "L"
    albu = AlbuRCGAugment(model=REPO, noise_level=0.5, p=1.0, **FAST)
    assert albu(image=np.asarray(image))["image"].shape == (12, 12)
    assert RepresentationAugment(model=REPO, noise_level=0.5).pipeline.fingerprint() == default_cache.fingerprint()

    folder = tmp_path / "images"
    for c in ("a", "b"):
        (folder / c).mkdir(parents=True)
        image.save(folder / c / "0.png")
    code = main(["build", "--input", str(folder), "--out", str(tmp_path / "cache"), "--variants", "1",
                 "--model", REPO, "--num-iter", "2", "--rdm-steps", "2", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["model"]["fingerprint"] == default_cache.fingerprint()
    assert manifest["provenance"]["model"] == REPO

    start, described = resolve_init(REPO, tmp_path / "ft", None)  # what finetune --from / train --init call
    assert described == REPO and _same_weights(start, default_cache)


def test_resolution_order_bundled_name_then_directory_then_hub(monkeypatch, tmp_path):
    if "digits-tiny" not in available_models():
        pytest.skip("digits-tiny is not bundled in this installation")

    def no_network(*args, **kwargs):
        raise AssertionError("a bundled name or a directory must not reach the Hub")

    monkeypatch.setattr("rcg_augment.hub.download_model", no_network)
    monkeypatch.chdir(tmp_path)
    Path("digits-tiny").mkdir()  # a folder of the same name does not shadow the bundled model
    assert resolve_model_dir("digits-tiny") == WEIGHTS_DIR / "digits-tiny"
    directory, _ = _saved(tmp_path, 0, "rcg-test/micro")  # a directory that looks like a Hub id wins over the Hub
    assert resolve_model_dir("rcg-test/micro") == Path("rcg-test/micro")
    assert directory.is_dir()


def test_model_card_says_what_how_license_use_and_limits(tmp_path):
    pipe = micro_pipeline()
    pipe.config.metadata.update({
        "training": [{"stage": "rdm", "steps": 40, "effective_batch": 8, "lr": 1e-3, "data": "digits",
                      "num_images": 32, "final_loss": 0.5, "init": "preset tiny", "recipe": "digits-tiny",
                      "seconds": 150.0, "torch_threads": 2, "device": "cpu"}],
        "limits": ["label kept by 73% of variants at noise 0.3 (benchmarks/speed_quality.py)"],
    })
    directory = pipe.save_pretrained(tmp_path / "m", metadata={"license": "MIT (trained by rcg-augment)"})
    card = (directory / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: rcg-augment\nlicense: mit\n")
    assert CARD_MARKER in card
    for section in ("## What it is", "## How to use", "## How it was trained", "## License", "## Intended use",
                    "## Measured limits"):
        assert section in card
    assert "| rdm | 40 | 8 | 0.001 | digits | 32 | 0.5 | 2 min (cpu, 2 threads) | preset tiny (recipe digits-tiny) |" \
        in card
    assert "label kept by 73% of variants" in card
    assert "MIT (trained by rcg-augment)" in card and "CC BY-NC 4.0" in card
    assert json.loads((directory / "config.json").read_text())["metadata"]["weights_sha256"] in card


def test_model_card_license_of_moco_derived_weights_and_a_users_readme_is_kept(tmp_path):
    pipe = micro_pipeline()
    pipe.config.metadata.update({"official": {"encoder": {"name": "MoCo v3 ViT", "license": "CC BY-NC 4.0",
                                                          "source": "dl.fbaipublicfiles.com"}},
                                 "license": "encoder weights CC BY-NC 4.0 (MoCo v3); RCG/MAGE MIT"})
    directory = pipe.save_pretrained(tmp_path / "m")
    card = (directory / "README.md").read_text()
    assert "license: cc-by-nc-4.0" in card and "- encoder: MoCo v3 ViT (CC BY-NC 4.0)" in card
    assert "None recorded in this model's metadata" in card
    (directory / "README.md").write_text("# my own notes\n")
    pipe.save_pretrained(directory)
    assert (directory / "README.md").read_text() == "# my own notes\n"
    del pipe.config.metadata["license"], pipe.config.metadata["official"]
    other = pipe.save_pretrained(tmp_path / "n")
    assert "license: other" in (other / "README.md").read_text()
    assert "not recorded in this model's metadata" in (other / "README.md").read_text()


def test_bundled_models_load_without_network(monkeypatch):
    if not available_models():
        pytest.skip("no bundled model")

    def no_network(*args, **kwargs):
        raise AssertionError("bundled names must not reach the Hub")

    monkeypatch.setattr("rcg_augment.hub.download_model", no_network)
    name = available_models()[0]
    assert RCGPipeline.from_pretrained(name).config.metadata["name"] == name
