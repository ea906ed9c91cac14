import json
from pathlib import Path

import pytest

from qlora_doctor.sources import machine as machine_mod
from qlora_doctor.core.machine import load_machine_file, save_machine_file
from qlora_doctor.sources.machine import (parse_nvidia_smi_csv, parse_nvidia_smi_header, parse_proc_driver_version,
    NVIDIA_SMI_FIELDS_OLD, probe_machine)
from qlora_doctor.core.errors import InputError


def test_parse_nvidia_smi_two_gpus(data_dir):
    gpus, driver = parse_nvidia_smi_csv((data_dir / "nvidia-smi-2xA100.csv").read_text())
    assert driver == "550.54.15"
    assert [g.name for g in gpus] == ["NVIDIA A100-SXM4-80GB"] * 2
    assert gpus[0].compute_capability == "8.0"
    assert gpus[1].memory_free_mib == 1203 and gpus[1].memory_total_mib == 81920


def test_parse_nvidia_smi_old_driver_without_compute_cap(data_dir):
    gpus, driver = parse_nvidia_smi_csv((data_dir / "nvidia-smi-t4-old-driver.csv").read_text(),
                                        NVIDIA_SMI_FIELDS_OLD)
    assert driver == "470.82.01" and gpus[0].compute_capability is None and gpus[0].name == "Tesla T4"


def test_parse_nvidia_smi_not_available_fields(data_dir):
    gpus, _ = parse_nvidia_smi_csv((data_dir / "nvidia-smi-na.csv").read_text())
    assert gpus[0].memory_total_mib is None and gpus[0].compute_capability is None


def test_parse_nvidia_smi_garbage_is_an_error_not_a_gpu(data_dir):
    with pytest.raises(ValueError, match="unexpected nvidia-smi line"):
        parse_nvidia_smi_csv((data_dir / "nvidia-smi-garbage.txt").read_text())


def test_parse_nvidia_smi_header(data_dir):
    assert parse_nvidia_smi_header((data_dir / "nvidia-smi-header.txt").read_text()) == ("580.159.04", "13.0")


@pytest.mark.parametrize("name, expected", [("proc-driver-version.txt", "550.54.15"),
                                            ("proc-driver-version-open.txt", "580.159.04")])
def test_parse_proc_driver_version(data_dir, name, expected):
    assert parse_proc_driver_version((data_dir / name).read_text()) == expected


def test_machine_file_round_trip(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"os": "linux", "arch": "x86_64", "python": "3.11.7", "driver_version": "550.54.15",
                                "gpus": [{"name": "Tesla T4", "compute_capability": "7.5",
                                          "memory_total_mib": 15360}]}))
    m = load_machine_file(path)
    assert m.gpu_vendor == "nvidia" and m.gpus[0].compute_capability == "7.5"
    out = tmp_path / "saved.json"
    save_machine_file(m, out)
    again = load_machine_file(out)
    assert again.gpus == m.gpus and again.driver_version == m.driver_version


def test_machine_file_errors_are_collected_and_named(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"os": "plan9", "arch": "x86_64", "python": "three", "driver_versoin": "1",
                                "gpus": [{"name": "X", "compute_capability": [8, 0]}]}))
    with pytest.raises(InputError) as err:
        load_machine_file(path)
    text = "\n".join(err.value.messages)
    assert f"{path}: os: 'plan9' is not one of" in text
    assert "python: 'three' is not a version" in text
    assert "unknown key 'driver_versoin'" in text
    assert "gpus[0].compute_capability: expected a string like \"8.0\"" in text


def test_machine_file_invalid_json_names_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{\n "os": "linux",\n oops\n}')
    with pytest.raises(InputError, match=r"bad.json:3: not valid JSON"):
        load_machine_file(path)


