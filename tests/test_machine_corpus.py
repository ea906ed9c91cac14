"""`--machine` on real machine descriptions: nvidia-smi tables (whole, cut, quoted, Windows), `nvidia-smi -q`/`-L`,
`--query-gpu` CSV, torch's collect_env (old, new, vLLM's), transformers-env-like bullet lists, CPU-only, ROCm and
Apple reports, deviceQuery, rocm-smi, ultralytics' banner, prose from issue bodies (`2 * 4090`, `T4 x 2`), each pasted
into a public GitHub thread (tests/data/machine_corpus/, index.toml says what a careful reader takes from each).
Every case is a test of its own facts.

`python tests/test_machine_corpus.py OUT.json` scores the corpus through the real CLI (`check --machine FILE --json`
and `lock --machine FILE`) into bench/results/machine_corpus_*.json.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

CORPUS = Path(__file__).parent / "data" / "machine_corpus"
CASES = tomllib.loads((CORPUS / "index.toml").read_text())["case"]


def _bare(name: str) -> str:
    """A GPU name as nvidia-smi printed it, less the `...` it puts where it cut the name."""
    return re.sub(r"\s*\.\.\.$", "", name.strip())


def score(case: dict[str, Any], machine: dict[str, Any] | None, exit_code: int, output: str,
          torch_pin: str | None) -> dict[str, Any]:
    """Each fact of the case: right, wrong (with what came out) or missing; the exit code judged too."""
    facts: dict[str, Any] = {}
    traceback = "Traceback (most recent call last)" in output

    def judge(key: str, got: Any, want: Any) -> None:
        if got == want:
            facts[key] = "right"
        elif got in (None, [], "") or (isinstance(got, list) and all(g in (None, "") for g in got) and want):
            facts[key] = {"missing": True, "expected": want}
        else:
            facts[key] = {"wrong": got, "expected": want}

    if case.get("expect_error"):
        named = str(CORPUS / case["file"]) in output or case["file"] in output
        facts["error"] = "right" if exit_code == 2 and not traceback and named else {
            "wrong": f"exit {exit_code}" + (" (traceback)" if traceback else "") + ("" if named else ", file not named"),
            "expected": "exit 2 naming the file"}
        return {"facts": facts, "traceback": traceback}
    if machine is None:
        return {"facts": {k: {"missing": True, "expected": case[k]} for k in _FACT_KEYS if k in case},
                "traceback": traceback}
    for key in case.get("unread_facts", []):  # facts the tool leaves unread on purpose: missing, not judged
        facts[key] = {"missing": True, "expected": case[key], "unread": True}
    case = {k: v for k, v in case.items() if k not in case.get("unread_facts", [])}
    vendor = case.get("vendor", "nvidia")
    gpus = [g for g in machine["gpus"] if g.get("vendor", "nvidia") == (vendor if vendor in ("nvidia", "amd") else
                                                                         "nvidia")]
    if "gpus" in case:
        judge("gpus", [_bare(g["name"]) for g in gpus], [_bare(n) for n in case["gpus"]])
    if "gpu_count" in case:
        judge("gpu_count", len(gpus), case["gpu_count"])
    if case.get("gpus_unnamed"):
        judge("gpus_unnamed", bool(gpus) and machine["gpu_vendor"] == "nvidia", True)
    if "memory_mib" in case:
        judge("memory_mib", [g.get("memory_total_mib") for g in gpus], case["memory_mib"])
    if "mig" in case:
        mem = [g.get("memory_total_mib") for g in gpus]
        slice_mib = int(re.search(r"\.(\d+)gb", case["mig"][0]).group(1)) * 1024
        judge("mig_slice_memory", bool(mem) and all(m is not None and m <= slice_mib for m in mem), True)
    if "compute_capability" in case:
        judge("compute_capability", [g.get("compute_capability") or "" for g in gpus], case["compute_capability"])
    for key, field in (("driver", "driver_version"), ("cuda_driver", "cuda_driver_version"), ("python", "python"),
                       ("os", "os"), ("arch", "arch"), ("libc", "libc")):
        if key in case:
            judge(key, machine.get(field), case[key])
    if "host_memory_mib" in case:
        judge("host_memory_mib", machine.get("host_memory_mib"), case["host_memory_mib"])
    if "vendor" in case:
        judge("vendor", machine["gpu_vendor"], case["vendor"])
    if "torch" in case:
        judge("torch", torch_pin, case["torch"])
    return {"facts": facts, "traceback": traceback}


_FACT_KEYS = ("gpus", "gpu_count", "gpus_unnamed", "memory_mib", "mig", "compute_capability", "driver", "cuda_driver",
              "python", "os", "arch", "libc", "host_memory_mib", "vendor", "torch")


def _torch_pin(path: Path) -> str | None:
    """The torch version `check -r FILE` reads from the same paste."""
    from qlora_doctor.sources.envreport import read_report

    report = read_report(path.read_text(encoding="utf-8"))
    return report.pins.get("torch") if report else None


# --- the tests ----------------------------------------------------------------------------------------------------

def _id(case: dict[str, Any]) -> str:
    return case["file"].rsplit(".", 1)[0]


PLAIN = (".json", ".yaml", ".yml")
"""Hand-written descriptions (round 2): JSON carries no `# URL` line (index.toml names the thread); YAML does."""


def _heading_ok(case: dict[str, Any], text: str) -> bool:
    return case["file"].endswith(".json") or text.startswith(f"# {case['url']}\n")


def _marks(case: dict[str, Any]):
    return pytest.param(case, id=_id(case))


@pytest.mark.parametrize("case", [_marks(c) for c in CASES])
def test_case_facts(case):
    from click.testing import CliRunner

    from qlora_doctor.cli import cli

    path = CORPUS / case["file"]
    assert _heading_ok(case, path.read_text())
    result = CliRunner().invoke(cli, ["check", "--json", "--no-resolve", "--machine", str(path)])
    output = result.output + (result.stderr if result.stderr_bytes is not None else "")
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a traceback is the worst result: show it
    if case.get("unread"):  # prose left unread on purpose: an honest refusal, naming the file (scored as missing)
        assert result.exit_code == 2 and case["file"] in output, output[-2000:]
        return
    machine = json.loads(result.output)["machine"] if result.exit_code in (0, 1) else None
    scored = score(case, machine, result.exit_code, output, _torch_pin(path))
    wrong = {k: v for k, v in scored["facts"].items() if v != "right" and not v.get("unread")}
    assert not wrong, json.dumps(wrong, indent=1) + "\n" + output[-2000:]


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_the_paste_reader_gets_every_case_right(case):
    """envreport.machine_facts on its own (what `--machine` uses for every paste but the nvidia-smi tables that
    sources/machine.py reads first), then the tables' fill-in, as `--machine` does."""
    from qlora_doctor.core.errors import InputError
    from qlora_doctor.core.machine import machine_from_dict, machine_from_text, read_machine_text
    from qlora_doctor.sources.envreport import machine_facts
    from qlora_doctor.sources.machine import fill_from_tables

    path = CORPUS / case["file"]
    text = read_machine_text(path)
    plain = path.suffix in PLAIN
    facts = None if plain else machine_facts(text)
    if case.get("unread"):
        assert facts is None, facts
        return
    if facts is None and not plain and case.get("expect_error"):  # no GPU facts at all (a container's banner):
        scored = score(case, None, 2, str(path), None)            # `--machine` refuses it, naming the file
        assert scored["facts"]["error"] == "right", scored
        return
    assert plain or facts is not None, "not recognised as a paste"
    try:
        described = machine_from_text(text, path) if plain else machine_from_dict(facts, str(path))
        machine, exit_code, output = fill_from_tables(described).to_json(), 0, ""
    except InputError as err:
        machine, exit_code, output = None, 2, "\n".join(err.messages)
    scored = score(case, machine, exit_code, output, _torch_pin(path))
    wrong = {k: v for k, v in scored["facts"].items() if v != "right" and not v.get("unread")}
    assert not wrong, json.dumps(wrong, indent=1)


