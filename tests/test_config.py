import pytest

from memlens.config import LoraConfig, RunConfig, load_config, parse_overrides
from memlens.errors import MemlensError

ISSUE_YAML = """
model: smollm2-135m
data:
  source: phee
  path: ../shared/data/phee
  members: {split: train, n: 640}
  nonmembers: {split: test, n: 640}
  canary: {repeats: 1}
lora:
  targets: [v]
  rank: 1
  alpha: 16
  alpha_rule: fixed
  dropout: 0.05
train:
  epochs: 3
  batch_size: 16
  grad_accum: 1
  lr: 1.0e-3
  warmup_steps: 20
  seed: 0
  dtype: float32
"""


def test_issue_config_loads_as_written_and_overrides_apply(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(ISSUE_YAML)
    cfg = load_config(p, ["data.members.n=256", "train.epochs=1", "lora.rank=8", "lora.targets=[q, v]"])
    assert cfg.model == "smollm2-135m"
    assert cfg.data.members.n == 256 and cfg.data.members.split == "train"
    assert cfg.data.nonmembers.n == 640
    assert cfg.train.epochs == 1.0 and cfg.lora.rank == 8 and cfg.lora.targets == ["q", "v"]
    assert cfg.train.lr == 1e-3 and cfg.lora.alpha == 16.0


def test_unknown_key_is_refused_with_the_nearest_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(ISSUE_YAML.replace("  rank: 1", "  rnak: 1"))
    with pytest.raises(MemlensError, match=r"unknown key 'lora.rnak' \(did you mean 'lora.rank'\?\)"):
        load_config(p)
    with pytest.raises(MemlensError, match="unknown key 'train.epoch'"):
        load_config(None, ["train.epoch=2"])


def test_bad_values_name_the_field():
    with pytest.raises(MemlensError, match=r"lora\.rank: Input should be greater than or equal to 1 \(got 0\)"):
        load_config(None, ["lora.rank=0"])
    with pytest.raises(MemlensError, match=r"lora\.targets\.0"):
        load_config(None, ["lora.targets=[x]"])
    with pytest.raises(MemlensError, match="unknown source 'parquet:x'"):
        load_config(None, ["data.source=parquet:x"])
    with pytest.raises(MemlensError, match="expected key=value"):
        parse_overrides(["lora.rank"])


def test_yaml_error_names_the_line(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: tiny\nlora:\n  rank: [1\n")
    with pytest.raises(MemlensError, match=r"c\.yaml:\d+: invalid YAML"):
        load_config(p)


def test_falsy_overrides_are_applied():
    cfg = load_config(None, ["train.add_bos=false", "lora.dropout=0", "train.warmup_steps=0"])
    assert cfg.train.add_bos is False and cfg.lora.dropout == 0.0 and cfg.train.warmup_steps == 0


@pytest.mark.parametrize(
    "rule,rank,alpha,scale", [("fixed", 4, 16, 4.0), ("fixed", 1, 16, 16.0), ("proportional", 8, 16, 2.0),
                              ("rslora", 4, 16, 8.0)]
)
def test_alpha_rule_scaling_formula(rule, rank, alpha, scale):
    assert LoraConfig(rank=rank, alpha=alpha, alpha_rule=rule).scaling == pytest.approx(scale)


def test_config_hash_ignores_name_and_output_but_not_settings():
    a = RunConfig()
    assert a.config_hash() == RunConfig(name="x", output_dir="elsewhere").config_hash()
    assert a.config_hash() != RunConfig(lora={"rank": 2}).config_hash()
