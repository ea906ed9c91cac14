import pytest
from packaging.version import Version

from qlora_doctor.core.environment import build_from_local_tag, parse_torch_version_py
from qlora_doctor.sources.requirements import environment_from_pins, parse_requirements
from qlora_doctor.sources.installed import installed_environment
from qlora_doctor.core.errors import InputError


def test_local_tags():
    assert build_from_local_tag("cu124").cuda == Version("12.4")
    assert build_from_local_tag("cu118").cuda == Version("11.8")
    assert build_from_local_tag("cu130").cuda == Version("13.0")
    assert build_from_local_tag("rocm6.2").backend == "rocm"
    assert build_from_local_tag("cpu").backend == "cpu"


def test_torch_version_py_read_as_text(data_dir):
    build = parse_torch_version_py((data_dir / "torch-version-cu124.py").read_text())
    assert build.backend == "cuda" and build.cuda == Version("12.4")
    rocm = parse_torch_version_py((data_dir / "torch-version-rocm.py").read_text())
    assert rocm.backend == "rocm" and rocm.cuda is None


def test_requirements_parsing_and_torch_variant():
    pins = parse_requirements("# locked\n--extra-index-url https://download.pytorch.org/whl/cu124\n"
                              "torch==2.5.1+cu124\nTransformers==4.46.3  # comment\npeft==0.13.2 \\\n"
                              "    --hash=sha256:abc\n", "req.txt")
    assert pins == {"torch": "2.5.1+cu124", "transformers": "4.46.3", "peft": "0.13.2"}
    env = environment_from_pins(pins, "req.txt")
    assert env.torch.backend == "cuda" and env.torch.cuda == Version("12.4")
    assert env.version("transformers") == Version("4.46.3")


def test_requirements_errors_name_file_and_line():
    with pytest.raises(InputError) as err:
        parse_requirements("torch==2.5.1\npeft>=0.4\nnot a pin!!\nnumpy==1.26.4\nnumpy==2.0.0\n", "r.txt")
    text = "\n".join(err.value.messages)
    assert "r.txt:2: 'peft>=0.4' is not an exact pin" in text
    assert "r.txt:3: not a requirement" in text
    assert "r.txt:5: numpy is pinned twice" in text


def test_two_digit_minor_versions_compare_as_versions():
    env = environment_from_pins({"torch": "2.10.0+cu128"}, "x")
    assert env.version("torch") > Version("2.4.0")  # "2.10" < "2.4" as strings


def test_installed_environment_reads_this_venv_without_importing_torch():
    import sys
    had_torch = "torch" in sys.modules
    env = installed_environment()
    assert env.version("packaging") is not None
    if env.installed("torch"):
        assert env.torch.backend in ("cpu", "cuda", "rocm")
    assert ("torch" in sys.modules) == had_torch


def test_broken_metadata_is_reported_not_crashed(tmp_path, monkeypatch):
    site = tmp_path / "site"
    broken = site / "brokenpkg-1.0.dist-info"
    broken.mkdir(parents=True)
    (broken / "METADATA").write_bytes(b"\xff\xfe garbage")
    bad_version = site / "weirdpkg-0.1.dist-info"
    bad_version.mkdir()
    (bad_version / "METADATA").write_text("Metadata-Version: 2.1\nName: weirdpkg\nVersion: not.a.version!\n")
    monkeypatch.syspath_prepend(str(site))
    env = installed_environment()
    assert env.packages["weirdpkg"].problem
    assert env.packages["brokenpkg"].problem
