"""The bundled demo task: templated arithmetic questions with a verifiable notion of "better".

A question asks for ``a + b``, ``a - b`` or ``a * b`` on small integers ("What is 17 + 25?").
An answer restates the expression and gives a result ("17 + 25 = 42"). An answer is *correct*
when the last integer it contains equals the true result; chosen/positive answers are correct,
rejected/negative answers are plausible mistakes (off by one or ten, swapped digits, the wrong
operation, a dropped carry). ``score_answer`` is the verifier later experiments use to score
generated answers; ``scripts/make_demo_data.py`` uses the generators below, so the data and the
verifier cannot drift apart.
"""

from __future__ import annotations

import random
import re

OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}

QUESTION_TEMPLATES = (
    "What is {a} {op} {b}?",
    "Compute {a} {op} {b}.",
    "Calculate {a} {op} {b}.",
    "What do you get for {a} {op} {b}?",
)

_EXPRESSION = re.compile(r"(-?\d+)\s*([+\-*])\s*(-?\d+)")
_INTEGER = re.compile(r"-?\d+")


def parse_question(question: str) -> tuple[int, str, int]:
    """Return ``(a, op, b)`` of the first arithmetic expression in ``question``."""
    match = _EXPRESSION.search(question)
    if match is None:
        raise ValueError(f"no arithmetic expression like '17 + 25' in question {question!r}")
    return int(match.group(1)), match.group(2), int(match.group(3))


def correct_result(question: str) -> int:
    """The true result of the question's expression."""
    a, op, b = parse_question(question)
    return OPERATIONS[op](a, b)


def extract_answer(answer: str) -> int | None:
    """The last integer in ``answer`` (the stated result), or None when there is none."""
    numbers = _INTEGER.findall(answer)
    return int(numbers[-1]) if numbers else None


def score_answer(question: str, answer: str) -> float:
    """1.0 when the answer's last integer is the true result of the question, else 0.0."""
    return float(extract_answer(answer) == correct_result(question))


def format_answer(a: int, op: str, b: int, result: int) -> str:
    return f"{a} {op} {b} = {result}"


def sample_question(rng: random.Random) -> tuple[str, int, str, int]:
    """Draw ``(question_text, a, op, b)``; results stay non-negative and below 200."""
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
    else:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        if op == "-" and b > a:
            a, b = b, a
    template = rng.choice(QUESTION_TEMPLATES)
    return template.format(a=a, op=op, b=b), a, op, b


def wrong_result(rng: random.Random, a: int, op: str, b: int) -> int:
    """A plausible wrong result: the kinds of slips people and small models make."""
    right = OPERATIONS[op](a, b)
    candidates = [right + 1, right - 1, right + 10, right - 10]
    if right >= 10 and str(right)[::-1] != str(right):
        candidates.append(int(str(right)[::-1]))  # swapped digits
    if op == "+":
        candidates.append(a - b if a >= b else b - a)  # wrong operation
        candidates.append(right - 10 if (a % 10 + b % 10) >= 10 else right + 10)  # carry slip
    elif op == "-":
        candidates.append(a + b)
    else:
        candidates.extend([a + b, a * (b + 1), (a + 1) * b])
    candidates = sorted({c for c in candidates if c >= 0 and c != right})
    return rng.choice(candidates)
