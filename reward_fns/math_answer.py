"""Math answer match: 1.0 when the response's final answer equals the ground truth, else 0.0.

Use with `worker.reward.reward_fn_path: reward_fns/math_answer.py`.

The final answer is the content of the last `\\boxed{...}` (or `\\fbox{...}`) in the response; when
there is none, the last number in the response (`fallback_to_last_number=True`, the default).
Two answers match when, after light LaTeX normalisation (`\\left`, `\\text{}`, `\\dfrac`, `$`, spaces,
a trailing period, degree signs, thousands separators ...):

* the strings are equal (case-insensitive), or
* both evaluate to numbers that agree within `rel_tol` (fractions, `\\frac`, `\\sqrt`, `\\pi`, powers,
  percentages, products like `2\\sqrt{3}`; evaluated by a small safe evaluator, never `eval`), or
* both are tuples / lists of the same length whose elements match in order.

No heavy dependencies (no sympy): every check is cheap, so rewards stay fast on large batches.
Metrics: `accuracy` (same as the reward) and `has_answer` (an answer could be extracted).
"""

import ast
import math
import operator
import re
from typing import Any, Dict, List, Optional, Tuple

# ----------------------------------------------------------------------------- extraction

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def last_boxed(text: str) -> Optional[str]:
    """Content of the last `\\boxed{...}` / `\\fbox{...}` (braces balanced), or None."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        # `\boxed 5` (no braces) is valid LaTeX for a single token.
        m = re.match(r"\\(?:boxed|fbox)\s+([^\s$]+)", text[start:])
        return m.group(1) if m else None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
    return None  # unbalanced: the response was cut off inside the box


def last_number(text: str) -> Optional[str]:
    """The last number-looking token (`-3`, `1,000`, `2.5`, `3/4`) in `text`, or None."""
    matches = _NUMBER.findall(text)
    return matches[-1].rstrip(",") if matches else None


def extract_answer(text: str, fallback_to_last_number: bool = True) -> Optional[str]:
    """The final answer of a response: last `\\boxed{}` content, else (optionally) the last number."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    return last_number(text) if fallback_to_last_number else None


# ----------------------------------------------------------------------------- normalisation

_DROP = ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\ ", "\\displaystyle", "$", "^\\circ", "^{\\circ}",
         "\\circ", "°", "\\%", "%")


def normalize(answer: str) -> str:
    """Canonical text form of an answer, for string comparison and as input to `to_number`."""
    s = str(answer).strip()
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox|operatorname)\{([^{}]*)\}", r"\1", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    for token in _DROP:
        s = s.replace(token, "")
    s = re.sub(r"\s+", "", s).rstrip(".").lower()
    s = re.sub(r"([\^_])\{(\w)\}", r"\1\2", s)  # x^{2} == x^2
    s = re.sub(r"^\(([a-e])\)$", r"\1", s)  # multiple choice: "(B)" == "b"
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):  # thousands separators, not a tuple
        s = s.replace(",", "")
    return s


# ----------------------------------------------------------------------------- numeric evaluation

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.Pow: operator.pow}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}
_FUNCTIONS = {"sqrt": math.sqrt}
_CONSTANTS = {"pi": math.pi}  # no "e": it is also a multiple-choice letter


def _latex_to_python(s: str) -> str:
    """`\\frac{a}{b}` -> `(a)/(b)`, `\\sqrt{x}` -> `sqrt(x)`, `^` -> `**`, implicit products made explicit."""
    for _ in range(10):  # innermost first; nesting deeper than 10 is not an answer we can score cheaply
        new = re.sub(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", r"((\1)/(\2))", s)
        new = re.sub(r"\\sqrt\[([^\]]*)\]\{([^{}]*)\}", r"((\2)**(1/(\1)))", new)
        new = re.sub(r"\\sqrt\{([^{}]*)\}", r"sqrt(\1)", new)
        if new == s:
            break
        s = new
    s = re.sub(r"\\frac(\d)(\d)", r"((\1)/(\2))", s)  # \frac12
    s = re.sub(r"\\sqrt(\d+)", r"sqrt(\1)", s)
    s = s.replace("\\pi", "pi").replace("\\cdot", "*").replace("\\times", "*").replace("^", "**")
    s = s.replace("{", "(").replace("}", ")")
    # Implicit multiplication: "2sqrt(3)", "2pi", ")(", "3(".
    s = re.sub(r"(?<=[\d)])(?=[a-z(])", "*", s)
    return s


def _eval_node(node: ast.AST) -> float:
    if isinstance(node, ast.Expression):
        return _eval_node(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return float(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval_node(node.left), _eval_node(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > 64:  # keep "10**10**10" from hanging the reward
            raise ValueError("exponent too large")
        return float(_BINARY[type(node.op)](left, right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval_node(node.operand))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS \
            and len(node.args) == 1 and not node.keywords:
        return _FUNCTIONS[node.func.id](_eval_node(node.args[0]))
    if isinstance(node, ast.Name) and node.id in _CONSTANTS:
        return _CONSTANTS[node.id]
    raise ValueError(f"unsupported expression: {ast.dump(node)[:40]}")


def to_number(answer: str) -> Optional[float]:
    """Numeric value of a normalised answer, or None when it is not a closed-form number."""
    s = normalize(answer)
    if not s or len(s) > 100:
        return None
    try:
        return float(s)
    except ValueError:
        pass
    try:
        value = _eval_node(ast.parse(_latex_to_python(s), mode="eval"))
    except (SyntaxError, ValueError, TypeError, ZeroDivisionError, OverflowError, RecursionError):
        return None
    return value if isinstance(value, float) and math.isfinite(value) else None


def _split_tuple(s: str) -> Optional[List[str]]:
    """Top-level comma-separated parts of `(a, b)`, `[a, b]` or `a, b`; None for a single value."""
    if len(s) >= 2 and s[0] in "([" and s[-1] in ")]":
        s = s[1:-1]
    parts, depth, current = [], 0, ""
    for ch in s:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return parts if len(parts) > 1 else None


def answers_match(prediction: Optional[str], ground_truth: Any, rel_tol: float = 1e-4) -> bool:
    """True when `prediction` and `ground_truth` are the same answer (see the module docstring)."""
    if prediction is None or ground_truth is None:
        return False
    pred, truth = normalize(prediction), normalize(str(ground_truth))
    if not pred or not truth:
        return False
    if pred == truth:
        return True
    a, b = to_number(pred), to_number(truth)
    if a is not None and b is not None:
        return math.isclose(a, b, rel_tol=rel_tol, abs_tol=1e-9)
    pred_parts, truth_parts = _split_tuple(pred), _split_tuple(truth)
    if pred_parts and truth_parts and len(pred_parts) == len(truth_parts):
        return all(answers_match(p, t, rel_tol) for p, t in zip(pred_parts, truth_parts))
    return False


# ----------------------------------------------------------------------------- the reward


def reward_function(data_dict: Dict[str, Any], rel_tol: float = 1e-4,
                    fallback_to_last_number: bool = True) -> Tuple[float, Dict[str, float]]:
    """1.0 if the response's final answer matches `ground_truth`, else 0.0."""
    answer = extract_answer(data_dict["response"], fallback_to_last_number)
    correct = answers_match(answer, data_dict.get("ground_truth", ""), rel_tol)
    score = 1.0 if correct else 0.0
    return score, {"accuracy": score, "has_answer": float(answer is not None)}
