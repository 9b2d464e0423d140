"""The shipped ISO-dates dataset: regenerated identically, held-out split disjoint, answers checkable."""

import datetime
import json

from peft_alora.data import iso_dates


def test_shipped_files_are_what_the_script_generates():
    generated = iso_dates.generate()
    for split, size in iso_dates.SIZES.items():
        lines = (iso_dates.DATASET_DIR / f"{split}.jsonl").read_text().splitlines()
        assert [json.loads(line) for line in lines] == generated[split] and len(lines) == size


def test_splits_are_disjoint_and_answers_are_valid_iso_dates():
    dataset = iso_dates.load_iso_dates()
    answers = {split: [row["completion"][0]["content"] for row in dataset[split]] for split in dataset}
    assert set(answers) == {"train", "test"} and not set(answers["train"]) & set(answers["test"])
    for answer in answers["train"] + answers["test"]:
        assert isinstance(answer, str)  # not turned into a timestamp on the way
        assert datetime.date.fromisoformat(answer).isoformat() == answer


def test_exact_match_ignores_only_surrounding_blanks():
    assert iso_dates.exact_match(" 2003-05-29\n", "2003-05-29")
    assert not iso_dates.exact_match("The date is 2003-05-29.", "2003-05-29")
    assert not iso_dates.exact_match("2003-5-29", "2003-05-29")