@pytest.mark.parametrize("name, text, gpus", [
    ("m.yaml", "instance_type: ml.g5.2xlarge\ndriver_version: '535.183.01'\n", ["NVIDIA A10G"]),
    ("m.json", '{"current_instance_type": "ml.g5.12xlarge", "python": "3.10"}', ["NVIDIA A10G"] * 4),
    ("m.yaml", "Machine Type: a2-highgpu-2g\n", ["NVIDIA A100-SXM4-40GB"] * 2),
    ("m.yaml", "vm_size: Standard_NC24ads_A100_v4\ngpus: [NVIDIA A100 80GB PCIe]\n", ["NVIDIA A100 80GB PCIe"]),
])
def test_a_description_naming_a_cloud_instance_type_gets_its_gpus(tmp_path, name, text, gpus):
    from qlora_doctor.sources.machine import load_described_machine

    path = tmp_path / name
    path.write_text(text)
    machine = load_described_machine(path)
    assert [g.name for g in machine.gpus] == gpus
    assert all(g.memory_total_mib for g in machine.gpus)  # the tables know each one's memory
    assert "gpus:" in text or any("read " in n and "x " in n for n in machine.notes)


def test_an_instance_type_in_words_keeps_the_driver_and_os_said_beside_it(tmp_path):
    from qlora_doctor.sources.machine import load_described_machine

    path = tmp_path / "m.txt"
    path.write_text("We fine-tune on a g6.xlarge (Ubuntu 22.04), driver 550.127.05, CUDA 12.4\n")
    machine = load_described_machine(path)
    assert [g.name for g in machine.gpus] == ["NVIDIA L4"]
    assert (machine.driver_version, machine.cuda_driver_version, machine.os) == ("550.127.05", "12.4", "linux")


def test_an_instance_type_the_table_lacks_is_refused_naming_the_key(tmp_path):
    from qlora_doctor.sources.machine import load_described_machine

    path = tmp_path / "m.yaml"
    path.write_text("instance_type: ml.p9.huge\n")
    with pytest.raises(InputError, match=r"m\.yaml: instance_type: 'ml\.p9\.huge' is not a GPU instance type.*gpus:"):
        load_described_machine(path)


def test_a_log_starting_with_a_bracket_is_read_as_text_not_json(tmp_path):
    """A paste whose first character is `[` (`[2025-01-01 12:00:00] [info] ...`, a log's timestamp) is not JSON: read
    as text (round 12's limitation); a real JSON list is still refused as not a description."""
    from qlora_doctor.sources.machine import load_described_machine

    path = tmp_path / "log.txt"
    path.write_text("[2025-01-01 12:00:00.123] [info] Using CUDA devices:\n"
                    "[2025-01-01 12:00:00.123] [info] cuda:0 - NVIDIA GeForce RTX 4090\n")
    machine = load_described_machine(path)
    assert [(g.name, g.compute_capability) for g in machine.gpus] == [("NVIDIA GeForce RTX 4090", "8.9")]
    path.write_text('["Tesla T4"]\n')
    with pytest.raises(InputError, match="expected a JSON object"):
        load_described_machine(path)


def test_env_override_replaces_probe(tmp_path, monkeypatch):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"os": "linux", "arch": "aarch64", "python": "3.12.1", "driver_version": None,
                                "gpus": []}))
    monkeypatch.setenv("QLORA_DOCTOR_MACHINE", str(path))
    m = probe_machine()
    assert m.arch == "aarch64" and m.gpus == () and m.gpu_vendor == "none"


def _fake_nvidia_smi(tmp_path, script: str):
    exe = tmp_path / "nvidia-smi"
    exe.write_text("#!/bin/sh\n" + script)
    exe.chmod(0o755)
    return exe


