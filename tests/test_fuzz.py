"""Fuzzing the readers of user files: every input ends in a correct load or one UserError.

Run with ``pytest tests/test_fuzz.py --hypothesis-show-statistics`` to see how many cases ran.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import write_jsonl
from softprompt.adapters import CONFIG_FILE, TENSOR_NAME, WEIGHTS_FILE, load_adapter
from softprompt.data import load_texts
from softprompt.errors import UserError

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=6,
)
# Configs near a real one: mostly a loadable type, the other keys with values of any JSON type,
# plus stray keys.
configs = st.fixed_dictionaries(
    {"peft_type": st.sampled_from(["PROMPT_TUNING", "P_TUNING"]) | json_values},
    optional={
        "task_type": st.sampled_from(["CAUSAL_LM", "SEQ_2_SEQ_LM", None]) | json_values,
        "num_virtual_tokens": st.integers(-2, 6) | json_values,
        "token_dim": st.integers(-1, 6) | json_values,
        "num_transformer_submodules": st.integers(0, 3) | json_values,
    },
).flatmap(
    lambda base: st.dictionaries(st.text(max_size=6), json_values, max_size=2).map(
        lambda extra: {**extra, **base}
    )
)
shapes = st.lists(st.integers(0, 5), min_size=2, max_size=2) | st.lists(
    st.integers(0, 5), max_size=3
)
dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool])


def _folder() -> Path:
    return Path(tempfile.mkdtemp(prefix="fuzz-adapter-"))


def _check_adapter(folder: Path) -> bool:
    """Whether ``folder`` loaded (checking what it gave), or False for a clear refusal."""
    try:
        adapter = load_adapter(folder)
    except UserError as exc:
        assert str(exc).strip()
        return False
    # A load that succeeds gives rows a model can use, agreeing with the config.
    weights = adapter.weights
    assert weights.ndim == 2 and weights.shape[0] > 0 and weights.shape[1] > 0
    assert weights.dtype == torch.float32 and bool(torch.isfinite(weights).all())
    config = json.loads((folder / CONFIG_FILE).read_text())
    assert config["peft_type"] in ("PROMPT_TUNING", "P_TUNING")
    assert config.get("num_virtual_tokens") in (None, weights.shape[0])
    assert config.get("token_dim") in (None, weights.shape[1])
    assert config.get("num_transformer_submodules") in (None, 1)
    return True


def _loads_a_share(outcomes: list[bool], share: float) -> None:
    """A reader that refused everything would pass the checks above: so the generated cases
    that are valid must load (at least ``share`` of all cases here)."""
    assert outcomes and sum(outcomes) >= share * len(outcomes), (sum(outcomes), len(outcomes))


def test_adapter_reader_on_any_config_and_tensor():
    from safetensors.torch import save_file

    outcomes: list[bool] = []

    @FUZZ
    @given(
        config=configs,
        shape=shapes,
        dtype=dtypes,
        special=st.sampled_from(["", "nan", "inf"]),
        valid=st.booleans(),
    )
    def case(config, shape, dtype, special, valid):
        if valid:  # made loadable: a config and tensor that agree, the stray keys kept
            shape = [max(1, shape[0] if shape else 1), 3]
            dtype, special = torch.float32, ""
            config = {**config, "peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM"}
            config.update(num_virtual_tokens=shape[0], token_dim=3, num_transformer_submodules=1)
        folder = _folder()
        try:
            (folder / CONFIG_FILE).write_text(json.dumps(config))
            tensor = torch.zeros(shape, dtype=dtype) if shape else torch.tensor(1.0, dtype=dtype)
            if special and tensor.dtype.is_floating_point and tensor.numel():
                tensor.view(-1)[0] = float(special)
            save_file({TENSOR_NAME: tensor}, str(folder / WEIGHTS_FILE))
            loaded = _check_adapter(folder)
            assert loaded or not valid, config
            outcomes.append(loaded)
        finally:
            shutil.rmtree(folder)

    case()
    _loads_a_share(outcomes, 0.1)


@FUZZ
@given(config_bytes=st.binary(max_size=200), weight_bytes=st.binary(max_size=300))
def test_adapter_reader_on_random_bytes(config_bytes, weight_bytes):
    folder = _folder()
    try:
        (folder / CONFIG_FILE).write_bytes(config_bytes)
        (folder / WEIGHTS_FILE).write_bytes(weight_bytes)
        _check_adapter(folder)
        # The same random weights under a valid config.
        (folder / CONFIG_FILE).write_text(json.dumps({"peft_type": "PROMPT_TUNING"}))
        _check_adapter(folder)
    finally:
        shutil.rmtree(folder)


@FUZZ
@given(
    header=st.dictionaries(st.text(max_size=12), json_values, max_size=3),
    tail=st.binary(max_size=64),
)
def test_adapter_reader_on_broken_safetensors_headers(header, tail):
    folder = _folder()
    try:
        (folder / CONFIG_FILE).write_text(json.dumps({"peft_type": "PROMPT_TUNING"}))
        raw = json.dumps(header).encode()
        (folder / WEIGHTS_FILE).write_bytes(len(raw).to_bytes(8, "little") + raw + tail)
        _check_adapter(folder)
    finally:
        shutil.rmtree(folder)


def _check_texts(path: Path, field: str | None) -> bool:
    try:
        texts = load_texts(str(path), field)
    except UserError as exc:
        assert str(exc).strip()
        return False
    assert texts.texts and all(isinstance(t, str) and t.strip() for t in texts.texts)
    return True


DATA = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@DATA
@given(
    suffix=st.sampled_from([".jsonl", ".json", ".csv", ".txt", ".parquet"]),
    content=st.binary(max_size=200),
    field=st.none() | st.sampled_from(["text", "quote"]),
)
def test_data_loader_on_random_bytes(tmp_path_factory, suffix, content, field):
    path = tmp_path_factory.mktemp("fuzz-data") / f"data{suffix}"
    path.write_bytes(content)
    _check_texts(path, field)


def test_data_loader_on_wrong_json_types(tmp_path_factory):
    outcomes: list[bool] = []
    texts = st.text(min_size=1, max_size=8).filter(str.strip)

    @DATA
    @given(
        rows=st.lists(
            st.dictionaries(st.sampled_from(["text", "quote", "n"]), json_values | texts),
            max_size=4,
        ),
        field=st.none() | st.sampled_from(["text", "quote"]),
        as_lines=st.booleans(),
    )
    def case(rows, field, as_lines):
        folder = tmp_path_factory.mktemp("fuzz-json")
        if as_lines:
            path = folder / "data.jsonl"
            write_jsonl(path, rows)
        else:
            path = folder / "data.json"
            path.write_text(json.dumps(rows))
        outcomes.append(_check_texts(path, field))

    case()
    _loads_a_share(outcomes, 0.05)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".txt", ".parquet"])
def test_empty_data_files_are_user_errors(tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    path.write_bytes(b"")
    with pytest.raises(UserError):
        load_texts(str(path))
