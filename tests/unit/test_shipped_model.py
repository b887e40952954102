"""The detector the fleet runs by default ships in the checkout, small, with a model card that matches it."""

from __future__ import annotations

import hashlib

from consumer.detector import DetectorConfig, load_detector
from detfleet import synth
from shared.settings import ConsumerSettings, shipped_model_path

MAX_BYTES = 5 * 1024 * 1024


def test_the_consumer_runs_the_shipped_model_by_default() -> None:
    path = ConsumerSettings().model_path
    assert path == shipped_model_path()
    assert path.is_file(), f"{path} is missing: run `make train` or restore models/"
    assert path.stat().st_size <= MAX_BYTES


def test_the_model_card_names_the_file_hash_and_the_classes() -> None:
    path = shipped_model_path()
    card = (path.parent / "README.md").read_text()
    assert hashlib.sha256(path.read_bytes()).hexdigest() in card
    for name in synth.CLASS_NAMES:
        assert name in card


def test_the_shipped_model_names_the_generator_classes_and_takes_any_batch() -> None:
    info = load_detector(DetectorConfig(model_path=shipped_model_path(), device="cpu")).info
    assert info.class_names == synth.CLASS_NAMES
    assert info.batch_size is None
    assert info.input_size == (320, 320)
