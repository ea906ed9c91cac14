"""Recipe sanity rules (`data/recipe_rules.toml`): loading, and a small expression language for their
conditions, parsed and evaluated here (never with eval()).

    rules = load_recipe_rules()
    values = {"training.learning_rate": 0.05, "lora_scaling": 2.0, ...}   # recipe key paths and facts
    verdict = rules[0].evaluate(values)       # True: fires, False: clear, None: a fact it needs is unknown

Grammar (lowest precedence first):

    expr       := and_expr ('or' and_expr)*
    and_expr   := not_expr ('and' not_expr)*
    not_expr   := 'not' not_expr | comparison
    comparison := sum (('==' | '!=' | '<' | '<=' | '>' | '>=' | 'is' | 'is not') sum)?
    sum        := product (('+' | '-') product)*
    product    := unary (('*' | '/') unary)*
    unary      := '-' unary | atom
    atom       := NUMBER | 'STRING' | "STRING" | true | false | None | NAME('.'NAME)* | '(' expr ')'

A name missing from the values, or given as UNKNOWN, is unknown; unknown spreads through arithmetic and
comparisons, `false and unknown` is false and `true or unknown` is true (three-valued logic). `None` is a
value (an unset recipe key): `x is None` tests it, and an ordering comparison or arithmetic with None is
unknown.
"""

from __future__ import annotations

import functools
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DATA_FILE = Path(__file__).parent / "data" / "recipe_rules.toml"
SEVERITIES = ("fail", "warn")
UNSET = "<unset>"
"""In `fires`/`clear`/`example_base`: the recipe key is unset (None)."""


class _Unknown:
    """A fact that could not be read."""

    _instance: _Unknown | None = None

    def __new__(cls) -> _Unknown:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNKNOWN"

    def __bool__(self) -> bool:
        raise TypeError("UNKNOWN has no truth value; use three-valued logic")


UNKNOWN = _Unknown()


class ConditionError(ValueError):
    """A condition that does not parse."""


# --- parsing ----------------------------------------------------------------------------------------

_TOKEN = re.compile(r"""\s*(?:
    (?P<number>\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?)
  | (?P<string>'[^']*'|"[^"]*")
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)
  | (?P<op>==|!=|<=|>=|<|>|\+|-|\*|/|\(|\))
)""", re.VERBOSE)
_KEYWORDS = {"and", "or", "not", "is", "true", "false", "True", "False", "None"}


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None or match.end() == pos:
            raise ConditionError(f"cannot read {text[pos:pos + 20]!r} at column {pos + 1} of {text!r}")
        kind = match.lastgroup or ""
        value = match.group(kind)
        if kind == "name" and value in _KEYWORDS:
            kind = "kw"
        out.append((kind, value))
        pos = match.end()
    return out


