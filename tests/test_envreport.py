"""Environment reports as issues paste them (sources/envreport.py): `pip list`, `conda list`, torch's collect_env,
`transformers env`, judged by `check -r` as the environment that was installed."""

from __future__ import annotations

import json

from click.testing import CliRunner

from qlora_doctor.cli import cli
from qlora_doctor.sources.envreport import read_report

PIP_LIST = """Package                  Version      Editable project location
------------------------ ------------ -------------------------
accelerate               0.21.0
bitsandbytes             0.40.2
datasets                 2.14.4
llava                    1.2.2.post1  /home/me/LLaVA
peft                     0.4.0
torch                    2.0.1+cu118
transformers             4.31.0
"""

CONDA_LIST = """# packages in environment at /opt/conda/envs/qlora:
#
# Name                    Version                   Build  Channel
cudatoolkit               11.8.0               h6a678d5_0
pytorch                   2.1.0           py3.10_cuda12.1_cudnn8.9.2_0    pytorch
transformers              4.35.2                   pypi_0    pypi
bitsandbytes              0.41.1                   pypi_0    pypi
"""

COLLECT_ENV = """Collecting environment information...
PyTorch version: 2.1.0+cu121
Is CUDA available: True

Versions of relevant libraries:
[pip3] numpy==2.0.0
[pip3] torch==2.1.0
[conda] pytorch-cuda              12.1                 ha16c6d3_5    pytorch
"""

HF_ENV = """- `transformers` version: 4.36.2
- Platform: Linux-6.1.58+-x86_64-with-glibc2.35
- Python version: 3.10.12
- Huggingface_hub version: 0.20.1
- Accelerate version: 0.25.0
- PyTorch version (GPU?): 2.1.0+cu121 (True)
- Tensorflow version (GPU?): not installed (NA)
"""


def test_each_report_gives_the_versions_it_shows():
    pip = read_report(PIP_LIST)
    assert pip.kind == "pip list" and pip.complete
    assert pip.pins["torch"] == "2.0.1+cu118" and pip.pins["llava"] == "1.2.2.post1" and pip.pins["peft"] == "0.4.0"
    conda = read_report(CONDA_LIST)
    assert conda.pins == {"torch": "2.1.0+cu121", "transformers": "4.35.2", "bitsandbytes": "0.41.1"}
    env = read_report(COLLECT_ENV)
    assert env.pins == {"torch": "2.1.0+cu121", "numpy": "2.0.0"} and not env.complete
    hf = read_report(HF_ENV)
    assert hf.pins == {"transformers": "4.36.2", "huggingface-hub": "0.20.1", "accelerate": "0.25.0",
                       "torch": "2.1.0+cu121"}
    assert read_report("torch==2.1.0\ntransformers>=4.36\n") is None


def _check(tmp_path, text):
    path = tmp_path / "report.txt"
    path.write_text(text)
    result = CliRunner().invoke(cli, ["check", "-r", str(path), "--machine", "a100", "--json"])
    assert result.exit_code in (0, 1), result.output
    report = json.loads(result.stdout)
    return report, {c["id"]: c for c in report["checks"]}


def test_a_pasted_report_is_judged_as_installed_not_resolved(tmp_path):
    # bitsandbytes 0.40.2 with torch cu118: the legacy CUDA setup rule; the editable project (not on PyPI) is no
    # obstacle, since nothing is resolved
    report, checks = _check(tmp_path, PIP_LIST)
    assert "read as pip list output" in checks["packages.resolved"]["detail"]
    assert report["packages"]["bitsandbytes"] == "0.40.2"
    # numpy 2 under torch 2.1: collect_env shows it, and the rule fires from the report alone
    report, checks = _check(tmp_path, COLLECT_ENV)
    assert report["status"] == "fail" and checks["rule:numpy-2-old-torch"]["status"] == "fail"
    assert "packages it does not show are unknown" in checks["packages.resolved"]["detail"]


def test_a_full_listing_without_bitsandbytes_says_so_as_a_report():
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        report, checks = _check(Path(tmp), "Package Version\n------- -------\ntorch 2.6.0\ntransformers 4.50.0\n"
                                "peft 0.15.0\naccelerate 1.5.0\ndatasets 3.4.0\n")
    assert checks["packages.training"]["detail"] == "not in the pasted pip list: bitsandbytes (QLoRA could not start there)"
