"""`pip install rcg-augment` without extras: the built-in sources ("digits", "lfw-faces") need
scikit-learn / scikit-image, and say in one line which extra brings them."""

from __future__ import annotations

import sys

import pytest

from rcg_augment.cli import main
from rcg_augment.data import SourceError, open_source
from rcg_augment.data.sources import BUILTIN_EXTRA, MissingExtraError


def _uninstall(monkeypatch, module: str) -> None:
    """None in sys.modules makes every import of ``module`` fail, as if it were not installed."""
    for name in [m for m in sys.modules if m == module or m.startswith(module + ".")] + [module]:
        monkeypatch.setitem(sys.modules, name, None)


@pytest.mark.parametrize(("source", "module", "distribution"), [
    ("digits", "sklearn", "scikit-learn"), ("lfw-faces", "skimage", "scikit-image")])
def test_builtin_source_without_its_extra_names_the_extra(monkeypatch, source, module, distribution):
    _uninstall(monkeypatch, module)
    with pytest.raises(MissingExtraError) as info:
        open_source(source)
    message = str(info.value)
    assert message == (f"the built-in source {source!r} needs {distribution}, which is not installed; install it "
                       f'with: pip install {distribution} (or, in a clone of rcg-augment: pip install -e '
                       f'".[{BUILTIN_EXTRA}]")')
    assert "pip install rcg-augment" not in message  # not on a package index (yet)
    assert isinstance(info.value, ImportError) and isinstance(info.value, SourceError)


def test_cli_says_it_in_one_line(monkeypatch, tmp_path, capsys):
    from tests.training.helpers import micro_pipeline

    model = micro_pipeline().save_pretrained(tmp_path / "model")
    _uninstall(monkeypatch, "sklearn")
    code = main(["build", "--input", "digits", "--out", str(tmp_path / "c"), "--variants", "1",
                 "--noise-level", "0.3", "--model", str(model)])
    err = capsys.readouterr().err
    assert code == 1
    assert err.strip() == ("rcg-augment build: error: the built-in source 'digits' needs scikit-learn, which is not "
                           'installed; install it with: pip install scikit-learn (or, in a clone of rcg-augment: '
                           'pip install -e ".[examples]")')


def test_the_extra_is_declared_and_dev_includes_it():
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]
    extra = project["optional-dependencies"][BUILTIN_EXTRA]
    assert {r.split(">")[0] for r in extra} == {"scikit-learn", "scikit-image"}
    assert f"rcg-augment[{BUILTIN_EXTRA}]" in project["optional-dependencies"]["dev"]