@dataclass(frozen=True)
class Node:
    """A parsed expression: `op` with its arguments (`const` holds a value, `name` a key path or fact)."""

    op: str
    args: tuple[Any, ...]


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokens(text)
        self.pos = 0

    def peek(self, *values: str) -> bool:
        return self.pos < len(self.tokens) and self.tokens[self.pos][1] in values

    def take(self) -> tuple[str, str]:
        if self.pos >= len(self.tokens):
            raise ConditionError(f"{self.text!r} ends too early")
        token = self.tokens[self.pos]
        self.pos += 1
        return token

    def parse(self) -> Node:
        node = self.expr()
        if self.pos != len(self.tokens):
            raise ConditionError(f"unexpected {self.tokens[self.pos][1]!r} in {self.text!r}")
        return node

    def expr(self) -> Node:
        node = self.and_expr()
        while self.peek("or"):
            self.take()
            node = Node("or", (node, self.and_expr()))
        return node

    def and_expr(self) -> Node:
        node = self.not_expr()
        while self.peek("and"):
            self.take()
            node = Node("and", (node, self.not_expr()))
        return node

    def not_expr(self) -> Node:
        if self.peek("not"):
            self.take()
            return Node("not", (self.not_expr(),))
        return self.comparison()

    def comparison(self) -> Node:
        left = self.sum()
        if self.peek("==", "!=", "<", "<=", ">", ">="):
            op = self.take()[1]
            return Node(op, (left, self.sum()))
        if self.peek("is"):
            self.take()
            op = "is"
            if self.peek("not"):
                self.take()
                op = "is not"
            return Node(op, (left, self.sum()))
        return left

    def sum(self) -> Node:
        node = self.product()
        while self.peek("+", "-"):
            op = self.take()[1]
            node = Node(op, (node, self.product()))
        return node

    def product(self) -> Node:
        node = self.unary()
        while self.peek("*", "/"):
            op = self.take()[1]
            node = Node(op, (node, self.unary()))
        return node

    def unary(self) -> Node:
        if self.peek("-"):
            self.take()
            return Node("neg", (self.unary(),))
        return self.atom()

    def atom(self) -> Node:
        kind, value = self.take()
        if kind == "number":
            return Node("const", (float(value) if any(c in value for c in ".eE") else int(value),))
        if kind == "string":
            return Node("const", (value[1:-1],))
        if kind == "kw" and value in ("true", "True"):
            return Node("const", (True,))
        if kind == "kw" and value in ("false", "False"):
            return Node("const", (False,))
        if kind == "kw" and value == "None":
            return Node("const", (None,))
        if kind == "name":
            return Node("name", (value,))
        if value == "(":
            node = self.expr()
            if self.take()[1] != ")":
                raise ConditionError(f"missing ')' in {self.text!r}")
            return node
        raise ConditionError(f"unexpected {value!r} in {self.text!r}")


@functools.lru_cache(maxsize=256)
def parse_condition(text: str) -> Node:
    """The condition as a tree; ConditionError when it does not parse."""
    return _Parser(text).parse()


def condition_names(node: Node) -> set[str]:
    """Every key path and fact a condition reads."""
    if node.op == "name":
        return {node.args[0]}
    if node.op == "const":
        return set()
    return set().union(*(condition_names(a) for a in node.args))


# --- evaluation -------------------------------------------------------------------------------------

def evaluate(condition: str | Node, values: Mapping[str, Any]) -> Any:
    """The condition's value over `values` (key paths and facts): True/False for a condition, a number for
    an arithmetic expression, UNKNOWN where a name it needs is missing or unknown."""
    node = parse_condition(condition) if isinstance(condition, str) else condition
    return _eval(node, values)


def _truth(value: Any) -> Any:
    return UNKNOWN if value is UNKNOWN else bool(value)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _eval(node: Node, values: Mapping[str, Any]) -> Any:
    op, args = node.op, node.args
    if op == "const":
        return args[0]
    if op == "name":
        return values.get(args[0], UNKNOWN)
    if op == "and":
        left = _truth(_eval(args[0], values))
        if left is False:
            return False
        right = _truth(_eval(args[1], values))
        if right is False:
            return False
        return UNKNOWN if UNKNOWN in (left, right) else True
    if op == "or":
        left = _truth(_eval(args[0], values))
        if left is True:
            return True
        right = _truth(_eval(args[1], values))
        if right is True:
            return True
        return UNKNOWN if UNKNOWN in (left, right) else False
    if op == "not":
        value = _truth(_eval(args[0], values))
        return UNKNOWN if value is UNKNOWN else not value
    if op == "neg":
        value = _eval(args[0], values)
        return -value if _number(value) else UNKNOWN
    left, right = _eval(args[0], values), _eval(args[1], values)
    if left is UNKNOWN or right is UNKNOWN:
        return UNKNOWN
    if op == "is":
        return left is right if None in (left, right) else left == right
    if op == "is not":
        return left is not right if None in (left, right) else left != right
    if op == "==":
        return left == right
    if op == "!=":
        return left != right
    if op in ("+", "-", "*", "/"):
        if not (_number(left) and _number(right)):
            return UNKNOWN
        if op == "/":
            return UNKNOWN if right == 0 else left / right
        return left + right if op == "+" else left - right if op == "-" else left * right
    # ordering: numbers with numbers, strings with strings; anything else (None) is unknown
    if not (_number(left) and _number(right) or isinstance(left, str) and isinstance(right, str)):
        return UNKNOWN
    return {"<": left < right, "<=": left <= right, ">": left > right, ">=": left >= right}[op]


