"""The plays_cloze task's data (lm-evaluation-harness ``custom_dataset``): a line of verse from a
Shakespeare play and four lines, one of them the line the speaker says next, the others from
elsewhere in the same play. The items come from the plays that tfuse's ``plays`` data holds out
for test (data.test_docs=2, seed 0), so that a model trained there has not read them; they are
read from plays_cloze.jsonl beside this file, whatever the working directory.

``python configs/lm_eval/plays_cloze.py`` writes plays_cloze.jsonl again (deterministic)."""
from __future__ import annotations

import json
import random
from pathlib import Path

DATA = Path(__file__).with_name("plays_cloze.jsonl")
PER_PLAY, CHOICES, MIN_CHARS = 8, 4, 25


def load(**_metadata):
    """The items as a ``test`` split (lm-eval passes the task's metadata; none is needed)."""
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_json(str(DATA))})


def items() -> list[dict]:
    """PER_PLAY items from each test play: two consecutive lines of one speech (each at least
    MIN_CHARS long), the second shuffled among CHOICES - 1 other lines of the play (seeded by the
    play's name)."""
    from tfuse.data.corpora import read_plays, split_by_label

    out = []
    for play in split_by_label(read_plays(), val=1, test=2, seed=0).test:
        speeches = [block.splitlines()[1:] for block in play.text.split("\n\n") if block.splitlines()[0].isupper()]
        said = [[line.strip() for line in s] for s in speeches]
        pairs = [(s[i], s[i + 1]) for s in said for i in range(len(s) - 1) if min(map(len, s[i:i + 2])) >= MIN_CHARS]
        lines = sorted({line for s in said for line in s if len(line) >= MIN_CHARS})
        rng = random.Random(play.name)
        for context, following in rng.sample(pairs, PER_PLAY):
            choices = [following, *rng.sample([x for x in lines if x not in (context, following)], CHOICES - 1)]
            rng.shuffle(choices)
            out.append({"play": play.name, "context": context, "choices": choices, "gold": choices.index(following)})
    return out


if __name__ == "__main__":
    DATA.write_text("".join(json.dumps(item) + "\n" for item in items()), encoding="utf-8")
