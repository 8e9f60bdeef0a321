"""Every config file is valid for the script it belongs to (no unknown keys, right types, no\nsettings that contradict each other)."""
import glob
import os

import pytest
from conftest import ROOT

import prepare
import train
from configurator import configure, defaults_from

CONFIGS = sorted(glob.glob(os.path.join(ROOT, "config", "*.py")))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_is_valid(path, monkeypatch):
    monkeypatch.chdir(ROOT)   # configs exec their parents by relative path
    module = prepare if os.path.basename(path).startswith("prepare") else train
    c = configure(defaults_from(vars(module)), [path])
    if module is train:   # and its settings go together (the cross-flag checks a run makes first)
        assert c.data_dir and c.out_dir
        train.check(c, 1)