def test_the_corpus_covers_the_common_machines():
    names = " ".join(" ".join(c.get("gpus", [])) for c in CASES)
    for gpu in ("T4", "V100", "A10G", "L4", "A100 80G", "A100-SXM4-40GB", "RTX 3060", "RTX 3090", "RTX 4090",
                "RTX 5090", "H100", "RTX A6000", "L40S"):
        assert gpu in names, gpu
    assert 125 <= len(CASES) <= 320 and len({c["file"] for c in CASES}) == len(CASES)
    files = [p.name for p in CORPUS.iterdir() if p.suffix in (".txt", *PLAIN)]
    assert sorted(files) == sorted(c["file"] for c in CASES)
    assert {c.get("vendor") for c in CASES} >= {"nvidia", "amd", "apple", "none"}
    assert any(c.get("expect_error") for c in CASES) and any("mig" in c for c in CASES)
    assert any(c.get("gpu_count", 0) >= 8 for c in CASES)


def test_round_two_covers_new_machines_and_layouts():
    """Round 2 (cases 36 on): machines and layouts round 1 lacked, and hand-written descriptions."""
    later = [c for c in CASES if 36 <= int(c["file"].split("-")[0]) < 60]
    names = " ".join(" ".join(c.get("gpus", [])) for c in later)
    for gpu in ("P100", "Tesla P4", "H200", "GH200", "B200", "Orin", "A10G", "RTX 5080", "RTX 5090", "RTX 4090D",
                "Tesla T4", "TITAN Xp", "RTX 6000D"):
        assert gpu in names, gpu
    assert 20 <= len(later) <= 30
    assert sum(c["format"].startswith("plain") for c in later) >= 3
    assert any(c.get("arch") == "aarch64" for c in later) and any(c.get("gpus_unnamed") for c in later)


def test_round_three_covers_reports_banners_and_host_memory():
    """Round 3 (cases 60 on): collect_env of 2025-2026 (ROCm, CPU-only, WSL2, B200), accelerate env, unsloth's
    banner, Windows' Driver-Model column, issue forms, hand-written bullets, and the host memory pasted beside."""
    later = [c for c in CASES if 60 <= int(c["file"].split("-")[0]) < 84]
    names = " ".join(" ".join(c.get("gpus", [])) for c in later)
    for gpu in ("MI300X", "B200", "GB10", "A800", "A100-SXM4-80GB", "RTX 4090", "RTX 5090", "RTX A6000", "Tesla T4",
                "V100S", "RTX 4000 Ada"):
        assert gpu in names, gpu
    assert 20 <= len(later) <= 30
    formats = " ".join(c["format"] for c in later)
    for form in ("collect_env", "accelerate env", "unsloth", "issue form", "bullet", "nvidia-smi -L", "nvidia-smi -a",
                 "Driver-Model", "ollama"):
        assert form in formats, form
    assert sum("host_memory_mib" in c for c in later) >= 3
    assert {c.get("vendor") for c in later} >= {"nvidia", "amd", "none"}


def test_round_four_covers_query_forms_platforms_and_prose():
    """Round 4 (cases 84 on): `nvidia-smi -q`/`-a` of drivers 390-535, deviceQuery, `--query-gpu` with compute_cap
    on a mixed box, rocm-smi, Jetson bullets (bold keys), an Apple issue form, Intel XPU, ultralytics' banner and
    checks table (with host memory), and prose from issue bodies, left unread at first sight and read by
    envreport.prose_facts since (`read_in_round4`)."""
    later = [c for c in CASES if 84 <= int(c["file"].split("-")[0]) < 107]
    names = " ".join(" ".join(c.get("gpus", [])) for c in later)
    for gpu in ("Tesla K80", "V100", "GTX 1080 Ti", "Quadro P2200", "MX150", "Tegra X1", "TITAN V", "RTX 5880 Ada",
                "MI100", "Jetson Orin", "RTX A6000", "RTX 4080 SUPER"):
        assert gpu in names, gpu
    assert 20 <= len(later) <= 25
    formats = " ".join(c["format"] for c in later)
    for form in ("nvidia-smi -q", "nvidia-smi -a", "deviceQuery", "--query-gpu", "rocm-smi", "bitsandbytes",
                 "prose", "issue form", "bullet", "ultralytics", "collect_env (XPU"):
        assert form in formats, form
    assert {c.get("vendor") for c in later} >= {"nvidia", "amd", "apple", "none"}
    assert any("host_memory_mib" in c for c in later) and sum(bool(c.get("read_in_round4")) for c in later) >= 8
    assert all(c.get("read_in_round4") is None or "prose" in c["format"] for c in later)


