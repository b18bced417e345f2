"""A worked example, and a notebook template: multiple-choice accuracy by log-likelihood.

    python scripts/eval_example.py                   # the embedded default model (LLM())
    python scripts/eval_example.py --model DIR       # any model directory

Each question of tests/data/mc_eval.jsonl has a context and 3-4 choices. The model's answer
is the choice it finds most likely after the context, as lm-evaluation-harness scores
multiple choice:

- acc: argmax of the summed log-likelihood of each choice;
- acc_norm: argmax of the log-likelihood divided by the choice's length in characters, so
  long choices are not penalised for their length.

Every (context, choice) pair is scored in one batched LLM.score call. Each `# %%` cell below
runs on its own in a notebook.
"""

# %% Imports and arguments
from __future__ import annotations

import argparse
import json
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "mc_eval.jsonl"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model directory (default: LLM()'s)")
    parser.add_argument("--data", default=str(DATA), help="questions (JSONL)")
    parser.add_argument("--show", action="store_true", help="print every question's scores")
    return parser.parse_args(argv)


# %% Load the questions: {"id", "question", "context", "choices": [...], "answer": index}
def load_questions(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as file:
        return [json.loads(line) for line in file if line.strip()]


# %% Score every choice of every question in one batch
def score_questions(llm, questions: list[dict]) -> list[list]:
    """Per question, one ScoreResult per choice."""
    pairs = [(q["context"], choice) for q in questions for choice in q["choices"]]
    results = iter(llm.score(pairs))   # shows a progress bar
    return [[next(results) for _ in q["choices"]] for q in questions]


# %% Accuracy
def accuracy(questions: list[dict], scores: list[list], show: bool = False) -> dict[str, float]:
    hits = {"acc": 0, "acc_norm": 0}
    for question, results in zip(questions, scores):
        logprobs = [result.logprob for result in results]
        normalised = [lp / len(choice) for lp, choice in zip(logprobs, question["choices"])]
        picked = max(range(len(logprobs)), key=logprobs.__getitem__)
        picked_norm = max(range(len(normalised)), key=normalised.__getitem__)
        hits["acc"] += picked == question["answer"]
        hits["acc_norm"] += picked_norm == question["answer"]
        if show:
            mark = "ok " if picked == question["answer"] else "   "
            print(f"{mark}{question['id']:<12} picked {question['choices'][picked]!r:<24} "
                  f"logprobs {', '.join(f'{lp:.2f}' for lp in logprobs)}")
    return {name: count / len(questions) for name, count in hits.items()}


# %% Run it
def main(argv: list[str] | None = None) -> dict[str, float]:
    from engine import LLM

    args = parse_args(argv)
    questions = load_questions(args.data)
    llm = LLM(args.model, warmup=False)   # compile only the shapes scoring uses
    scores = score_questions(llm, questions)
    metrics = accuracy(questions, scores, show=args.show)
    chance = sum(1 / len(q["choices"]) for q in questions) / len(questions)
    print(f"{len(questions)} questions: acc {metrics['acc']:.3f}, acc_norm "
          f"{metrics['acc_norm']:.3f} (chance {chance:.3f})")
    return metrics


if __name__ == "__main__":
    main()
