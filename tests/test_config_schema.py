"""The whole DeepSpeed config of a qft_ds run is checked at load: every bad value named by key and file, nothing
coerced (issue 18, item 9). Each case below was a traceback without the key, or silently accepted."""
import json
import math
import re
from pathlib import Path

import pytest

from qft_ds.config import QFTConfig, load_ds_config
from qft_ds.config_schema import known_top_level_keys

ROOT = Path(__file__).resolve().parents[1]


def qft_config() -> dict:
    return json.loads((ROOT / "ds_configs" / "qft.json").read_text())


def setting(path: str, value):
    def edit(cfg):
        *parents, last = path.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        node[last] = value
    return edit


def renaming(path: str, new: str):
    def edit(cfg):
        *parents, last = path.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        node[new] = node.pop(last)
    return edit


BAD = {  # edit of ds_configs/qft.json -> what the error must say
    "lr string": (setting("optimizer.params.lr", "abc"), r"'optimizer\.params\.lr' must be a valid number, got 'abc'"),
    "lr NaN": (setting("optimizer.params.lr", math.nan), r"'optimizer\.params\.lr' must be a finite number"),
    "lr 1e999": (setting("optimizer.params.lr", math.inf), r"'optimizer\.params\.lr' must be a finite number"),
    "betas one": (setting("optimizer.params.betas", [0.9]), r"'optimizer\.params\.betas' must have at least 2 items, got \[0\.9\]"),
    "betas above 1": (setting("optimizer.params.betas", [0.9, 1.5]), r"'optimizer\.params\.betas\.1' must be less"),
    "weight_decay string": (setting("optimizer.params.weight_decay", "0.1"),
                            r"'optimizer\.params\.weight_decay' must be a valid number.*remove the quotes"),
    "qft list": (setting("qft", ["method", "qft"]), r"'qft' must be a JSON object"),
    "qft bad choice": (setting("qft.rounding", "nearest"), r"'qft\.rounding' must be one of sr, ef, rtn"),
    "gas string": (setting("gradient_accumulation_steps", "2"),
                   r"'gradient_accumulation_steps' must be a valid integer, got '2' \(a JSON string"),
    "gas zero": (setting("gradient_accumulation_steps", 0), r"'gradient_accumulation_steps' must be greater than or "
                                                            r"equal to 1, got 0"),
    "micro batch float": (setting("train_micro_batch_size_per_gpu", 4.0), r"'train_micro_batch_size_per_gpu' must "
                                                                         r"be a valid integer"),
    "bf16 string false": (setting("bf16.enabled", "false"), r"'bf16\.enabled' is the string 'false': write false "
                                                            r"without quotes"),
    "bf16 not an object": (setting("bf16", True), r"'bf16' must be a JSON object, got True"),
    "string boolean elsewhere": (setting("wall_clock_breakdown", "true"), r"'wall_clock_breakdown' is the string"),
    "top-level typo": (renaming("gradient_clipping", "gradient_cliping"),
                       r"unknown key 'gradient_cliping'; did you mean 'gradient_clipping'\?"),
    "optimizer.param": (renaming("optimizer.params", "param"),
                        r"unknown key 'optimizer\.param'; did you mean 'optimizer\.params'\?"),
    "optimizer not an object": (setting("optimizer", "QFTLion"), r"'optimizer' must be a JSON object"),
    "optimizer without type": (lambda cfg: cfg["optimizer"].pop("type"), r"'optimizer\.type' is missing"),
    "clipping negative": (setting("gradient_clipping", -1), r"'gradient_clipping' must be greater than or equal "
                                                            r"to 0, got -1"),
    "clipping NaN": (setting("gradient_clipping", math.nan), r"'gradient_clipping' must be a finite number"),
    "total_num_steps negative": (setting("scheduler.params.total_num_steps", -5),
                                 r"'scheduler\.params\.total_num_steps' must be greater than or equal to 1, got -5"),
    "total_num_steps zero": (setting("scheduler.params.total_num_steps", 0), r"'scheduler\.params\.total_num_steps' must be greater"),
    "warmup negative": (setting("scheduler.params.warmup_num_steps", -1), r"'scheduler\.params\.warmup_num_steps'"),
    "scheduler param typo": (renaming("scheduler.params.warmup_num_steps", "warmup_num_step"),
                             r"unknown key 'scheduler\.params\.warmup_num_step'; did you mean "
                             r"'scheduler\.params\.warmup_num_steps'\?"),
    "scheduler unknown": (setting("scheduler.type", "Cosine"), r"'scheduler\.type' 'Cosine' is neither"),
    "zero stage string": (setting("zero_optimization", {"stage": "1"}), r"'zero_optimization\.stage' must be a valid "
                                                                        r"integer"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_value_is_named_with_its_file(case, tmp_path):
    edit, message = BAD[case]
    cfg = qft_config()
    edit(cfg)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: {message}"):
        load_ds_config(str(path))
    with pytest.raises(ValueError, match=rf"^DeepSpeed config: {message}"):  # a dict (qft_ds.initialize, HF)
        load_ds_config(cfg)


def test_a_config_that_is_not_an_object(tmp_path):
    path = tmp_path / "list.json"
    path.write_text(json.dumps([qft_config()]))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: the config must be a JSON object, got a list"):
        load_ds_config(str(path))


def test_a_duplicate_key_is_refused(tmp_path):
    path = tmp_path / "dup.json"
    path.write_text('{"optimizer": {"type": "QFTLion", "params": {"lr": 1e-5, "lr": 1e-3}}}')
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: key 'lr' appears twice"):
        load_ds_config(str(path))


def test_a_binary_config_file_is_named(tmp_path):
    path = tmp_path / "bin.json"
    path.write_bytes(b'{"qft": {}}\xff\xfe')
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: not UTF-8 text \(byte 11\)"):
        load_ds_config(str(path))


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "ds_configs").glob("*.json")))
def test_every_shipped_config_loads(name):
    ds = load_ds_config(str(ROOT / "ds_configs" / name))  # qft_hf.json's "auto" values: HF resolves them
    assert ds == json.loads((ROOT / "ds_configs" / name).read_text())


def test_known_keys_come_from_deepspeeds_parser():
    keys = known_top_level_keys()
    # sections DeepSpeed parses (some only under a condition), and ours
    for key in ("zero_optimization", "activation_checkpointing", "tensorboard", "autotuning", "bfloat16",
                "data_types", "qft"):
        assert key in keys
    assert "gradient_cliping" not in keys and "params" not in keys  # a nested key is not a top-level one


def test_deepspeed_configs_without_qft_pass_through():
    """The wrapped deepspeed.initialize reads every config: one that does not select qft_ds is DeepSpeed's."""
    cfg = {"train_batch_size": "8", "optimizer": {"type": "AdamW", "param": {}}, "my_key": 1}
    assert load_ds_config(cfg) == cfg


def test_qft_section_as_a_list_is_named():
    with pytest.raises(ValueError, match=r"^'qft' must be a JSON object, got \['method'\]"):
        QFTConfig.from_dict(["method"])
