"""`explain` on real pastes: error texts copied from public GitHub threads (tests/data/explain_corpus/, each
with its URL, the fix the thread confirmed and the rule that should answer first), plus unrelated pastes
that must match nothing. Prints precision and top-1 recall, and fails below the targets."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from qlora_doctor.knowledge.explain import explain_text
from qlora_doctor.knowledge.loading import load_rules

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CORPUS = Path(__file__).parent / "data" / "explain_corpus"
FILES = ("hardware.toml", "software.toml", "heldout_2026.toml", "heldout_2026b.toml", "heldout_2026c.toml",
         "heldout_2026d.toml", "heldout_2026e.toml", "heldout_2026f.toml", "heldout_2026g.toml",
         "heldout_2026h.toml", "heldout_2026i.toml", "heldout_2026j.toml", "heldout_2026k.toml",
         "heldout_2026l.toml", "heldout_2026m.toml", "heldout_2026n.toml", "heldout_2026o.toml",
         "heldout_2026p.toml", "heldout_2026q.toml", "heldout_2026r.toml", "heldout_2026s.toml",
         "heldout_2026t.toml", "heldout_2026u.toml", "heldout_2026v.toml",
         "heldout_2026w.toml", "heldout_2026x.toml", "heldout_2026y.toml",
         "heldout_2026z.toml", "heldout_2026aa.toml", "heldout_2026ab.toml",
         "heldout_2026ac.toml", "heldout_2026ad.toml", "heldout_2026ae.toml", "heldout_2026af.toml",
         "heldout_2026ag.toml", "heldout_2026ah.toml", "heldout_2026ai.toml", "heldout_2026aj.toml")
"""heldout_2026.toml, heldout_2026b.toml, heldout_2026c.toml, heldout_2026d.toml, heldout_2026e.toml,
heldout_2026f.toml, heldout_2026g.toml, heldout_2026h.toml, heldout_2026i.toml, heldout_2026j.toml,
heldout_2026k.toml, heldout_2026l.toml, heldout_2026m.toml, heldout_2026n.toml, heldout_2026o.toml,
heldout_2026p.toml, heldout_2026q.toml, heldout_2026r.toml, heldout_2026s.toml, heldout_2026t.toml,
heldout_2026u.toml, heldout_2026v.toml, heldout_2026w.toml, heldout_2026x.toml,
heldout_2026y.toml, heldout_2026z.toml, heldout_2026aa.toml, heldout_2026ab.toml, heldout_2026ac.toml,
heldout_2026ad.toml, heldout_2026ae.toml, heldout_2026af.toml, heldout_2026ag.toml, heldout_2026ah.toml,
heldout_2026ai.toml, heldout_2026aj.toml: pastes scored
once before any fix (bench/results/explain_heldout_first_sight.json, bench/results/explain_heldout2_first_sight.json,
bench/results/explain_heldout3_first_sight.json, bench/results/explain_heldout4_first_sight.json,
bench/results/explain_heldout5_first_sight.json, bench/results/explain_heldout6_first_sight.json,
bench/results/explain_heldout7_first_sight.json, bench/results/explain_heldout8_first_sight.json,
bench/results/explain_heldout9_first_sight.json, bench/results/explain_heldout10_first_sight.json,
bench/results/explain_heldout11_first_sight.json,
bench/results/explain_heldout12_first_sight.json,
bench/results/explain_heldout13_first_sight.json,
bench/results/explain_heldout14_first_sight.json,
bench/results/explain_heldout15_first_sight.json,
bench/results/explain_heldout16_first_sight.json,
bench/results/explain_heldout17_first_sight.json,
bench/results/explain_heldout18_first_sight.json,
bench/results/explain_heldout19_first_sight.json,
bench/results/explain_heldout20_first_sight.json,
bench/results/explain_heldout21_first_sight.json,
bench/results/explain_heldout22_first_sight.json,
bench/results/explain_heldout23_first_sight.json,
bench/results/explain_heldout24_first_sight.json,
bench/results/explain_heldout25_first_sight.json,
bench/results/explain_heldout26_first_sight.json,
bench/results/explain_heldout27_first_sight.json,
bench/results/explain_heldout28_first_sight.json,
bench/results/explain_heldout29_first_sight.json,
bench/results/explain_heldout30_first_sight.json,
bench/results/explain_heldout31_first_sight.json,
bench/results/explain_heldout32_first_sight.json,
bench/results/explain_heldout33_first_sight.json,
bench/results/explain_heldout34_first_sight.json,
bench/results/explain_heldout35_first_sight.json,
bench/results/explain_heldout36_first_sight.json).
heldout_2026af.toml (round 32), heldout_2026ag.toml (round 33), heldout_2026ah.toml (round 34) and heldout_2026aj.toml
(round 36) take their pastes from Q&A and forum threads and blog posts instead of GitHub issues."""
FORUM_FILES = ("heldout_2026af.toml", "heldout_2026ag.toml", "heldout_2026ah.toml", "heldout_2026aj.toml")
"""Files whose urls are forum / Q&A / blog pages, not GitHub threads."""
TOP1_TARGET = 0.95
"""Issue #15: >= 95% top-1 on our own corpus."""
PRECISION_TARGET = 1.0
"""Unrelated pastes: no match at all."""