def round_cases(low: int, high: int | None, marker: str, sizes: tuple[int, int] = (20, 25)) -> tuple[list, str]:
    """One round's cases (numbered low to high - 1; high None: to the end), each carrying its round's marker, and
    their formats as one text."""
    numbered = [(int(c["file"].split("-")[0]), c) for c in CASES]
    later = [c for n, c in numbered if low <= n and (high is None or n < high)]
    assert sizes[0] <= len(later) <= sizes[1] and all(c.get(marker) for c in later)
    return later, " ".join(c["format"] for c in later)


def capabilities(cases: list) -> set:
    return {x for c in cases for x in c.get("compute_capability", [])}


def test_round_five_covers_descriptions_in_words_and_refusals():
    """Round 5 (cases 107 on): machines described in words (issue titles and bodies, maintainers' answers, a PR's
    `Tested on`, a rented pod), hand-written key/value lines (bold values, Chinese keys, keys without colons), texts
    that name a GPU beside the machine that is not it (a paper's, a comparison's), and texts naming two machines,
    which a careful reader cannot take as one (`expect_error`)."""
    later, formats = round_cases(107, 132, "round5")
    for form in ("prose", "bullet", "title", "Tested on", "not the machine", "pod"):
        assert form in formats, form
    assert 3 <= sum(bool(c.get("expect_error")) for c in later) <= 4
    assert 3 <= sum(not c["format"].startswith("prose") for c in later) <= 5
    assert capabilities(later) >= {"7.0", "8.0", "8.6", "8.9", "9.0", "12.0"}


def test_round_six_covers_cloud_and_cluster_specs():
    """Round 6 (cases 132 on): how cloud and cluster tools describe the GPU machine a job runs on: SkyPilot and
    dstack task YAML, a Modal app, gcloud and Terraform accelerator flags, Slurm `--gres`, Kubernetes pod specs and
    node labels, RunPod's CLI, an EC2 instance type alone. A spec that allows several machines (a memory range,
    `count: 1..`, two nodes' labels) names none: a refusal (`expect_error`); one that names no GPU the tool can
    know without a provider's table is left unread on purpose (`unread`)."""
    later, formats = round_cases(132, 151, "round6", sizes=(18, 25))
    for form in ("SkyPilot", "dstack", "Modal", "gcloud", "Terraform", "Slurm", "Kubernetes", "RunPod",
                 "instance type"):
        assert form in formats, form
    assert 3 <= sum(bool(c.get("expect_error")) for c in later) <= 5
    assert {c.get("vendor") for c in later} >= {"nvidia", "amd"}
    assert capabilities(later) >= {"3.7", "7.5", "8.0", "8.6", "8.9"}


def test_round_seven_covers_what_people_paste_when_they_ask_which_gpu():
    """Round 7 (cases 151 on): the machine inside bug reports and questions of the QLoRA tools: issue forms'
    `Number GPUs used` answers, Kaggle/Colab notes (`2 T4`, `T4x2`, `GPU  T4`), laptop GPUs (`Laptop GPU`, `Max-Q`),
    WSL2 `nvidia-smi` and `-a`, a `docker run --gpus all` beside the GPU in words, Chinese counts (`八卡`), a
    full-width `GPU：A800 * 8`, an Intel XPU laptop's log, and texts that show two machines (refused)."""
    later, formats = round_cases(151, 174, "round7")
    for form in ("issue form", "prose", "nvidia-smi -a", "WSL2", "bullet", "Chinese", "--gpus all", "unsloth",
                 "two machines"):
        assert form in formats, form
    names = " ".join(" ".join(c.get("gpus", [])) for c in later)
    for gpu in ("Laptop GPU", "Max-Q", "RTX 4090 D"):
        assert gpu in names, gpu
    assert 2 <= sum(bool(c.get("expect_error")) for c in later) <= 4
    assert {c.get("vendor") for c in later} >= {"nvidia", "none"}
    assert capabilities(later) >= {"5.0", "7.5", "8.0", "8.6", "8.9", "12.0"}


def test_round_eight_covers_containers_notebooks_and_home_rigs():
    """Round 8 (cases 174 on): NGC container banners and `docker info` (no GPU facts: refused),
    `nvidia-container-cli info`, Colab/Kaggle notebook output, `torch.cuda.mem_get_info()` beside collect_env,
    CUDA.jl's device line, deviceQuery cut after device 0, consumer multi-GPU rig reports (2x RTX 3090 with NVLink,
    a mixed RTX 5090 + 3090 Ti rig read as two products), an eGPU beside a laptop's GPU (refused), a PR's Markdown
    `Tested on` table, and non-NVIDIA machines described the same ways (LACT, ComfyUI on ROCm, Apple gpuinfo,
    xpu-smi, torch.xpu's device properties)."""
    later, formats = round_cases(174, 196, "round8")
    for form in ("NGC container banner", "nvidia-container-cli", "docker info", "Colab", "Kaggle", "mem_get_info",
                 "deviceQuery", "rig report", "mixed", "eGPU", "Markdown table", "lact", "xpu-smi", "gpuinfo"):
        assert form in formats, form
    assert 3 <= sum(bool(c.get("expect_error")) for c in later) <= 5
    assert {c.get("vendor") for c in later if not c.get("expect_error")} >= {"nvidia", "amd", "apple", "none"}
    assert capabilities(later) >= {"7.0", "7.5", "8.0", "8.6", "8.9", "12.0"}


def test_round_nine_covers_other_languages_and_forum_prose():
    """Round 9 (cases 196 on): machines described by users in Chinese (`4090*4（24G）`, `8张Tesla P4(8G)`,
    `两张3090`, `CUDA版本12.8`), Korean (`RTX 2080 4대 1대당 8기가`), Russian (`RTX 2060 Super 8G`) and forum-style
    English (`24 gig of vram`, `24GB vram (nvidia 3090)`, `8 gb rtx 4060 and 32gb ram`); texts naming several
    machines or a card still to buy are refused (`expect_error`), and forms left unread on purpose are refused by
    name (`unread`)."""
    later, formats = round_cases(196, 221, "round9")
    for form in ("Chinese", "Korean", "Russian", "forum-style English"):
        assert form in formats, form
    assert 4 <= sum(bool(c.get("expect_error")) for c in later) <= 7
    assert sum(bool(c.get("unread")) for c in later) <= 6
    assert capabilities(later) >= {"6.1", "7.5", "8.6", "8.9", "12.0"}