def test_probe_falls_back_to_nvidia_smi_and_name_table(tmp_path, monkeypatch, data_dir):
    """No NVML library here: the probe must get the GPUs from nvidia-smi (an old one without
    compute_cap), and the compute capability from the GPU table."""
    csv = (data_dir / "nvidia-smi-t4-old-driver.csv").read_text()
    _fake_nvidia_smi(tmp_path, f'case "$1" in --query-gpu=*compute_cap*) echo "Field \\"compute_cap\\" is not a valid field to query." >&2; exit 2;;\n'
                               f'--query-gpu=*) printf "{csv}";;\n*) cat "{data_dir / "nvidia-smi-header.txt"}";; esac\n')
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    monkeypatch.setattr(machine_mod, "PROC_DRIVER_VERSION", tmp_path / "absent")
    m = probe_machine()
    assert m.gpu_vendor == "nvidia"
    assert m.driver_version == "470.82.01"
    assert m.gpus[0].name == "Tesla T4" and m.gpus[0].compute_capability == "7.5"


def test_probe_survives_a_hanging_nvidia_smi(tmp_path, monkeypatch):
    _fake_nvidia_smi(tmp_path, "sleep 60\n")
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    monkeypatch.setattr(machine_mod, "NVIDIA_SMI_TIMEOUT_S", 0.5)
    monkeypatch.setattr(machine_mod, "PROC_DRIVER_VERSION", tmp_path / "absent")
    m = probe_machine()
    assert m.gpus == () and any("no answer within" in n for n in m.notes)


def test_probe_reports_garbage_from_nvidia_smi(tmp_path, monkeypatch, data_dir):
    _fake_nvidia_smi(tmp_path, f'cat "{data_dir / "nvidia-smi-garbage.txt"}"\n')
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    monkeypatch.setattr(machine_mod, "PROC_DRIVER_VERSION", tmp_path / "absent")
    m = probe_machine()
    assert m.gpus == () and any("unexpected nvidia-smi line" in n for n in m.notes)


def test_outputs_captured_on_the_gpu_machine(data_dir):
    """Captured on the device tool's H100 (2026-11-28): the header, /proc and the CSV query agree."""
    header = parse_nvidia_smi_header((data_dir / "nvidia-smi-h100-device.txt").read_text())
    proc = parse_proc_driver_version((data_dir / "proc-driver-version-h100-device.txt").read_text())
    gpus, driver = parse_nvidia_smi_csv((data_dir / "nvidia-smi-h100-device.csv").read_text())
    assert header == ("580.159.04", "13.0") and proc == driver == "580.159.04"
    assert gpus[0].name == "NVIDIA H100 80GB HBM3" and gpus[0].compute_capability == "9.0"
    assert gpus[0].memory_total_mib == 81559


def test_a_description_naming_only_the_gpu_and_driver_is_enough():
    import platform

    from qlora_doctor.core.machine import machine_from_dict

    m = machine_from_dict({"gpus": ["Tesla T4"], "driver_version": "535.104.05"}, "t4.json")
    assert (m.os, m.arch, m.python) == ("linux", "x86_64", platform.python_version())
    assert [g.name for g in m.gpus] == ["Tesla T4"] and m.gpu_vendor == "nvidia"
    assert any("python not given" in n for n in m.notes) and any("os not given" in n for n in m.notes)
    given = machine_from_dict({"os": "linux", "arch": "aarch64", "python": "3.12.3", "gpus": []}, "x.json")
    assert given.notes == () and given.arch == "aarch64"
    with pytest.raises(InputError, match=r"gpus\[0\]: expected a GPU name"):
        machine_from_dict({"gpus": [3]}, "bad.json")


# --- descriptions as people write them ----------------------------------------------------------

def _described(tmp_path, name: str, text: str):
    from qlora_doctor.sources.machine import load_described_machine

    path = tmp_path / name
    path.write_text(text)
    return load_described_machine(path)


