"""A small generator of question/answer mathematics, in the style of DeepMind Mathematics.

The `mathematics-dataset` package does not install next to modern numpy/sympy, so the built-in
corpus generates its own: every document is a run of questions and exact answers from one module
(arithmetic, algebra, numbers, calculus, comparison, measurement, polynomials). Answers are
computed, not templated, so the text is internally consistent and a model can learn from it.
Everything is drawn from one `random.Random`, so a seed gives the same documents everywhere.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction


def _signed(n: int) -> str:
    return f"({n})" if n < 0 else str(n)


def _poly(coeffs: list[int], var: str = "x") -> str:
    """Render c0*x**k + ... as text, highest power first; zero terms are left out."""
    terms: list[str] = []
    k = len(coeffs) - 1
    for i, c in enumerate(coeffs):
        power = k - i
        if c == 0:
            continue
        mag = abs(c)
        if power == 0:
            body = str(mag)
        else:
            body = ("" if mag == 1 else f"{mag}*") + (var if power == 1 else f"{var}**{power}")
        sign = "-" if c < 0 else "+"
        terms.append(("-" + body if c < 0 else body) if not terms else f" {sign} {body}")
    return "".join(terms) or "0"


def add_sub(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(-999, 999), rng.randint(-999, 999)
    if rng.random() < 0.5:
        return f"What is {a} + {_signed(b)}?", str(a + b)
    return f"Calculate {a} - {_signed(b)}.", str(a - b)


def mul_div(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(-99, 99), rng.randint(2, 40)
    if rng.random() < 0.5:
        return f"Multiply {a} and {b}.", str(a * b)
    return f"Divide {a * b} by {b}.", str(a)


def linear_1d(rng: random.Random) -> tuple[str, str]:
    x, a, b = rng.randint(-20, 20), rng.choice([i for i in range(-9, 10) if i]), rng.randint(-50, 50)
    var = rng.choice("abcdhjkmnpqrstuvwxyz")
    return f"Solve {a}*{var} + {_signed(b)} = {a * x + b} for {var}.", str(x)


def linear_2d(rng: random.Random) -> tuple[str, str]:
    x, y = rng.randint(-10, 10), rng.randint(-10, 10)
    while True:
        a, b, c, d = (rng.randint(-6, 6) for _ in range(4))
        if a * d - b * c != 0 and 0 not in (a, b, c, d):
            break
    return (f"Solve {a}*u + {b}*v = {a * x + b * y}, {c}*u + {d}*v = {c * x + d * y} for u.", str(x))


def gcd(rng: random.Random) -> tuple[str, str]:
    g = rng.randint(2, 60)
    a, b = g * rng.randint(2, 40), g * rng.randint(2, 40)
    return f"Calculate the greatest common divisor of {a} and {b}.", str(math.gcd(a, b))


def is_prime(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(2, 20000)
    prime = n > 1 and all(n % p for p in range(2, math.isqrt(n) + 1))
    return f"Is {n} a prime number?", "True" if prime else "False"


def differentiate(rng: random.Random) -> tuple[str, str]:
    degree = rng.randint(2, 4)
    coeffs = [rng.randint(-9, 9) or 1 for _ in range(degree + 1)]
    deriv = [c * (degree - i) for i, c in enumerate(coeffs[:-1])]
    var = rng.choice("xyzgtw")
    return f"Differentiate {_poly(coeffs, var)} with respect to {var}.", _poly(deriv, var)


def evaluate(rng: random.Random) -> tuple[str, str]:
    coeffs = [rng.randint(-6, 6) for _ in range(rng.randint(2, 4))]
    x = rng.randint(-5, 5)
    value = sum(c * x ** (len(coeffs) - 1 - i) for i, c in enumerate(coeffs))
    return f"Let f(x) = {_poly(coeffs)}. What is f({x})?", str(value)


def compare(rng: random.Random) -> tuple[str, str]:
    p = Fraction(rng.randint(-30, 30), rng.randint(2, 15))
    q = round(rng.uniform(-3, 3), rng.randint(1, 3))
    while Fraction(str(q)) == p:
        q += 0.1
    bigger = p if p > Fraction(str(q)) else q
    return f"Which is bigger: {p} or {q}?", str(bigger)


_UNITS = [
    ("kilometers", "meters", 1000),
    ("hours", "minutes", 60),
    ("kilograms", "grams", 1000),
    ("liters", "milliliters", 1000),
    ("days", "hours", 24),
    ("centuries", "years", 100),
]


def convert(rng: random.Random) -> tuple[str, str]:
    big, small, factor = rng.choice(_UNITS)
    amount = Fraction(rng.randint(1, 400), rng.choice([1, 2, 4, 5, 10]))
    shown = f"{float(amount):g}"
    answer = amount * factor
    answer_text = str(answer.numerator) if answer.denominator == 1 else f"{float(answer):g}"
    return f"How many {small} are there in {shown} {big}?", answer_text


def rounding(rng: random.Random) -> tuple[str, str]:
    digits = rng.randint(0, 3)
    value = rng.randint(-(10**6), 10**6) / 10**4
    shown = f"{value:.4f}"
    answer = Decimal(shown).quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP)
    return f"Round {shown} to {digits} decimal places.", str(answer)


MODULES: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "arithmetic__add_sub": add_sub,
    "arithmetic__mul_div": mul_div,
    "algebra__linear_1d": linear_1d,
    "algebra__linear_2d": linear_2d,
    "numbers__gcd": gcd,
    "numbers__is_prime": is_prime,
    "numbers__round": rounding,
    "calculus__differentiate": differentiate,
    "polynomials__evaluate": evaluate,
    "comparison__pair": compare,
    "measurement__conversion": convert,
}


def document(rng: random.Random) -> tuple[str, str]:
    """One document: `(module name, text)` with 8-24 questions and answers from one module."""
    name = rng.choice(sorted(MODULES))
    make = MODULES[name]
    pairs = [make(rng) for _ in range(rng.randint(8, 24))]
    return name, "\n".join(f"Question: {q}\nAnswer: {a}" for q, a in pairs) + "\n"