def test_round_ten_covers_diagnostic_tool_outputs():
    """Round 10 (cases 221 on): diagnostic tools' outputs as pasted in threads: gpustat, `nvidia-smi topo -m`,
    `nvidia-smi -q -x` (XML), `--query-gpu` CSV without its header, ds_report, `nvcc --version` beside nvidia-smi's
    header, bitsandbytes' old `CUDA SETUP` report, llamafactory-cli env (`GPU number`), vLLM's collect_env on ROCm,
    DIGITS' device_query.py, `gpu_burn -l`, the first `accelerate env`, gpustack's GPU JSON; texts naming several
    products or no GPU are refused (`expect_error`)."""
    later, formats = round_cases(221, 244, "round10")
    for form in ("gpustat", "topo -m", "-q -x", "csv,noheader", "ds_report", "nvcc --version", "bitsandbytes",
                 "llamafactory-cli env", "vllm collect-env", "device_query.py", "gpu_burn", "accelerate env",
                 "gpustack"):
        assert form in formats, form
    assert 3 <= sum(bool(c.get("expect_error")) for c in later) <= 5
    assert {c.get("vendor") for c in later if not c.get("expect_error")} >= {"nvidia", "amd", "none"}
    assert capabilities(later) >= {"3.5", "6.0", "7.5", "8.9", "9.0"}


def test_round_eleven_covers_common_gpus_described_briefly():
    """Round 11 (cases 244 on): the short descriptions of common GPUs that users write when they ask for help: issue
    titles (`RTX 4060TI 16G`, `4*2080ti 22g`, `H20 96G显存`), one-line `GPU:` fields (`GPU：2080Ti`, `GPU: RTX 5090
    (sm_120)`), bullets with a count in the key (`- 1 GPU: RTX 4090 (24GB)`), bold bullets and an Environment
    Markdown table (RTX PRO 6000 Blackwell, `**Video Memory**: 96GB`), Tested-on notes (Jetson AGX Orin, DGX Spark
    GB10), Colab/Kaggle T4s, an instance type beside its GPU (`A10G (g5.4xlarge)`), AMD and Apple machines in words;
    texts naming several products or machines are refused (`expect_error`)."""
    later, formats = round_cases(244, 267, "round11")
    for form in ("title", "short GPU line", "bullet", "bold bullets", "Markdown table", "Tested On", "prose",
                 "Chinese", "instance type", "two products", "two machines"):
        assert form in formats, form
    assert 2 <= sum(bool(c.get("expect_error")) for c in later) <= 4
    assert {c.get("vendor") for c in later if not c.get("expect_error")} >= {"nvidia", "amd", "apple"}
    assert capabilities(later) >= {"7.5", "8.0", "8.6", "8.7", "8.9", "9.0", "12.0", "12.1"}


def test_round_twelve_covers_common_gpus_in_new_forms():
    """Round 12 (cases 267 on): common GPUs (RTX 3050-5090, laptop parts, A100, H100, L40S, T4, V100S) as 2025-2026
    threads paste them, in forms not yet covered: ComfyUI's system info, NVIDIA Warp's banner, ollama's Windows log
    beside a skipped Radeon iGPU, torch's sm_120 warning, diffusers-cli env, a vLLM collect_env cut inside its GPU
    list, a dorado device list, Russian and Chinese system lines, `docker run --gpus all` beside a `gpu:` line; a text
    naming two machines is refused (`expect_error`)."""
    later, formats = round_cases(267, 290, "round12")
    for form in ("ComfyUI", "Warp", "ollama", "torch's warning", "diffusers-cli env", "collect_env", "Russian",
                 "Chinese", "docker run", "nvidia-smi", "unsloth", "two machines"):
        assert form in formats, form
    names = " ".join(" ".join(c.get("gpus", [])) for c in later)
    for gpu in ("Laptop GPU", "RTX 3060", "RTX 5090", "A100 80GB PCIe", "L40S", "Tesla T4", "V100S"):
        assert gpu in names, gpu
    assert 1 <= sum(bool(c.get("expect_error")) for c in later) <= 3
    assert {c.get("vendor") for c in later if not c.get("expect_error")} >= {"nvidia", "amd"}
    assert capabilities(later) >= {"7.0", "7.5", "8.0", "8.6", "8.9", "12.0"}


def test_round_thirteen_covers_common_gpus_named_by_cloud_and_system_tools():
    """Round 13 (cases 290 on): common fine-tuning GPUs (RTX 3090, 5060 Ti, 5090, A100, H100, L4, L40S, V100, A10G)
    as 2025-2026 threads name them: an instance type alone (SageMaker's `ml.g5.2xlarge`, read from
    knowledge/data/cloud_instances.toml) or with its spec list, `lspci -nnk`, Windows' `Get-PnpDevice`, a vLLM
    `<summary>` line over a collect_env cut before its GPUs, issue-form answers after em dashes, a glued
    `nvidia5090 * 4`, Chinese `双 16G V100`, Colab in words, a PowerShell prompt; two products are refused."""
    later, formats = round_cases(290, None, "round13", sizes=(18, 25))
    for form in ("instance type", "lspci", "Get-PnpDevice", "<summary>", "collect_env", "issue form", "Chinese",
                 "prose", "PowerShell"):
        assert form in formats, form
    assert 1 <= sum(bool(c.get("expect_error")) for c in later) <= 3
    assert capabilities(later) >= {"7.0", "8.0", "8.6", "8.9", "9.0", "12.0"}
    case145 = next(c for c in CASES if c["file"].startswith("145-"))
    assert not case145.get("unread") and case145.get("read_in_round13")


@pytest.mark.parametrize("text, gpus, count", [
    ('"current_instance_type": "ml.g5.2xlarge"', "NVIDIA A10G", 1),
    ('instance_type = "g4dn.12xlarge"', "Tesla T4", 4),
    ("on a2-highgpu-2g", "NVIDIA A100-SXM4-40GB", 2),
    ("VM size Standard_NC24ads_A100_v4", "NVIDIA A100 80GB PCIe", 1),
    ("p4d.24xlarge", "NVIDIA A100-SXM4-40GB", 8),
])
def test_round_thirteen_an_instance_type_alone_names_its_gpus(tmp_path, text, gpus, count):
    from qlora_doctor.sources.machine import load_described_machine

    path = tmp_path / "machine.txt"
    path.write_text(text + "\n")
    machine = load_described_machine(path)
    assert [g.name for g in machine.gpus] == [gpus] * count
    assert all(g.compute_capability and g.memory_total_mib for g in machine.gpus)
    assert any("read from the instance type" in n for n in machine.notes)