def test_common_aliases_and_numbers_are_read_with_a_note(tmp_path):
    m = _described(tmp_path, "m.json", json.dumps({"gpu": "NVIDIA A100-SXM4-80GB", "gpu_count": 2, "driver": 550.54,
                                                   "cuda": "12.4", "python_version": "3.10"}))
    assert [g.name for g in m.gpus] == ["NVIDIA A100-SXM4-80GB"] * 2
    assert m.driver_version == "550.54" and m.cuda_driver_version == "12.4" and m.python == "3.10"
    assert {g.compute_capability for g in m.gpus} == {"8.0"}
    assert "read 'driver' as 'driver_version'" in m.notes
    one = _described(tmp_path, "o.json", json.dumps({"gpus": [{"model": "RTX 4090", "cc": "sm_89", "vram_gb": 24}]}))
    assert one.gpus[0].compute_capability == "8.9" and one.gpus[0].memory_total_mib == 24 * 1024


def test_a_python_version_given_as_a_number_is_refused_with_why(tmp_path):
    with pytest.raises(InputError, match=r"the number 3.10 reads as 3.1"):
        _described(tmp_path, "m.json", '{"gpus": ["Tesla T4"], "python": 3.10}')


def test_a_driver_branch_alone_is_judged_as_its_newest_release(tmp_path):
    # "580" as people say it: runs CUDA 13 (which needs >= 580.65.06); "535" does not.
    from qlora_doctor.knowledge.loading import load_tables, torch_variant_for

    new = _described(tmp_path, "a.json", '{"gpus": ["NVIDIA H100 80GB HBM3"], "driver_version": "580"}')
    old = _described(tmp_path, "b.json", '{"gpus": ["NVIDIA H100 80GB HBM3"], "driver_version": "535"}')
    assert torch_variant_for(new, load_tables()).startswith("cu13")
    assert torch_variant_for(old, load_tables()).startswith("cu12")
    assert any("driver branch only" in n for n in new.notes)


def test_memory_and_the_driver_floor_come_from_the_tables_when_left_out(tmp_path):
    t4 = _described(tmp_path, "t4.yaml", "gpus: [Tesla T4]\ncuda: '12.2'\n")
    assert t4.gpus[0].memory_total_mib == 15360  # what nvidia-smi shows for a 16 GB T4
    assert t4.driver_version == "535.54.03"  # the first driver reporting CUDA 12.2, zeros kept
    a100 = _described(tmp_path, "a.json", '{"gpus": ["A100"], "driver_version": "550.54.15"}')
    assert a100.gpus[0].memory_total_mib is None  # 40 or 80 GB: not guessed
    assert sum("sold with 40 or 80 GB" in n for n in a100.notes) == 1


def test_a_gpu_that_only_comes_on_arm_makes_an_unstated_arch_aarch64(tmp_path):
    """GB10 (DGX Spark), GH200/GB200 (Grace) and Jetson come only with Arm CPUs: a description that names one and
    no arch is judged as aarch64 (cuda.toml host_arch), not as the x86_64 assumed for other GPUs; a stated arch
    stays, and other GPUs keep the x86_64 assumption."""
    spark = _described(tmp_path, "spark.yaml", "gpus: [NVIDIA GB10]\ndriver_version: '580.95.05'\n")
    assert spark.arch == "aarch64"
    assert [n for n in spark.notes if n.startswith("arch not given")] == [
        "arch not given: aarch64, the only host NVIDIA GB10 comes with "
        "(https://www.nvidia.com/en-us/products/workstations/dgx-spark/)"]
    gh200 = _described(tmp_path, "gh.json", '{"gpus": ["NVIDIA GH200 120GB"], "arch": "x86_64"}')
    assert gh200.arch == "x86_64" and not any(n.startswith("arch not given") for n in gh200.notes)
    t4 = _described(tmp_path, "t4.yaml", "gpus: [Tesla T4]\n")
    assert t4.arch == "x86_64" and "arch not given: assumed x86_64" in t4.notes


