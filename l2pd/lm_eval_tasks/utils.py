"""Dataset and scoring of the ``l2pd_word_problems`` lm-eval task (loaded by lm-eval from this folder)."""

from l2pd.demo.task import is_correct, split


def load(problems: int = 1000, **_):
    import datasets

    rows = [{"question": p.question, "answer": p.answer} for p in split("test", int(problems))]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def process_results(doc, results):
    return {"acc": float(is_correct(results[0], int(doc["answer"])))}