def test_round_thirteen_two_instance_types_are_refused(tmp_path):
    from qlora_doctor.core.errors import InputError
    from qlora_doctor.sources.machine import load_described_machine

    path = tmp_path / "machine.txt"
    path.write_text("works on g5.2xlarge, OOM on g4dn.xlarge\n")
    with pytest.raises(InputError) as err:
        load_described_machine(path)
    assert "names several instance types (g5.2xlarge, g4dn.xlarge)" in str(err.value)


def test_every_cloud_instance_row_has_a_source_and_a_known_gpu():
    from qlora_doctor.knowledge.loading import load_tables
    from qlora_doctor.knowledge.loading import load_cloud_instances

    table, tables = load_cloud_instances(), load_tables()
    assert len(table) >= 60
    for name, (gpu, count, source) in table.items():
        assert source.startswith("https://") and 1 <= count <= 16, name
        assert tables.gpu_model_for(gpu) is not None, (name, gpu)


@pytest.mark.parametrize("text, gpus, extra", [
    ("01:00.0 VGA compatible controller [0300]: NVIDIA Corporation GA102 [GeForce RTX 3090] [10de:2204] (rev a1)\n"
     "01:00.1 Audio device [0403]: NVIDIA Corporation GA102 High Definition Audio Controller [10de:1aef] (rev a1)\n"
     "41:00.0 3D controller: NVIDIA Corporation GA100 [A100 PCIe 80GB] (rev a1)",
     [("GeForce RTX 3090", "8.6"), ("A100 PCIe 80GB", "8.0")], {}),  # lspci: audio functions are no GPUs
    ("FriendlyName                         InstanceId\n"
     "NVIDIA GeForce RTX 4090              PCI\\VEN_10DE&DEV_2684&SUBSYS_16F310DE&REV_A1\\4&1A2B",
     [("NVIDIA GeForce RTX 4090", "8.9")], {"os": "windows"}),  # Get-PnpDevice
    ("<summary>vllm==0.9.1, python==3.10,8xA100 80GB</summary>\nCollecting environment information...\n"
     "PyTorch version: 2.7.0+cu126\nIs CUDA available: True\nPython version: 3.10.12", [("A100", "8.0")] * 8,
     {"python": "3.10.12"}),  # a collect_env cut before its GPUs: the summary's words
    ("ubuntu 22.04.4\nnvidia5090 * 4", [("RTX 5090", "12.0")] * 4, {"os": "linux"}),
    ("[Bug]: 双 16G V100 运行失败", [("V100", "7.0")] * 2, {}),
    ("Ubuntu 24.02\n4 H200 GPU", [("H200", "9.0")] * 4, {}),
    ("PS C:\\Users\\me> python -c ...\nyou have an NVIDIA RTX 5090", [("RTX 5090", "12.0")], {"os": "windows"}),
])
def test_round_thirteen_forms_are_read(tmp_path, text, gpus, extra):
    from qlora_doctor.sources.machine import load_described_machine

    path = tmp_path / "machine.txt"
    path.write_text(text + "\n")
    machine = load_described_machine(path)
    assert [(g.name, g.compute_capability) for g in machine.gpus] == gpus
    for key, value in extra.items():
        assert getattr(machine, key) == value, key


def test_round_thirteen_sizes_beside_the_words():
    """`40 GB VRAM` (the size before the word) is the GPU's; an instance spec list's `Memory:` beside `vCPUs:` the
    host's."""
    from qlora_doctor.sources.envreport import host_memory_mib, prose_facts

    found = prose_facts("the Colab A100 runtime. It has 80 GB system RAM and 40 GB  VRAM.")
    assert found["gpus"][0]["memory_total_mib"] == 40960 and found["host_memory_mib"] == 81920
    assert host_memory_mib("vCPUs: 4\nMemory: 16 GiB\nGPU Memory: 24 GiB") == 16384
    assert host_memory_mib("Memory: 16 GiB") is None  # alone, whose memory it is is not said


@pytest.mark.parametrize("text, gpus, driver, cuda, python", [
    ("## Devices\n\n- **Name:** cuda:0 NVIDIA GeForce RTX 3060 : cudaMallocAsync\n  - **Type:** cuda\n"
     "  - **VRAM Total:** 12884246528\n- **OS:** nt\n- **Python Version:** 3.13.6 (tags/v3.13.6:4e66535)",
     [("NVIDIA GeForce RTX 3060", "8.6", 12287)], None, None, "3.13.6"),  # ComfyUI: bytes, `nt` is Windows
    ('Warp 1.10.0 initialized:\n   CUDA Toolkit 12.8, Driver 13.0\n   Devices:\n     "cpu"      : "x86_64"\n'
     '     "cuda:0"   : "NVIDIA GeForce RTX 5090" (32 GiB, sm_120, mempool enabled)',
     [("NVIDIA GeForce RTX 5090", "12.0", 32768)], None, "13.0", None),
    ("UserWarning:\nNVIDIA GeForce RTX 5070 Ti Laptop GPU with CUDA capability sm_120 is not compatible with the "
     "current PyTorch installation.", [("NVIDIA GeForce RTX 5070 Ti Laptop GPU", "12.0", None)], None, None, None),
    ("killed on my HPC\n[info] Using CUDA devices:\n[info] cuda:0 - NVIDIA L40S\n[info] cuda:1 - NVIDIA L40S",
     [("NVIDIA L40S", "8.9", 46068)] * 2, None, None, None),
    ("Platform: Linux-6.5.0-1022-azure-x86_64-with-glibc2.35\nPython version: 3.10.12\n"
     "Accelerator: NVIDIA A100 80GB PCIe, 81920 MiB\nNVIDIA A100 80GB PCIe, 81920 MiB",
     [("NVIDIA A100 80GB PCIe", "8.0", 81920)] * 2, None, None, "3.10.12"),  # diffusers-cli env, dashes lost
    ("- GPU: NVIDIA NVIDIA RTX4070 (laptop)\n- Driver: 595.84", [("NVIDIA RTX 4070 Laptop GPU", "8.9", None)],
     "595.84", None, None),  # a laptop part: no desktop size guessed
    ("- **GPU:** GeForce RTX 5090\n- **NVIDIA Driver:** Studio 595.79 (Mar 10, 2026)",
     [("GeForce RTX 5090", "12.0", 32607)], "595.79", None, None),  # the size from the tables
    ("- GPU: NVIDIA RTX A1000 Laptop GPU\n- NVIDIA driver version: 582.08\n- CUDA version (from nvidia-smi): 13.0",
     [("NVIDIA RTX A1000 Laptop GPU", "8.6", None)], "582.08", "13.0", None),
    ("Видеокарта: NVIDIA GeForce RTX 3050 (6 ГБ VRAM)\n\nДрайвер NVIDIA: 591.86\n\nPython: 3.12.7",
     [("RTX 3050", "8.6", 6144)], "591.86", None, "3.12.7"),  # cuda.toml's RTX 3050 row
    ("操作系统 Ubuntu 22.04\n内存 512G\n显卡 NVIDIA GeForce RTX 4090-24G*8", [("RTX 4090", "8.9", 24576)] * 8,
     None, None, None),
])
def test_round_twelve_forms_are_read(tmp_path, text, gpus, driver, cuda, python):
    from qlora_doctor.sources.machine import load_described_machine

    path = tmp_path / "machine.txt"
    path.write_text(text + "\n")
    machine = load_described_machine(path)
    assert [(g.name, g.compute_capability, g.memory_total_mib) for g in machine.gpus] == gpus
    if driver:
        assert machine.driver_version == driver
    if cuda:
        assert machine.cuda_driver_version == cuda
    if python:
        assert machine.python == python