def test_plain_nvidia_smi_output_is_a_machine_description(tmp_path):
    text = (Path(__file__).parent / "data" / "nvidia-smi-header.txt").read_text()
    m = _described(tmp_path, "smi.txt", text)
    assert m.driver_version == "580.159.04" and m.cuda_driver_version == "13.0"
    assert [(g.name, g.memory_total_mib, g.compute_capability) for g in m.gpus] == [
        ("NVIDIA H100 80GB HBM3", 81559, "9.0")]
    colab = ("+-----------------------------------------------------------------------------+\n"
             "| NVIDIA-SMI 525.85.12    Driver Version: 525.85.12    CUDA Version: 12.0     |\n"
             "|-------------------------------+----------------------+----------------------+\n"
             "| GPU  Name        Persistence-M| Bus-Id        Disp.A | Volatile Uncorr. ECC |\n"
             "|===============================+======================+======================|\n"
             "|   0  Tesla T4            Off  | 00000000:00:04.0 Off |                    0 |\n"
             "| N/A   44C    P8     9W /  70W |      0MiB / 15360MiB |      0%      Default |\n"
             "+-------------------------------+----------------------+----------------------+\n")
    m = _described(tmp_path, "colab.txt", colab)
    assert m.driver_version == "525.85.12" and [(g.name, g.memory_total_mib) for g in m.gpus] == [("Tesla T4", 15360)]


def test_a_gpu_count_that_disagrees_with_the_list_is_an_error(tmp_path):
    with pytest.raises(InputError, match="gpu_count: 3, but gpus lists 2"):
        _described(tmp_path, "m.json", '{"gpus": ["Tesla T4", "Tesla T4"], "gpu_count": 3}')


@pytest.mark.parametrize("name, mib", [
    ("NVIDIA A100-SXM4-40GB", 40960), ("A100 80GB", 81920), ("NVIDIA H100 80GB HBM3", 81559),
    ("NVIDIA H100 NVL", 95830), ("NVIDIA GeForce RTX 4090", 24564), ("NVIDIA L4", 23034), ("NVIDIA A10G", 23028),
    ("Tesla V100-SXM2-32GB", 30720),  # no sourced total: 32 GB less 1/16, erring low
    ("NVIDIA GeForce RTX 3060 Ti", None), ("NVIDIA GeForce RTX 3060 Laptop GPU", None),  # other products
    ("NVIDIA GeForce RTX 4070 Ti SUPER", None), ("Tesla V100", None),  # 16 or 32 GB: not guessed
])
def test_gpu_memory_from_the_name_is_sourced_or_left_unknown(tmp_path, name, mib):
    m = _described(tmp_path, "m.json", json.dumps({"gpus": [name], "driver_version": "550.54.15"}))
    assert m.gpus[0].memory_total_mib == mib, m.notes


def test_every_gpu_memory_row_names_a_known_product_and_its_source():
    from qlora_doctor.knowledge.loading import load_tables

    tables = load_tables()
    assert len(tables.gpu_memory) >= 25
    for row in tables.gpu_memory:
        assert tables.compute_capability_for(row.match), row.match
        assert row.sources and all(s.startswith("https://") for s in row.sources)
        assert 0.9 < row.memory_mib / (row.gb * 1024) <= 1.0, row  # a total near the size sold


def test_the_install_fix_names_the_torch_build_the_described_gpu_needs(tmp_path):
    """Nothing installed, a V100 with driver 535: torch from a CUDA 12 index whose build still ships sm_70 (cu128+
    builds dropped Volta), not the generic 'see pytorch.org'; a CPU box gets the CPU index."""
    from qlora_doctor.doctor.environment import install_training_command
    from qlora_doctor.knowledge.loading import load_tables

    v100 = _described(tmp_path, "v.json", '{"gpus": ["Tesla V100-SXM2-16GB"], "driver_version": "535.183.01"}')
    fix = install_training_command(v100, load_tables(), ["torch", "peft"])
    index = fix.split("--index-url https://download.pytorch.org/whl/")[1].split()[0]
    assert index.startswith("cu12") and int(index[2:]) < 128, fix
    assert fix.startswith("pip install torch==") and "qlora-doctor lock" in fix
    cpu = _described(tmp_path, "c.json", '{"gpus": []}')
    assert "/whl/cpu" in install_training_command(cpu, load_tables(), ["torch"])
    assert install_training_command(cpu, load_tables(), ["peft"]) == "pip install 'qlora-doctor[train]'"