def cases() -> list[dict]:
    found = []
    for name in FILES:
        for case in tomllib.loads((CORPUS / name).read_text(encoding="utf-8"))["case"]:
            found.append({**case, "file": name})
    return found


def expected_id(case: dict) -> str:
    return case["expect"].removeprefix("new:")


def test_the_corpus_is_real_and_large_enough():
    all_cases = cases()
    urls = [c["url"] for c in all_cases]
    assert len(all_cases) >= 150 + 20
    assert all(c["url"].startswith("https://github.com/") for c in all_cases if c["file"] not in FORUM_FILES)
    assert all(c["url"].startswith(("https://", "http://")) for c in all_cases)
    assert len(set(urls)) == len(urls), "one case per thread"
    assert sum(c["expect"] == "none" for c in all_cases) >= 20
    known = {r.id for r in load_rules()}
    missing = sorted({expected_id(c) for c in all_cases if c["expect"] != "none"} - known)
    assert not missing, f"rules the corpus expects but the knowledge base lacks: {missing}"


def score() -> dict:
    right, wrong, hits_on_none = 0, [], []
    for case in cases():
        result = explain_text(case["paste"])
        top = result.best.id if result.best else "none"
        if case["expect"] == "none":
            if result.matches:
                hits_on_none.append((case["url"], top))
            continue
        if top == expected_id(case):
            right += 1
        else:
            wrong.append((case["url"], expected_id(case), top))
    should = sum(c["expect"] != "none" for c in cases())
    unrelated = sum(c["expect"] == "none" for c in cases())
    return {"top1": right / should, "right": right, "should": should, "wrong": wrong,
            "precision_on_unrelated": 1 - len(hits_on_none) / unrelated, "hits_on_none": hits_on_none}


def test_top1_recall_and_precision_meet_the_targets():
    s = score()
    print(f"\nexplain corpus: top-1 {s['right']}/{s['should']} = {s['top1']:.1%}; "
          f"unrelated pastes left unmatched {s['precision_on_unrelated']:.1%}")
    for url, want, got in s["wrong"]:
        print(f"  wrong: {url}: expected {want}, got {got}")
    for url, got in s["hits_on_none"]:
        print(f"  matched an unrelated paste: {url}: {got}")
    assert s["precision_on_unrelated"] >= PRECISION_TARGET
    assert s["top1"] >= TOP1_TARGET


