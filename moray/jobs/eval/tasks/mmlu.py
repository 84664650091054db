"""MMLU, 5-shot, by log-likelihood: lm-eval's `mmlu` group (lm_eval/tasks/mmlu/default/).

Each question is asked after the subject's description and its first 5 dev questions with their
answers; the answer is the letter among " A".." D" with the highest log-likelihood. Accuracy per
subject, its mean over subjects (macro, what lm-eval's group reports when weighting by subject) and
over questions (micro)."""

from __future__ import annotations

import csv
from pathlib import Path

from moray.jobs.eval.requests import Loglikelihood
from moray.jobs.eval.tasks import TaskResult

LETTERS = ("A", "B", "C", "D")


def subjects(data_dir: Path) -> list[str]:
    return sorted(
        p.name.removesuffix("_test.csv") for p in (Path(data_dir) / "mmlu" / "test").glob("*_test.csv")
    )


def read_split(data_dir: Path, subject: str, split: str) -> list[dict]:
    """A subject's questions in lm-eval's fields (question, choices, answer as 0-3)."""
    path = Path(data_dir) / "mmlu" / split / f"{subject}_{split}.csv"
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    docs = []
    for i, row in enumerate(rows):
        if len(row) != 6 or row[5].strip() not in LETTERS:
            raise ValueError(f"{path}, row {i + 1}: expected question, 4 choices and a letter A-D")
        docs.append(
            {
                "subject": subject,
                "question": row[0],
                "choices": row[1:5],
                "answer": LETTERS.index(row[5].strip()),
            }
        )
    return docs


def describe(doc: dict) -> str:
    """lm-eval's doc_to_text."""
    q = doc["question"].strip()
    return f"{q}\nA. {doc['choices'][0]}\nB. {doc['choices'][1]}\nC. {doc['choices'][2]}\nD. {doc['choices'][3]}\nAnswer:"


def prompt(doc: dict, shots: list[dict]) -> str:
    """The description, the shots each answered (target delimiter " ", shots joined by blank lines),
    then the question."""
    head = f"The following are multiple choice questions (with answers) about {doc['subject'].replace('_', ' ')}.\n\n"
    return head + "".join(f"{describe(s)} {LETTERS[s['answer']]}\n\n" for s in shots) + describe(doc)


class MMLU:
    name = "mmlu"
    kind = "loglikelihood"
    files = ("mmlu/dev", "mmlu/test")
    num_fewshot = 5

    def load(self, data_dir: Path, limit: int | None) -> list[dict]:
        """`limit` questions per subject (lm-eval's --limit applies per subtask too)."""
        docs = []
        for subject in subjects(data_dir):
            shots = read_split(data_dir, subject, "dev")[: self.num_fewshot]
            for d in read_split(data_dir, subject, "test")[:limit]:
                docs.append({**d, "shots": shots})
        return docs

    def requests(self, doc: dict) -> list:
        context = prompt(doc, doc["shots"])
        return [Loglikelihood(context, f" {letter}") for letter in LETTERS]

    def score(self, docs: list[dict], answers: list[list]) -> TaskResult:
        samples, by_subject = [], {}
        for doc, choices in zip(docs, answers):
            lls = [ll for ll, _ in choices]
            pred = max(range(len(lls)), key=lls.__getitem__)  # first of equals, as numpy's argmax
            acc = float(pred == doc["answer"])
            samples.append(
                {
                    "subject": doc["subject"],
                    "loglikelihoods": lls,
                    "pred": pred,
                    "answer": doc["answer"],
                    "acc": acc,
                }
            )
            by_subject.setdefault(doc["subject"], []).append(acc)
        per_subject = {s: sum(v) / len(v) for s, v in sorted(by_subject.items())}
        metrics = {
            "acc": sum(s["acc"] for s in samples) / max(len(samples), 1),  # micro: over questions
            "acc_macro": sum(per_subject.values()) / max(len(per_subject), 1),  # mean over subjects
            "questions": len(samples),
            "subjects": len(per_subject),
        }
        return TaskResult(metrics, samples, {"acc_by_subject": per_subject})