def test_the_install_fix_asks_for_the_driver_of_a_gpu_described_without_one(tmp_path):
    """An A10G described without its driver (`Colab A10G`, a YAML naming only the GPU): the driver decides the CUDA
    build, so the fix asks for it instead of naming the CPU index."""
    from qlora_doctor.doctor.environment import install_training_command
    from qlora_doctor.knowledge.loading import load_tables

    a10g = _described(tmp_path, "a.json", '{"gpus": ["NVIDIA A10G"]}')
    fix = install_training_command(a10g, load_tables(), ["torch"])
    assert "/whl/cpu" not in fix and "NVIDIA driver version" in fix


def test_presets_by_name_or_gpu_and_inline_json_describe_a_machine(tmp_path, monkeypatch):
    from qlora_doctor.sources.machine import load_described_machine, preset_names

    monkeypatch.chdir(tmp_path)  # a preset name is not a file here
    assert {"t4-550", "a100-550", "rtx4090-570", "h100-580", "cpu"} <= set(preset_names())
    for given in ("t4-550", "t4", "T4", "t4-550.json"):
        m = load_described_machine(given)
        assert m.gpus[0].name == "Tesla T4" and m.driver_version == "550.54.15", given
        assert m.source == "preset t4-550"
    assert load_described_machine("RTX 4090").gpus[0].compute_capability == "8.9"
    inline = load_described_machine('{"gpus": ["NVIDIA L4"], "driver_version": "550.54.15"}')
    assert inline.gpus[0].memory_total_mib == 23034 and inline.source == "--machine"
    with pytest.raises(InputError, match="no such machine file.*preset: .*t4-550"):
        load_described_machine("my-box.json")
    with pytest.raises(InputError, match="inline description is not valid JSON"):
        load_described_machine('{"gpus": [Tesla T4]}')


def test_the_presets_ship_in_the_wheel():
    import tomllib

    data = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    assert "**/*.json" in data["tool"]["setuptools"]["package-data"]["qlora_doctor"]


def test_environment_reports_from_issues_describe_the_machine(tmp_path):
    """What issue reports paste: torch's collect_env and `transformers env`."""
    collect_env = ("Collecting environment information...\nPyTorch version: 2.1.0+cu121\n"
                   "OS: Ubuntu 22.04.3 LTS (x86_64)\nLibc version: glibc-2.35\n\n"
                   "Python version: 3.10.12 (main, Nov 20 2023, 15:14:05) [GCC 11.4.0] (64-bit runtime)\n"
                   "Python platform: Linux-5.15.0-1048-aws-x86_64-with-glibc2.35\nIs CUDA available: True\n"
                   "CUDA runtime version: 12.1.105\nGPU models and configuration: \nGPU 0: NVIDIA A10G\n"
                   "GPU 1: NVIDIA A10G\n\nNvidia driver version: 535.104.12\n\n[pip3] torch==2.1.0\n")
    m = _described(tmp_path, "ce.txt", collect_env)
    assert (m.os, m.arch, m.python, m.libc, m.driver_version) == ("linux", "x86_64", "3.10.12", "glibc 2.35",
                                                                  "535.104.12")
    assert [(g.name, g.compute_capability, g.memory_total_mib) for g in m.gpus] == [("NVIDIA A10G", "8.6", 23028)] * 2
    windows = _described(tmp_path, "w.txt", "PyTorch version: 2.3.0+cu121\nOS: Microsoft Windows 11 Pro\n"
                         "Python version: 3.11.9 (tags/v3.11.9) [MSC v.1938 64 bit (AMD64)]\nIs CUDA available: True\n"
                         "GPU models and configuration: GPU 0: NVIDIA GeForce RTX 4090\nNvidia driver version: 552.22\n")
    assert windows.os == "windows" and windows.gpus[0].compute_capability == "8.9"
    hf = _described(tmp_path, "hf.txt", "- `transformers` version: 4.36.2\n"
                    "- Platform: Linux-6.1.58+-x86_64-with-glibc2.35\n- Python version: 3.10.12\n"
                    "- PyTorch version (GPU?): 2.1.0+cu121 (True)\n")
    assert hf.python == "3.10.12" and hf.gpu_vendor == "nvidia" and hf.gpus[0].compute_capability is None
    assert any("environment report" in n for n in hf.notes)