def test_round_twelve_host_memory_and_amd_words(tmp_path):
    """`内存 512G` is the host's memory (显存 the GPU's); `amd 7800xt` a Radeon RX card (no CUDA GPU)."""
    from qlora_doctor.sources.machine import load_described_machine

    path = tmp_path / "machine.txt"
    path.write_text("操作系统 Ubuntu 22.04\n内存 512G\n显卡 NVIDIA GeForce RTX 4090-24G*8\n")
    assert load_described_machine(path).host_memory_mib == 524288
    path.write_text("Windows 11\n\n**GPU model(s) and accelerator backend:**\n\namd 7800xt 16gb\n")
    machine = load_described_machine(path)
    assert machine.gpu_vendor == "amd" and machine.os == "windows" and not machine.nvidia_gpus


@pytest.mark.parametrize("text, gpus, driver, cuda, python", [
    # a GeForce `Ti`/`SUPER` is another product (another memory size): kept in the name, no table size guessed
    ("single RTX 3060 Ti", [("RTX 3060 Ti", "8.6", None)], None, None, None),
    ("CUDA Out of memory RTX 4060TI 16G", [("RTX 4060 Ti", "8.9", 16384)], None, None, None),
    ("RTX 4070 SUPER 12GB", [("RTX 4070 SUPER", "8.9", 12288)], None, None, None),
    ("GPU：2080Ti", [("RTX 2080 Ti", "7.5", None)], None, None, None),  # a `GPU:` field's bare number
    ("4*2080ti 22g deploy fail", [("RTX 2080 Ti", "7.5", 22528)] * 4, None, None, None),  # a modded card's size
    ("H20 96G显存 lora微调", [("H20", "9.0", 98304)], None, None, None),  # cuda.toml's H20 row
    ("在4张H20上微调\nDriver Version: 550.144.03     CUDA Version: 12.4    GPU H20   Torch Version: 2.5.1",
     [("H20", "9.0", None)] * 4, "550.144.03", "12.4", None),
    ("- 1 GPU: RTX 4090 (24GB)\n- OS: Ubuntu 22.04 / WSL2", [("RTX 4090", "8.9", 23040)], None, None, None),
    ("* **Product Name**: NVIDIA RTX PRO 6000 Blackwell Server Edition\n* **Video Memory**: 96GB GDDR7",
     [("RTX PRO 6000", "12.0", 98304)], None, None, None),
    ("| **Hardware** | 2× NVIDIA RTX PRO 6000 Blackwell Workstation Edition (96 GB each), TP=2 |\n"
     "| **Driver** | 595.71.05 (open kernel module) |\n| **CUDA** | 13.0 (toolkit & runtime) |\n"
     "| **Python** | 3.12.3 |", [("RTX PRO 6000", "12.0", 98304)] * 2, "595.71.05", None, "3.12.3"),
])
def test_round_eleven_forms_are_read(tmp_path, text, gpus, driver, cuda, python):
    from qlora_doctor.sources.machine import load_described_machine

    path = tmp_path / "machine.txt"
    path.write_text(text + "\n")
    machine = load_described_machine(path)
    assert [(g.name, g.compute_capability, g.memory_total_mib) for g in machine.gpus] == gpus
    assert (machine.driver_version, machine.cuda_driver_version) == (driver, cuda)
    if python:
        assert machine.python == python


@pytest.mark.parametrize("text, gpus, vendor", [
    # hand-written YAML with the keys a user guesses: `count` beside `gpu`, a count glued to a name, one name mapped
    # to a count, an AMD name
    ('gpu: "RTX 4090"\nvram: 24GB\ncount: 2\ncuda: 12.4', [("RTX 4090", "8.9", 24576)] * 2, "nvidia"),
    ("gpus: 2x A100-80G\ndriver: '550.54.15'", [("A100-80G", "8.0", None)] * 2, "nvidia"),
    ("gpu: t4x2", [("t4", "7.5", 15360)] * 2, "nvidia"),
    ("gpu: {H100: 8}", [("H100", "9.0", None)] * 8, "nvidia"),
    ("gpu: MI300X\ncount: 8", [("MI300X", None, None)] * 8, "amd"),
])
def test_round_eleven_hand_written_keys_are_read(tmp_path, text, gpus, vendor):
    from qlora_doctor.sources.machine import load_described_machine

    path = tmp_path / "machine.yaml"
    path.write_text(text + "\n")
    machine = load_described_machine(path)
    assert [(g.name, g.compute_capability, g.memory_total_mib) for g in machine.gpus] == gpus
    assert machine.gpu_vendor == vendor


