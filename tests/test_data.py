"""The asset loaders read the installed packages offline, the same way every time."""

from __future__ import annotations

import pytest

from lightning_peft.data import (
    BBC_TOPICS,
    bbc_headlines,
    package_folder,
    rotten_tomatoes,
    stratified_split,
)
from lightning_peft.errors import MissingAssetError


def test_a_missing_asset_names_the_package_and_the_install_command():
    with pytest.raises(
        MissingAssetError, match=r"'no_such_asset' is not installed.*requirements-assets\.txt"
    ):
        package_folder("no_such_asset")
    assert issubclass(MissingAssetError, ModuleNotFoundError)


def test_rotten_tomatoes_is_deduplicated_with_fresh_as_positive():
    rows = rotten_tomatoes()
    assert len(rows) == 12_752 and sum(label for _, label in rows) == 7_368
    assert len({text for text, _ in rows}) == len(rows)


def test_bbc_topics_are_numbered_in_sorted_order():
    rows = bbc_headlines()
    counts = [sum(1 for _, label in rows if label == i) for i in range(len(BBC_TOPICS))]
    assert counts == [510, 386, 417, 511, 401]  # business, entertainment, politics, sports, tech
    assert rows[0] == ("Ad sales boost Time Warner profit", 0)


def test_stratified_split_keeps_proportions_and_never_overlaps():
    rows = rotten_tomatoes()
    train, test = stratified_split(rows, 500, 200, seed=1)
    assert len(train) == 500 and len(test) == 200
    assert not {t for t, _ in train} & {t for t, _ in test}
    assert abs(sum(y for _, y in test) / 200 - 7_368 / 12_752) < 0.02
    assert stratified_split(rows, 500, 200, seed=1) == (train, test)  # reproducible
    with pytest.raises(ValueError, match="asked for 12752 \\+ 1 rows, only 12752 exist"):
        stratified_split(rows, 12_752, 1)
