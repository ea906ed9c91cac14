"""Every rule of the shipped knowledge base fires on its example and stays quiet on its clear case."""

from __future__ import annotations

import re

import pytest

from qlora_doctor.knowledge.explain import explain_text
from qlora_doctor.core.environment import canonical_name
from qlora_doctor.knowledge.loading import load_rules, load_tables
from qlora_doctor.knowledge.evaluate import evaluate_rule

from helpers import machine, env

RULES = load_rules()
WHEN_RULES = [r for r in RULES if r.when is not None]
TEXT_RULES = [r for r in RULES if r.errors or r.patterns]


def _example_env(example: dict):
    pins = {canonical_name(k): v for k, v in (example.get("packages") or {}).items()}
    return machine(**(example.get("machine") or {})), env(**pins)


def test_knowledge_base_is_large_enough_and_sourced():
    assert len(RULES) >= 40, f"only {len(RULES)} rules"
    for rule in RULES:
        assert rule.sources and all(s.startswith("https://") or s.startswith("http://") for s in rule.sources)
        assert rule.fix.strip() and rule.cause.strip()


@pytest.mark.parametrize("rule", WHEN_RULES, ids=[r.id for r in WHEN_RULES])
def test_rule_fires_on_its_example(rule):
    m, e = _example_env(rule.examples["fires"])
    result = evaluate_rule(rule, m, e)
    assert result.outcome == "fires", (rule.id, result)


@pytest.mark.parametrize("rule", WHEN_RULES, ids=[r.id for r in WHEN_RULES])
def test_rule_is_clear_on_its_counter_example(rule):
    m, e = _example_env(rule.examples["clear"])
    result = evaluate_rule(rule, m, e)
    assert result.outcome == "clear", (rule.id, result)


@pytest.mark.parametrize("rule", TEXT_RULES, ids=[r.id for r in TEXT_RULES])
def test_explain_recognises_the_rule_log(rule):
    """Each rule's example log makes explain answer with that rule first. Where rules share a text, the
    example carries what decides between them (a version, a GPU, the driver's CUDA, the failing phase)."""
    matches = explain_text(rule.examples["log"]).matches
    assert [m.id for m in matches][:1] == [rule.id], (rule.id, [(m.id, round(m.score, 2)) for m in matches])


def test_explain_ignores_unrelated_text():
    assert explain_text("Epoch 1/3: loss 1.234\nsaving checkpoint-500\nall good").matches == ()


def test_tables_load_with_sources():
    tables = load_tables()
    for rows in (tables.driver_min, tables.torch_archs, tables.torch_default_cuda, tables.bnb_cuda,
                 tables.gpu_models):
        assert rows, "every table has rows"
        for row in rows:
            assert row.sources, row


@pytest.mark.parametrize("extra, message", [
    ('workaround = "cudnn_attention_off"', None),
    ('workaround = "reboot"', "workaround: expected one of ['cudnn_attention_off']"),
    ('workaround = "cudnn_attention_off"\nworkaround_scope = { attn_mask = true, key_length_modulo = 128, '
     'key_length_remainders = [64] }', None),
    ('workaround = "cudnn_attention_off"\nworkaround_scope = { attn_mask = true, key_length_modulo = 128, '
     'key_length_remainders = [128] }', "key_length_remainders a non-empty list of integers in [0, modulo)"),
    ('workaround = "cudnn_attention_off"\nworkaround_scope = { key_length_modulo = 128 }',
     "workaround_scope: expected a table with exactly"),
    ('workaround_scope = { attn_mask = true, key_length_modulo = 128, key_length_remainders = [64] }',
     'workaround_scope: only with workaround = "cudnn_attention_off"'),
])
def test_a_rules_workaround_names_one_the_trainer_knows(tmp_path, extra, message):
    from qlora_doctor.knowledge.loading import KnowledgeError

    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "x.toml").write_text(f"""
[[rule]]
id = "x-rule"
title = "t"
severity = "warn"
cause = "c"
fix = "f"
sources = ["https://github.com/pytorch/pytorch/issues/196678"]
{extra}
[rule.when]
packages = {{ torch = ">=2.11" }}
[rule.examples.fires]
packages = {{ torch = "2.11.0" }}
[rule.examples.clear]
packages = {{ torch = "2.10.0" }}
""")
    if message is None:
        [rule] = load_rules(tmp_path)
        assert rule.workaround == "cudnn_attention_off"
        assert (rule.workaround_scope is None) == ("workaround_scope" not in extra)
    else:
        with pytest.raises(KnowledgeError, match=re.escape(message)):
            load_rules(tmp_path)


@pytest.mark.parametrize("table, message", [
    ('phase = "loading"\nrequires = ["from_pretrained"]', None),
    ('phase = "warmup"', "explain.phase: expected loading or training"),
    ('facts = { driver_cuda = "<12" }', "explain: unknown key 'facts'"),
    ('driver_cuda = "eleven"', "explain.driver_cuda: invalid specifier"),
    ('excludes = ["(unclosed"]', "explain.excludes: '(unclosed'"),
])
def test_a_rules_explain_table_is_validated(tmp_path, table, message):
    from qlora_doctor.knowledge.loading import KnowledgeError

    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "x.toml").write_text(f"""
[[rule]]
id = "x-rule"
title = "t"
severity = "fail"
cause = "c"
fix = "f"
sources = ["https://github.com/hiyouga/LlamaFactory/issues/257"]
patterns = ['CUDA out of memory']

[rule.explain]
{table}

[rule.examples]
log = "CUDA out of memory"
""")
    if message is None:
        [rule] = load_rules(tmp_path)
        assert rule.explain.phase == "loading" and rule.explain.requires[0].search("X.FROM_PRETRAINED(")
    else:
        with pytest.raises(KnowledgeError, match=re.escape(message)):
            load_rules(tmp_path)