@pytest.mark.parametrize("case", cases(), ids=lambda c: c["url"].removeprefix("https://github.com/"))
def test_one_answer_fits_15_lines_at_100_columns(case):
    """What `qlora-doctor explain` prints for one paste: the best answer in full and the others one line
    each, at most 15 lines, none wider than the terminal."""
    from qlora_doctor.cli.render import render_explanation

    lines = render_explanation(explain_text(case["paste"]), width=100).rstrip("\n").split("\n")
    assert len(lines) <= 15, "\n".join(lines)
    assert max(len(line) for line in lines) <= 100, "\n".join(lines)


def test_explain_json_gives_ranked_matches_with_confidence_and_facts():
    import json

    from click.testing import CliRunner

    from qlora_doctor.cli import cli

    paste = next(c["paste"] for c in cases() if c["url"] == "https://github.com/hiyouga/LlamaFactory/issues/257")
    result = CliRunner().invoke(cli, ["explain", "--json", "-"], input=paste)
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert answer["confidence"] in ("high", "medium", "low")
    ids = [m["id"] for m in answer["matches"]]
    assert ids[:2] == ["oom-while-loading-model", "runtime-cuda-oom"], ids
    scores = [m["score"] for m in answer["matches"]]
    assert scores == sorted(scores, reverse=True)
    assert answer["matches"][0]["evidence"] == ["the failing phase loading fits"]
    assert answer["matches"][1]["contradicted"] is True
    assert answer["facts"]["phase"] == "loading" and answer["facts"]["os"] == "linux"

    result = CliRunner().invoke(cli, ["explain", "--json", "-"], input="Epoch 1/3: loss 1.234\nall good\n")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["matches"] == [] and json.loads(result.stdout)["confidence"] == "none"


@pytest.mark.parametrize("text, fact, value", [
    ("RuntimeError: The NVIDIA driver on your system is too old (found version 11060).", "driver_cuda", "11.6"),
    ("My Driver Version is 470.223.02, cuda version is 11.8", "driver", "470.223.02"),
    ("CUDA SETUP: Highest compute capability among GPUs detected: 8.7", "compute_capabilities", ["8.7"]),
    ("CUDA SETUP: Highest compute capability among GPUs detected: 8.7", "arch", "aarch64"),
    ("CUDA SETUP: PyTorch settings found: CUDA_VERSION=124, Highest Compute Capability: 8.9.", "torch_cuda", "12.4"),
    ("I have an AMD Radeon RX 570\nRuntimeError: Found no NVIDIA driver on your system.", "gpu_vendor", "amd"),
    ("| NVIDIA-SMI 535.104.05   Driver Version: 535.104.05   CUDA Version: 12.2 |", "gpu_vendor", "nvidia"),
    ("see https://github.com/x/y/blob/main/train.py#L216", "gpu_names", []),
    ('  File "/usr/lib/python3.10/site-packages/torch/nn/modules/module.py", line 1329, in convert\n'
     "    return t.to(\ntorch.OutOfMemoryError: CUDA out of memory.\n"
     '  File "/w/train.py", line 109, in <module>\n    trainer.train()', "phase", "loading"),
    ('  File "/w/trainer.py", line 3, in training_step\n    loss.backward()\n'
     "torch.OutOfMemoryError: CUDA out of memory.", "phase", "training"),
])
def test_facts_read_from_a_paste(text, fact, value):
    assert explain_text(text).facts.to_json()[fact] == value


def test_markdown_damage_is_undone_before_matching():
    from qlora_doctor.knowledge.paste import clean_paste

    assert clean_paste("TypeError: Seq2SeqTrainingArguments.init() got an unexpected keyword argument "
                       "\u2018evaluation_strategy\u2019") == (
        "TypeError: Seq2SeqTrainingArguments.__init__() got an unexpected keyword argument 'evaluation_strategy'")
    assert clean_paste("TypeError:Accelerator.init got an unexpected keyword argument 'x'") == (
        "TypeError:Accelerator.__init__() got an unexpected keyword argument 'x'")
