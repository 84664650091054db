"""GSM8K, 8-shot chain of thought, exact match on the final number: lm-eval's `gsm8k_cot`
(lm_eval/tasks/gsm8k/gsm8k-cot.yaml): the same 8 worked examples, greedy generation until "Q:", and
its two answer filters: `strict` reads "The answer is N.", `flexible` the last number written."""

from __future__ import annotations

import json
import re
from pathlib import Path

from moray.jobs.eval.requests import Generate
from moray.jobs.eval.tasks import TaskResult

FILE = "gsm8k-test.jsonl"
UNTIL = ("Q:", "</s>", "<|im_end|>")
SHOTS = (  # gsm8k-cot.yaml's fewshot_config.samples (Wei et al.'s chain-of-thought exemplars)
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, there will be 21 trees. How many trees did the grove workers plant today?",
     "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have been 21 - 15 = 6. The answer is 6."),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
     "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5."),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
     "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, they had 74 - 35 = 39. The answer is 39."),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did Jason give to Denny?",
     "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8. The answer is 8."),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have now?",
     "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + 4 = 9. The answer is 9."),
    ("There were nine computers in the server room. Five more computers were installed each day, from monday to thursday. How many computers are now in the server room?",
     "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 computers were added. 9 + 20 is 29. The answer is 29."),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf balls did he have at the end of wednesday?",
     "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, he had 35 - 2 = 33 golf balls. The answer is 33."),
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
     "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars left. 23 - 15 is 8. The answer is 8."),
)  # fmt: skip
STRICT = re.compile(r"The answer is (\-?[0-9\.\,]+).")
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
IGNORE = (",", r"\$", r"(?s).*#### ", r"\.$")  # the metric's regexes_to_ignore, on both sides
INVALID = "[invalid]"


def prompt(question: str) -> str:
    shots = "".join(f"Q: {q}\nA: {a}\n\n" for q, a in SHOTS)
    return f"{shots}Q: {question}\nA:"


def target(answer: str) -> str:
    return answer.split("####")[-1].strip()


def extract(text: str) -> dict[str, str]:
    """lm-eval's two filters: strict takes the first "The answer is N." match, flexible the last
    number (of a match's groups, the first non-empty one)."""
    strict = STRICT.findall(text)
    flexible = FLEXIBLE.findall(text)
    last = next((g for g in flexible[-1] if g), INVALID) if flexible else INVALID
    return {"strict": strict[0].strip() if strict else INVALID, "flexible": last.strip()}


def normalize(s: str) -> str:
    for pattern in IGNORE:
        s = re.sub(pattern, "", s)
    return s.lower()  # ignore_case


class GSM8K:
    name = "gsm8k"
    kind = "generate"
    files = (FILE,)
    max_tokens = 256  # lm-eval's default max_gen_toks

    def load(self, data_dir: Path, limit: int | None) -> list[dict]:
        docs = []
        with open(Path(data_dir) / FILE, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if limit is not None and len(docs) >= limit:
                    break
                doc = json.loads(line)
                if "question" not in doc or "answer" not in doc:
                    raise ValueError(f"{FILE}, line {i + 1}: expected fields question and answer")
                docs.append(doc)
        return docs

    def requests(self, doc: dict) -> list:
        return [Generate(prompt(doc["question"]), UNTIL, self.max_tokens)]

    def score(self, docs: list[dict], answers: list[list]) -> TaskResult:
        samples = []
        for doc, (completions,) in zip(docs, answers):
            text = completions[0]
            found = extract(text)
            gold = normalize(target(doc["answer"]))
            sample = {"completion": text, "target": target(doc["answer"])}
            for name, value in found.items():
                sample[f"answer_{name}"] = value
                sample[f"exact_match_{name}"] = float(normalize(value) == gold)
            samples.append(sample)
        n = max(len(samples), 1)
        metrics = {
            "exact_match_strict": sum(s["exact_match_strict"] for s in samples) / n,
            "exact_match_flexible": sum(s["exact_match_flexible"] for s in samples) / n,
            "questions": len(samples),
        }
        return TaskResult(metrics, samples)