@pytest.mark.parametrize("text", ["- GPUs: 2\n- OS: Ubuntu 22.04", "- GPUs: 2x NVIDIA A100\n- OS: Ubuntu"])
def test_round_eleven_a_plural_gpus_key_is_not_a_name(tmp_path, text):
    """`- GPUs: 2` is a count without a GPU (not a GPU named "2"); only a count in the key (`- 1 GPU:`) is read."""
    from qlora_doctor.core.errors import InputError
    from qlora_doctor.sources.machine import load_described_machine

    path = tmp_path / "machine.txt"
    path.write_text(text + "\n")
    with pytest.raises(InputError):
        load_described_machine(path)


def test_round_eleven_a_spec_of_alternatives_is_refused_by_name(tmp_path):
    """`gpu: {L4: 1, A10G: 1}` (a cloud spec's alternatives) names no one machine."""
    from qlora_doctor.core.errors import InputError
    from qlora_doctor.sources.machine import load_described_machine

    path = tmp_path / "machine.yaml"
    path.write_text("gpu: {L4: 1, A10G: 1}\n")
    with pytest.raises(InputError) as err:
        load_described_machine(path)
    assert "names several GPUs (A10G, L4)" in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize("text, gpus, driver, cuda, python", [
    ("- GPU type: NVIDIA GeForce RTX 4090\n- GPU number: 2\n- Python version: 3.12.9",
     [("NVIDIA GeForce RTX 4090", "8.9")] * 2, None, None, "3.12.9"),  # llamafactory-cli env's count
    ("Ubuntu 22.04.5 LTS\nTesla T4 显卡*6", [("T4", "7.5")] * 6, None, None, None),
    ("<nvidia_smi_log>\n<driver_version>430.64</driver_version>\n<cuda_version>10.1</cuda_version>\n"
     "<gpu id=\"00000000:29:00.0\">\n<product_name>GeForce GTX 1660 Ti</product_name>",
     [("GeForce GTX 1660 Ti", "7.5")], "430.64", "10.1", None),  # nvidia-smi -q -x
    ("GPU 0: Quadro K620 (UUID: GPU-56622fc6-a9b3-5594-4c6d-b0b231be656a)\npython version：3.8.16",
     [("Quadro K620", "5.0")], None, None, "3.8.16"),  # cuda.toml's row (NVIDIA's legacy GPUs page)
    ("box  Mon Aug 22 15:23:57 2022  515.65.01\n[0] Tesla P100-PCIE-16GB | 27'C,   0 % |   103 / 16384 MB |\n"
     "[1] Tesla P100-PCIE-16GB | 28'C,   2 % |   103 / 16384 MB |", [("Tesla P100-PCIE-16GB", "6.0")] * 2,
     "515.65.01", None, None),  # gpustat
    ("$ nvidia-smi --query-gpu=memory.total,driver_version,name --format=csv,noheader,nounits\n"
     "7979, 440.64, GeForce RTX 2080\n", [("GeForce RTX 2080", "7.5")], "440.64", None, None),  # the command's fields
    ("`nvidia-smi --query-gpu=name,pci.device_id --format=csv,noheader`:\n```\nNVIDIA H100 NVL, 0x232110DE\n```\n"
     "`PCI\\VEN_10DE&DEV_2321` -> vendor `10de`, device `2321`.", [("NVIDIA H100 NVL", "9.0")], None, None, None),
])
def test_round_ten_forms_are_read(tmp_path, text, gpus, driver, cuda, python):
    from qlora_doctor.sources.machine import load_described_machine

    path = tmp_path / "machine.txt"
    path.write_text(text + "\n")
    machine = load_described_machine(path)
    assert [(g.name, g.compute_capability) for g in machine.gpus] == gpus
    assert (machine.driver_version, machine.cuda_driver_version) == (driver, cuda)
    if python:
        assert machine.python == python


@pytest.mark.parametrize("text, gpus", [
    ("使用4090*4（24G）微调", [("RTX 4090", "8.9", 24576)] * 4),
    ("Ubuntu 20.04.6 LTS 8张Tesla P4(8G)显卡", [("Tesla P4", "6.1", 8192)] * 8),
    ("两张3090但是显存爆满", [("RTX 3090", "8.6", 24576)] * 2),  # the size from the tables (one variant)
    ("현재 GeForce RTX 2080 4대 1대당 8기가 정도 되는데", [("RTX 2080", "7.5", 8192)] * 4),
    ("I have 24GB vram (nvidia 3090) and 32gb system ram.", [("RTX 3090", "8.6", 24576)]),
])
def test_round_nine_forms_are_read(tmp_path, text, gpus):
    from qlora_doctor.sources.machine import load_described_machine

    path = tmp_path / "machine.txt"
    path.write_text(text + "\n")
    machine = load_described_machine(path)
    assert [(g.name, g.compute_capability, g.memory_total_mib) for g in machine.gpus] == gpus


@pytest.mark.parametrize("text", [
    "单机5张3090卡微调内存不足，但单机单卡a6000可以微调",  # round 9
    "我准备买3060 12g，现在是cpu在跑。我是5080 16G（笔记本）",
    "NVIDIA RTX 4090 / 24GB cannot run normally. Do I have to use NVIDIA V100 / 40GB to run it?",  # round 11
    "We have tested the training speed with A100 and H100 (single GPU for test)",
])
def test_texts_naming_several_products_are_refused(tmp_path, text):
    from qlora_doctor.core.errors import InputError
    from qlora_doctor.sources.machine import load_described_machine

    path = tmp_path / "machine.txt"
    path.write_text(text + "\n")
    with pytest.raises(InputError) as err:
        load_described_machine(path)
    assert "names several GPUs" in str(err.value)


# --- scoring the corpus through the real CLI ------------------------------------------------------------------------

def _cli(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "qlora-doctor"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=120)


