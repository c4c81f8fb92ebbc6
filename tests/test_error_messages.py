"""User-facing errors name the thing that is wrong: a missing model folder is the model path (not the
tokenizer's), and a malformed JSONL row is reported at its line of the file only."""

import pytest

from mtrl.training.trainer_base import open_run
from mtrl.training.training_config import load_config
from mtrl.utils.dataset import DatasetError, _Table
from mtrl.utils.errors import UserError


def test_a_wrong_model_path_is_reported_as_the_model_path(tmp_path):
    missing = tmp_path / "no_such_model"
    config = load_config(["dataset.train_files=x.jsonl", f"training.save_checkpoint_path={tmp_path / 'run'}",
                          f"worker.actor.model.model_path={missing}"])
    with pytest.raises(UserError) as raised:
        open_run(config)
    assert str(raised.value).startswith(f"Model path '{missing}' does not exist"), str(raised.value)


def test_a_malformed_json_line_names_its_file_line_and_column(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "a", "answer": "1"}\n\n{"prompt": "b", "answer": }\n')
    with pytest.raises(DatasetError) as raised:
        _Table(str(rows))
    message = str(raised.value)
    assert message.startswith(f"{rows}, line 3: invalid JSON at column 27: Expecting value"), message
    assert "line 1" not in message