def test_a_suggested_command_names_the_described_machine(tmp_path):
    """A fix that says `qlora-doctor lock` must mean the machine that was judged: the preset, the file, or none
    for this machine."""
    from qlora_doctor.core.machine import machine_from_dict, machine_option
    from qlora_doctor.sources.machine import load_described_machine

    assert machine_option(load_described_machine("t4")) == " --machine t4-550"
    described = tmp_path / "my box.json"
    described.write_text('{"gpus": ["Tesla T4"], "driver_version": "550.54.15"}')
    assert machine_option(load_described_machine(described)) == f" --machine '{described}'"
    assert machine_option(load_described_machine('{"gpus": ["Tesla T4"]}')).startswith(" --machine '")
    assert machine_option(machine_from_dict({"os": "linux", "arch": "x86_64", "python": "3.11"}, "probe")) == ""


# --- hand-written descriptions in the forms people write them --------------------------------------------------------

@pytest.mark.parametrize("data, gpus, extra", [
    ({"GPU": "NVIDIA L4", "Driver Version": "550.54.15"}, [("NVIDIA L4", None)], {"driver_version": "550.54.15"}),
    ({"gpu_name": "NVIDIA GeForce RTX 3090", "vram_gb": 24, "os": "Ubuntu 22.04", "python": "3.10"},
     [("NVIDIA GeForce RTX 3090", 24576)], {"os": "linux", "python": "3.10"}),
    ({"gpus": [{"name": "NVIDIA A10G", "memory": "24 GB"}], "driver": "535.161.08"}, [("NVIDIA A10G", 24576)], {}),
    ({"gpus": [{"name": "NVIDIA A100-SXM4-80GB", "vram": 81920}]}, [("NVIDIA A100-SXM4-80GB", 81920)], {}),
    ({"gpu": {"model": "H100", "count": 2, "memory_gb": "80G"}, "ram_gb": 512, "os": "Windows 11"},
     [("H100", 81920)] * 2, {"host_memory_mib": 524288, "os": "windows"}),
])
def test_hand_written_keys_sizes_and_os_words_are_read_with_notes(data, gpus, extra):
    from qlora_doctor.core.machine import machine_from_dict

    machine = machine_from_dict(data, "m.json")
    assert [(g.name, g.memory_total_mib) for g in machine.gpus] == gpus
    for key, value in extra.items():
        assert getattr(machine, key) == value, key
    if "os" in extra:
        assert any(n.startswith("read os ") for n in machine.notes)


@pytest.mark.parametrize("data, message", [
    ({"gpus": [{"name": "T4", "memory": "lots"}]}, "gpus[0].memory_total_mib: expected a positive whole number"),
    ({"gpus": ["T4"], "os": "BeOS"}, "os: 'BeOS' is not one of linux, windows, darwin"),
    ({"gpus": ["T4"], "ram_gb": "plenty"}, "ram_gb: expected the host's memory in GB"),
])
def test_hand_written_values_that_say_nothing_are_refused_by_key(data, message):
    from qlora_doctor.core.errors import InputError
    from qlora_doctor.core.machine import machine_from_dict

    with pytest.raises(InputError) as err:
        machine_from_dict(data, "m.json")
    assert message in str(err.value)
