"""The student's text format, shared by transform (what the teacher is asked to write), train
(what the student learns), evaluate (how its answer is read back) and distill.

A training example is (instruction, input, rationale, output). The student sees the task
instruction as the system message and the input as the user message, and learns to answer
`rationale` + "\\nAnswer: " + `output` (or just `output` when there is no rationale).

With rationales as a second task (`training_chats(..., rationale="multitask")`, distilling
step-by-step, Hsieh et al. 2023), an example with a rationale teaches two answers: the bare
`output` to the plain prompt, and `rationale` + "\\nAnswer: " + `output` to the prompt with
`EXPLAIN` appended. The student then answers the plain prompt directly, as evaluation asks it
to (the label ranked by log-likelihood right after the prompt), and has still learned the
teacher's reasoning.
"""

from __future__ import annotations

import re
import string

from rebase_ray.text import normalize

ANSWER_PREFIX = "Answer:"
_ANSWER_LINE = re.compile(r"(?im)^\s*(?:final\s+)?answer\s*:\s*")
_TARGET_ANSWER_LINE = re.compile(rf"(?m)^{ANSWER_PREFIX}")
_ANSWER_IS = re.compile(
    r"(?i)\b(?:so\s+)?the\s+(?:final\s+|correct\s+|right\s+)?answer\s+is\s*:?\s*")
_FENCE = re.compile(r"```[a-zA-Z0-9_+-]*\n?(.*?)```", re.DOTALL)


def student_messages(instruction: str, input_text: str) -> list[dict[str, str]]:
    """The chat the student sees (no answer): system = task instruction, user = input."""
    return [{"role": "system", "content": instruction}, {"role": "user", "content": input_text}]


EXPLAIN = "Explain your reasoning step by step, then give the answer."


def training_chats(instruction: str, input_text: str, output: str, rationale: str | None,
                   mode: str = "multitask") -> list[tuple[list[dict[str, str]], str]]:
    """The (chat, target) pairs one example teaches: `inline` — one pair, the rationale before
    the answer; `multitask` — the plain chat → the output, and, when there is a rationale,
    the chat with `EXPLAIN` → rationale + answer."""
    if mode == "inline" or not (rationale or "").strip():
        return [(student_messages(instruction, input_text), student_target(output, rationale))]
    return [(student_messages(instruction, input_text), student_target(output)),
            (student_messages(instruction, f"{input_text}\n\n{EXPLAIN}"),
             student_target(output, rationale))]


def student_target(output: str, rationale: str | None = None) -> str:
    """What the student learns to write after the chat: rationale, then the final answer."""
    rationale = (rationale or "").strip()
    if not rationale:
        return output.strip()
    return f"{rationale}\n{ANSWER_PREFIX} {output.strip()}"


def split_answer(text: str) -> tuple[str, str]:
    """(rationale, final answer) from a model's text.

    Recognises, last occurrence first: a line starting with "Answer:" / "Final answer:", then
    "... so the (final / correct) answer is X". Text with neither marker is all answer and no
    rationale.
    """
    text = (text or "").strip()
    lines = list(_ANSWER_LINE.finditer(text))
    if lines:
        m = lines[-1]
        return text[: m.start()].strip(), _clean(text[m.end():])
    spans = list(_ANSWER_IS.finditer(text))
    if spans:
        m = spans[-1]
        answer = text[m.end():].strip().split("\n", 1)[0]
        return text[: m.start()].strip(), _clean(answer)
    return "", _clean(text)


# ----------------------------------------------------------------------------- labels
# how a label answer is read (the evaluation's gen_flexible, and checked_rationale)

# a choice letter at the start of an answer: "(B)", "B.", "B)" or "B:" followed by nothing or
# by whitespace (and the choice's text), or the letter alone
_CHOICE = re.compile(r"^(?:\(([a-z])\)|([a-z])[.):]|([a-z])$)(?:\s|$)", re.IGNORECASE)


def normalize_label(text: str) -> str:
    """Lower case, whitespace collapsed, surrounding punctuation removed."""
    text = " ".join((text or "").lower().split())
    return text.strip(string.punctuation + " ")


def _is_letter(label: str) -> bool:
    return len(label) == 1 and label.isalpha()


def named_label(answer: str, labels: list[str]) -> str | None:
    """The one label (as written in `labels`) that an answer names, else None."""
    norm = {normalize_label(label): label for label in labels}
    text = normalize_label(answer)
    if text in norm:
        return norm[text]
    choice = _CHOICE.match((answer or "").strip())
    letter = next(g for g in choice.groups() if g).lower() if choice else None
    if letter in norm:
        return norm[letter]
    named = [label for n, label in norm.items()
             if not _is_letter(n) and re.search(rf"\b{re.escape(n)}\b", text)]
    return named[0] if len(named) == 1 else None


def flexible_score(answer: str, gold: str, labels: list[str]) -> float:
    """1.0 when the answer names the gold label (`named_label`)."""
    named = named_label(answer, labels)
    return float(named is not None and normalize_label(named) == normalize_label(gold))


def checked_rationale(reply: str, gold: str, labels: list[str] | None) -> tuple[str, str]:
    """(rationale, final answer) of a teacher's annotation of an example whose answer is
    `gold`; the rationale is "" when the reply has none or its answer disagrees with `gold`.

    A reply without an answer marker that puts the answer on its first line and the reasoning
    after it ("C\n\nExplanation: ...") counts, the first line as the answer. Label answers
    agree as the evaluation's gen_flexible scores them (`flexible_score`: the one label named,
    a choice letter); other answers after text normalisation."""
    rationale, answer = split_answer(reply)
    if not rationale and "\n" in answer:
        answer, rationale = (part.strip() for part in answer.split("\n", 1))
    agrees = (flexible_score(answer, gold, labels) == 1.0 if labels
              else normalize(answer) == normalize(gold))
    return (rationale if agrees else ""), answer


def final_answer(text: str) -> str:
    return split_answer(text)[1]


def strict_answer(text: str) -> str:
    """The final answer in exactly the format the student learns (`student_target`): the text
    after the last line that starts with "Answer:", else the whole text; only surrounding
    whitespace removed (no quotes, periods or other markers)."""
    text = text or ""
    ends = [m.end() for m in _TARGET_ANSWER_LINE.finditer(text)]
    return (text[ends[-1]:] if ends else text).strip()


def _clean(answer: str) -> str:
    answer = answer.strip()
    fenced = _FENCE.search(answer)
    if fenced:
        return fenced.group(1).strip()
    if "\n" not in answer:
        answer = answer.strip().strip("\"'`*").rstrip(".").strip()
    return answer


def extract_code(text: str) -> str:
    """The code in a model's answer: the first fenced block, else the text itself."""
    fenced = _FENCE.search(text or "")
    return (fenced.group(1) if fenced else (text or "")).strip()
