"""Property-based tests (hypothesis): no unhandled exception reaches the user.

* The CLI: random argument lists for every subcommand, built from its real flags and hostile
  values, go through `fineprune.cli.main`. The heavy work behind each command (training, the
  defense, dataset loading, Ray) is replaced by a stub, so what runs for real is argument parsing
  and each command's own option checks (for `defend`: the config file and `DefendJob.validate`).
  Allowed outcomes: exit 0 (e.g. --help), 2 (bad input, with a `fineprune: error:` line last on
  stderr), or reaching the stub. Exit 1 (a traceback) is a bug.
* `load_npz` on random arrays of random dtypes and shapes: a dataset with finite float inputs and
  non-negative int64 labels, or BadInputError; nothing else.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fineprune.cli as cli
from fineprune.data.generic import MAX_LABEL, load_npz, load_wav_folder
from fineprune.errors import BadInputError

FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


class Reached(BadInputError):
    """Raised by the stubs: the command got past its checks to the real work."""


def _stub(*_args, **_kwargs):
    raise Reached("stub reached")


def _defend_stub(job, **_kwargs):
    job.validate()
    raise Reached("stub reached")


@pytest.fixture(scope="module", autouse=True)
def _sandbox(tmp_path_factory):
    """Stub out the heavy work and run from an empty folder so nothing real is read or written."""
    # import_module: the package `fineprune.pipeline` re-exports functions named like its modules.
    mod = importlib.import_module
    mp = pytest.MonkeyPatch()
    mp.setattr(mod("fineprune.pipeline.defend_files"), "defend_files", _defend_stub)
    mp.setattr(mod("fineprune.experiment.reproduce"), "run_reproduce", _stub)
    mp.setattr(mod("fineprune.experiment.demo"), "run_demo", _stub)
    mp.setattr(mod("fineprune.tasks"), "get_task", _stub)
    mp.setattr(mod("fineprune.grid"), "run_grid", _stub)
    mp.setattr(mod("fineprune.grid"), "summarize_only", _stub)
    mp.delenv("FINEPRUNE_DATA", raising=False)
    mp.chdir(tmp_path_factory.mktemp("fuzz-cwd"))
    yield
    mp.undo()


def _subcommands() -> dict[str, list[str]]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return {name: sorted({s for a in p._actions for s in a.option_strings}) for name, p in sub.choices.items()}


SUBCOMMANDS = _subcommands()

# Text a shell can pass (no NUL; no lone surrogates), plus values aimed at the number parsers.
_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)
_numbers = st.sampled_from(["0", "-1", "1", "2", "100", "101", "1e9", "-1e9", "1e999", "nan", "-inf", "inf",
                            "0.5", "-0.0", "3.", "0x10", "1_000", "", " ", "--", "-", "=", "task:", "task:mnist",
                            "fine-prune", "prune", "rgb", "grey", "sgd", "adam", "cpu", "cuda", "cuda:99",
                            "x" * 300, "a/" * 40, "/", ".", "..", "/dev/null", "~", "$HOME"])
_value = st.one_of(_numbers, _text, st.integers(-10**6, 10**6).map(str),
                   st.floats(allow_nan=True, allow_infinity=True).map(repr))


def _argv(name: str) -> st.SearchStrategy[list[str]]:
    flags = SUBCOMMANDS[name]
    token = st.one_of(st.sampled_from(flags), st.sampled_from(flags), _value,
                      st.tuples(st.sampled_from(flags), _value).map(lambda t: f"{t[0]}={t[1]}"))
    return st.lists(token, max_size=8).map(lambda rest: [name, *rest])


def _run(argv: list[str]) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(argv)
    return rc, err.getvalue()


def _check(argv: list[str]) -> None:
    rc, err = _run(argv)
    assert "Traceback" not in err, (argv, err)
    assert rc in (0, 2), (argv, rc, err)
    if rc == 2:
        assert err.strip().splitlines()[-1].startswith("fineprune: error:"), (argv, err)


def test_subcommands_are_known():
    assert {"defend", "demo", "reproduce", "train", "grid", "trigger-preview"} <= set(SUBCOMMANDS)


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
@FUZZ
@given(data=st.data())
def test_fuzz_subcommand_argv(name, data):
    _check(data.draw(_argv(name)))


@FUZZ
@given(argv=st.lists(st.one_of(_value, st.sampled_from(sorted(SUBCOMMANDS) + ["-v", "--verbose", "-h"])),
                     max_size=6))
def test_fuzz_top_level_argv(argv):
    _check(argv)


@pytest.mark.parametrize("argv", [
    ["defend", "--model", "m.pt", "--arch", "demo-cnn", "--data", "d.npz", "--out", "o", "--threshold", "nan"],
    ["defend", "--model", "m.pt", "--arch", "demo-cnn", "--data", "d.npz", "--out", "o", "--val-fraction", "inf"],
    ["defend", "--model", "m.pt", "--arch", "demo-cnn", "--data", "d.npz", "--out", "o", "--lr", "nan"],
    ["defend", "--model", "m.pt", "--arch", "demo-cnn", "--data", "d.npz", "--out", "o", "--std", "0", "--mean", "0"],
    ["defend", "--config", "x" * 300],
    ["defend", "--config", "/"],
    ["grid", "x" * 300],
    ["grid", "/"],
    ["reproduce", "--subsample", "nan"],
    ["demo", "--threshold", "nan"],
])
def test_known_hostile_argv(argv):
    _check(argv)


# --- load_npz ------------------------------------------------------------------------------------

_dtypes = st.one_of(hnp.integer_dtypes(), hnp.unsigned_integer_dtypes(), hnp.floating_dtypes(),
                    hnp.boolean_dtypes(), hnp.complex_number_dtypes(), st.just(np.dtype("U3")),
                    st.just(np.dtype("S2")), st.just(np.dtype("datetime64[s]")))


def _arrays(max_dims: int) -> st.SearchStrategy[np.ndarray]:
    return _dtypes.flatmap(lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=max_dims, min_side=0,
                                                                       max_side=5)))


def _check_loaded(path: Path) -> None:
    try:
        ds = load_npz(path)
    except BadInputError:
        return
    x, y = ds.tensors
    assert x.dtype.is_floating_point and bool(x.isfinite().all())
    assert y.dtype.is_signed and y.ndim == 1 and len(y) == len(x) and (len(y) == 0 or int(y.min()) >= 0)
    assert x.ndim == 4 or (x.ndim == 3 and x.shape[1] == 1)
    assert x.numel() > 0 and (len(y) == 0 or int(y.max()) <= MAX_LABEL)


@FUZZ
@given(x=_arrays(5), y=_arrays(2), extra=st.booleans())
def test_fuzz_load_npz(tmp_path, x, y, extra):
    path = tmp_path / "f.npz"
    arrays = {"x": x, "y": y}
    if extra:
        arrays["class_names"] = np.array(["a", "b"])
    np.savez(path, **arrays)
    _check_loaded(path)


@FUZZ
@given(n=st.integers(1, 6), y=st.one_of(
    hnp.arrays(st.sampled_from([np.uint64, np.int64, np.float64, np.float32, np.int8]), st.just(6))))
def test_fuzz_npz_labels(tmp_path, n, y):
    """Labels of every kind against a valid x: huge, negative, fractional, NaN."""
    path = tmp_path / "f.npz"
    np.savez(path, x=np.zeros((6, 4, 4), np.uint8), y=y)
    _check_loaded(path)


@FUZZ
@given(blob=st.binary(max_size=300), cut=st.integers(0, 400))
def test_fuzz_npz_bytes(tmp_path, blob, cut):
    """Random bytes, and truncations of a real .npz with random bytes appended."""
    path = tmp_path / "f.npz"
    path.write_bytes(blob)
    _check_loaded(path)
    good = io.BytesIO()
    np.savez(good, x=np.zeros((3, 4, 4), np.uint8), y=np.array([0, 1, 2]))
    path.write_bytes(good.getvalue()[:cut] + blob)
    _check_loaded(path)


def test_npz_zip_with_a_directory_member(tmp_path):
    path = tmp_path / "f.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x.npy/", b"")
        z.writestr("y.npy", b"not npy")
    _check_loaded(path)
    assert os.path.exists(path)


@pytest.mark.parametrize("argv_tail,name", [(["defend", "--config"], "c.toml"), (["defend", "--config"], "c.yaml"),
                                            (["grid"], "g.yaml")])
def test_config_file_not_utf8(tmp_path, argv_tail, name):
    path = tmp_path / name
    path.write_bytes(b"\xff\xfe\x00garbage")
    rc, err = _run([*argv_tail, str(path)])
    assert rc == 2 and "UTF-8" in err and "Traceback" not in err


def test_error_line_escapes_control_characters():
    rc, err = _run(["defend", "--model", "m\rx\ny.pt", "--arch", "demo-cnn", "--data", "d.npz", "--out", "o",
                    "--threshold", "-5"])
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "threshold" in err
    rc, err = _run(["defend", "bad\rvalue\n"])
    assert rc == 2 and err.strip().splitlines()[-1] == "fineprune: error: unrecognized arguments: bad\\rvalue\\n"


@pytest.mark.parametrize("y,needle", [
    (np.array([0, 1, 2**63 + 5], np.uint64), "beyond"),   # would wrap to a negative int64
    (np.array([0, 1, 2**40]), "beyond"),                  # would size a trillion-entry class list
    (np.array([0.0, 1.0, 1e300]), "non-integer"),          # float whole number beyond int64
    (np.array([0.0, 1.0, np.nan]), "non-integer"),
])
def test_npz_hostile_labels(tmp_path, y, needle):
    np.savez(tmp_path / "f.npz", x=np.zeros((3, 4, 4), np.uint8), y=y)
    with pytest.raises(BadInputError, match=needle):
        load_npz(tmp_path / "f.npz")


def test_npz_zero_size_sample(tmp_path):
    np.savez(tmp_path / "f.npz", x=np.zeros((3, 0, 4), np.uint8), y=np.arange(3))
    with pytest.raises(BadInputError, match="zero-size"):
        load_npz(tmp_path / "f.npz")


def test_wav_label_prefix_too_large(tmp_path):
    import wave

    for name in ("0_a.wav", "99999999999_b.wav"):
        with wave.open(str(tmp_path / name), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(8000)
            w.writeframes(b"\x00\x00" * 10)
    with pytest.raises(BadInputError, match="beyond"):
        load_wav_folder(tmp_path, length=16)