# --- rules --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RecipeRule:
    """One `[[rule]]` of recipe_rules.toml."""

    id: str
    title: str
    severity: str
    """`warn`, or `fail` only where the run cannot work."""
    keys: tuple[str, ...]
    """The recipe keys that decide it (the first is the one to change), shown with their values."""
    condition: str
    cause: str
    fix: str
    sources: tuple[str, ...]
    evidence: str
    fires: Mapping[str, Any]
    clear: Mapping[str, Any]
    errors: tuple[str, ...] = ()

    @property
    def names(self) -> set[str]:
        return condition_names(parse_condition(self.condition))

    def evaluate(self, values: Mapping[str, Any]) -> bool | None:
        """True: fires; False: clear; None: a fact it needs is unknown."""
        result = _truth(evaluate(self.condition, values))
        return None if result is UNKNOWN else result


@dataclass(frozen=True)
class RecipeRules:
    rules: tuple[RecipeRule, ...]
    facts: Mapping[str, str]
    """Fact name -> what it is."""
    example_base: Mapping[str, Any]
    """The values `fires`/`clear` overlay."""

    def example(self, rule: RecipeRule, which: str) -> dict[str, Any]:
        overlay = rule.fires if which == "fires" else rule.clear
        return {**self.example_base, **overlay}


def _unset(mapping: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (None if v == UNSET else v) for k, v in mapping.items()}


@functools.lru_cache(maxsize=4)
def load_recipe_rules(path: Path = DATA_FILE) -> RecipeRules:
    """Load and validate the recipe rules; every problem at once as one ValueError."""
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    facts = dict(data.get("facts", {}))
    base = _unset(data.get("example_base", {}))
    problems: list[str] = []
    rules: list[RecipeRule] = []
    seen: set[str] = set()
    required = ("id", "title", "severity", "keys", "condition", "cause", "fix", "sources", "fires", "clear")
    for index, raw in enumerate(data.get("rule", [])):
        where = f"{path.name} rule {raw.get('id', index)}"
        missing = [k for k in required if k not in raw]
        if missing:
            problems.append(f"{where}: missing {', '.join(missing)}")
            continue
        if raw["id"] in seen:
            problems.append(f"{where}: duplicate id")
        seen.add(raw["id"])
        if raw["severity"] not in SEVERITIES:
            problems.append(f"{where}: severity must be one of {SEVERITIES}")
        if not raw["sources"]:
            problems.append(f"{where}: needs at least one source")
        try:
            names = condition_names(parse_condition(raw["condition"]))
        except ConditionError as err:
            problems.append(f"{where}: condition: {err}")
            continue
        unknown = sorted(n for n in names if "." not in n and n not in facts)
        if unknown:
            problems.append(f"{where}: condition uses {', '.join(unknown)}, which are not in [facts]")
        rules.append(RecipeRule(
            id=raw["id"], title=raw["title"], severity=raw["severity"], keys=tuple(raw["keys"]),
            condition=raw["condition"], cause=raw["cause"], fix=raw["fix"], sources=tuple(raw["sources"]),
            evidence=raw.get("evidence", ""), fires=_unset(raw["fires"]), clear=_unset(raw["clear"]),
            errors=tuple(raw.get("errors", ()))))
    if problems:
        raise ValueError("; ".join(problems))
    return RecipeRules(rules=tuple(rules), facts=facts, example_base=base)


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool) -> float:
    """peft's LoraLayer scaling: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA."""
    return lora_alpha / (math.sqrt(r) if use_rslora else r)