def score_corpus(first: int = 1) -> dict[str, Any]:
    """Cases numbered `first` on (36: round 2's, 60: round 3's)."""
    cases: dict[str, Any] = {}
    for case in [c for c in CASES if int(c["file"].split("-")[0]) >= first]:
        path = CORPUS / case["file"]
        check = _cli("check", "--machine", str(path), "--json")
        lock = _cli("lock", "--machine", str(path))
        output = check.stdout + check.stderr + lock.stderr
        try:
            machine = json.loads(check.stdout)["machine"] if check.returncode in (0, 1) else None
        except (json.JSONDecodeError, KeyError):
            machine = None
        try:
            torch = _torch_pin(path)
        except Exception as err:  # noqa: BLE001 - scored, not raised
            torch, output = None, output + f"\nTraceback (most recent call last): read_report: {err!r}"
        scored = score(case, machine, check.returncode, output, torch)
        message = (check.stderr.strip().splitlines() or [""])[-1][:300] if check.returncode == 2 else None
        cases[case["file"]] = {
            "format": case["format"], "check_exit": check.returncode, "lock_exit": lock.returncode,
            "traceback": scored["traceback"], "error_message": message,
            "ok": not scored["traceback"] and all(v == "right" for v in scored["facts"].values()),
            "facts": scored["facts"],
            "read_as": machine and [n for n in machine["notes"] if n.startswith("read as")],
        }
    facts = [v for c in cases.values() for v in c["facts"].values()]
    summary = {
        "cases": len(cases), "cases_all_right": sum(c["ok"] for c in cases.values()),
        "facts": len(facts), "facts_right": sum(v == "right" for v in facts),
        "facts_wrong": sum(isinstance(v, dict) and "wrong" in v for v in facts),
        "facts_missing": sum(isinstance(v, dict) and "missing" in v for v in facts),
        "tracebacks": sum(c["traceback"] for c in cases.values()),
        "check_exit_codes": _counts(c["check_exit"] for c in cases.values()),
        "lock_exit_codes": _counts(c["lock_exit"] for c in cases.values()),
        "how": "tests/test_machine_corpus.py: `qlora-doctor check --machine FILE --json` and `lock --machine FILE` per "
               "case; torch from envreport.read_report (what `check -r FILE` reads); facts per index.toml",
    }
    return {"summary": summary, "cases": cases}


def _counts(values) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[str(v)] = out.get(str(v), 0) + 1
    return dict(sorted(out.items()))


if __name__ == "__main__":  # python tests/test_machine_corpus.py OUT.json [FIRST_CASE_NUMBER]
    result = score_corpus(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
    Path(sys.argv[1]).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["summary"], indent=1))


# --- prose: what it reads and what it refuses ----------------------------------------------------------------------

@pytest.mark.parametrize("text, gpus, extra", [
    ("1x NVIDIA H100 80GB SXM, driver 550.54.15, CUDA 12.4, Ubuntu 22.04, Python 3.10", [("H100", "9.0", 81920)],
     {"driver_version": "550.54.15", "cuda_driver_version": "12.4", "os": "linux", "python": "3.10"}),
    ("GPU: NVIDIA GeForce RTX 4090, Driver: 550.120, CUDA: 12.4", [("RTX 4090", "8.9", 24564)],
     {"driver_version": "550.120"}),
    ("2x RTX 4090 (24GB each), driver 560.35.03", [("RTX 4090", "8.9", 24576)] * 2, {}),
    ("Kaggle T4x2", [("T4", "7.5", 15360)] * 2, {"os": "linux"}),
    ("rtx3090 24GB on Windows 11, 64GB RAM", [("RTX 3090", "8.6", 24576)], {"os": "windows",
                                                                             "host_memory_mib": 65536}),
    ("eight A100-80GB", [("A100", "8.0", 81920)] * 8, {}),
    ("I have two 48GB A6000 GPUs. The original paper talks about 8 A100 GPUs.", [("RTX A6000", "8.6", 49152)] * 2,
     {}),
    ("Can't finetune with a 4090. The 4090 has 24GB of vram", [("RTX 4090", "8.9", 24576)], {}),
    ("on a nvidia-a100 GPU cluster with 100G IB. On a single node with 8 gpus", [("A100", "8.0", None)] * 8, {}),
    ("only a Nvidia a100 memory=80", [("A100", "8.0", 81920)], {}),
    ("NVIDIA L40, slow: about the same as a 3060", [("L40", "8.9", 46080)], {}),
    ("RTX 4090 八卡，python 3.10", [("RTX 4090", "8.9", 24564)] * 8, {"python": "3.10"}),
    ("My GPU is RTX3060, NVIDIA Driver is 535.86, and CUDA version is 12.2.", [("RTX 3060", "8.6", 12288)],
     {"driver_version": "535.86", "cuda_driver_version": "12.2"}),
    ("OOM on A100. OS: Ubuntu 22.04.2, Python Version: 3.10.12", [("A100", "8.0", None)],
     {"python": "3.10.12", "os": "linux"}),
    ("a laptop with an RTX 3060 6GB", [("RTX 3060", "8.6", 6144)], {}),
])
def test_a_machine_described_in_words_is_read_with_notes(tmp_path, text, gpus, extra):
    from qlora_doctor.sources.machine import load_described_machine

    path = tmp_path / "machine.txt"
    path.write_text(text + "\n")
    machine = load_described_machine(path)
    assert [(g.name, g.compute_capability, g.memory_total_mib) for g in machine.gpus] == gpus
    for key, value in extra.items():
        assert getattr(machine, key) == value, key
    assert any(n.startswith("read from words") for n in machine.notes)
    assert "read as a description in words: check the facts above" in machine.notes


@pytest.mark.parametrize("text, message", [
    ("tested on T4 and A100", "names several GPUs (A100, T4)"),
    ("the run took 4090 seconds on port 8080", "not a machine description"),
    ("hello world", "not a machine description"),
    ("the run took the 4090 steps on my 2080 MB budget", "not a machine description"),
    ("8xH100 server training time higher than 8xA100 server", "names several GPUs (A100, H100)"),
])
def test_words_that_are_not_one_machine_are_refused_by_name(tmp_path, text, message):
    from qlora_doctor.core.errors import InputError
    from qlora_doctor.sources.machine import load_described_machine

    path = tmp_path / "machine.txt"
    path.write_text(text + "\n")
    with pytest.raises(InputError) as err:
        load_described_machine(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_a_yaml_mapping_is_read_as_keys_not_as_words(tmp_path):
    """`gpu: NVIDIA L4` in a .yaml file is the documented format (its keys), not prose."""
    from qlora_doctor.sources.machine import load_described_machine

    path = tmp_path / "m.yaml"
    path.write_text("gpu: NVIDIA L4\ndriver_version: '550.54.15'\nhost_memory_mib: 65536\n")
    machine = load_described_machine(path)
    assert machine.gpus[0].name == "NVIDIA L4" and machine.host_memory_mib == 65536
    assert not any(n.startswith("read from words") for n in machine.notes)
