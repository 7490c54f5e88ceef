"""The CLI's errors: one line and exit status 2 for every mistake of the user or the environment,
a traceback only for a real bug or with --debug."""

from __future__ import annotations

import errno
import pickle
import time

import pytest
import torch
from safetensors.torch import save_file

from secateurs.cli import main
from secateurs.demo.models import digits_mlp

MODEL = "secateurs.demo.models:digits_mlp"


def _one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert err.count("\n") == 1 and err.startswith("secateurs "), err
    for needle in needles:
        assert needle in err, err
    return err


def _prune(out, *extra: str) -> list[str]:
    return ["prune", MODEL, "--sparsity", "0.5", "--out", str(out), *extra]


def test_an_output_under_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(_prune(tmp_path / "file" / "out")) == 2
    _one_line_error(capsys, "Not a directory")


@pytest.mark.parametrize(
    ("code", "text"), [(errno.EROFS, "Read-only file system"), (errno.ENOSPC, "No space left on device")]
)
def test_a_read_only_or_full_output_location_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch, code, text):
    import safetensors.torch  # the CLI imports its writers when it writes (keeps --help fast)

    def fail(tensors, path, metadata=None):
        raise OSError(code, text, path)

    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    assert main(_prune(tmp_path / "out")) == 2
    _one_line_error(capsys, text)
    assert list(tmp_path.iterdir()) == []  # no output, no staging directory


def test_a_pickled_weights_file_is_refused_without_unpickling(tmp_path, capsys):
    weights = tmp_path / "w.bin"

    class Boom:
        def __reduce__(self):
            return (pytest.fail, ("the weights file was unpickled",))

    weights.write_bytes(pickle.dumps({"x": Boom()}))
    assert main(_prune(tmp_path / "out", "--weights", str(weights))) == 2
    _one_line_error(capsys, "not a readable safetensors file", "w.bin")


def test_weights_of_the_wrong_shape_are_one_line_naming_the_tensor(tmp_path, capsys):
    state = {k: v for k, v in digits_mlp().state_dict().items()}
    name = next(iter(state))
    state[name] = torch.zeros(3, 3)
    save_file(state, str(tmp_path / "w.safetensors"))
    assert main(_prune(tmp_path / "out", "--weights", str(tmp_path / "w.safetensors"))) == 2
    _one_line_error(capsys, "shape mismatch", name, "(3, 3)")


def test_a_bad_input_shape_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(_prune(tmp_path / "out", "--input-shape", "a,b"))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--input-shape" in err and "positive integers" in err and "Traceback" not in err


def test_a_data_module_that_does_not_import_is_one_line(tmp_path, capsys):
    assert main(_prune(tmp_path / "out", "--method", "wanda", "--data", "no_such_module_xyz:batches")) == 2
    _one_line_error(capsys, "--data", "no_such_module_xyz", "ModuleNotFoundError")


def test_a_missing_local_model_path_is_reported_at_once_without_the_hub(tmp_path, capsys):
    start = time.perf_counter()
    assert main(["prune", str(tmp_path / "models" / "nope"), "--sparsity", "0.5", "--out", str(tmp_path / "o")]) == 2
    assert time.perf_counter() - start < 5  # no hub retries
    err = _one_line_error(capsys, "does not exist")
    assert "hub" not in err


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(Exception, match="unknown method 'nope'"):
        main(["prune", MODEL, "--method", "nope", "--sparsity", "0.5", "--out", str(tmp_path / "o"), "--debug"])


def test_a_real_bug_still_shows_its_traceback(tmp_path, monkeypatch):
    import secateurs.api

    monkeypatch.setattr(secateurs.api, "prune", lambda *a, **k: [][0])
    with pytest.raises(IndexError):
        main(_prune(tmp_path / "out"))
