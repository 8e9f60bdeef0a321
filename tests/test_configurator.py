import pytest

from configurator import UserError, configure

DEFAULTS = {"learning_rate": 1e-3, "batch_size": 8, "compile": False, "init_from": "scratch",
            "loss_weights": [1.0, 1.0], "rope_scaling": None}


def test_overrides_keep_types():
    c = configure(DEFAULTS, ["--learning_rate=1", "--batch_size=4", "--compile=True",
                             "--init_from=out/a=b", "--loss_weights=[0.5,1]"])
    assert c.learning_rate == 1.0 and isinstance(c.learning_rate, float)  # an int fills a float
    assert c.batch_size == 4 and c.compile is True
    assert c.init_from == "out/a=b"  # split on the first '='
    assert c.loss_weights == [0.5, 1]


def test_string_settings_keep_their_text():
    c = configure(DEFAULTS, ["--init_from=1,2", "--batch_size=3"])
    assert c.init_from == "1,2"   # not the tuple literal_eval would make of it
    c = configure(DEFAULTS, ["--init_from=[1]"])
    assert c.init_from == "[1]"


def test_unknown_key_names_closest():
    with pytest.raises(UserError, match="did you mean 'learning_rate'"):
        configure(DEFAULTS, ["--learnig_rate=0.1"])


def test_unknown_key_in_file(tmp_path):
    f = tmp_path / "c.py"
    f.write_text("import math\nbatch_size = 2\nbatch_sise = 3\n")
    with pytest.raises(UserError, match=r"c.py: unknown config key 'batch_sise'.*batch_size"):
        configure(DEFAULTS, [str(f)])


def test_file_then_cli_and_wrong_type(tmp_path):
    f = tmp_path / "c.py"
    f.write_text("batch_size = 2\nlearning_rate = 3e-4\n")
    c = configure(DEFAULTS, [str(f), "--batch_size=5"])
    assert (c.batch_size, c.learning_rate) == (5, 3e-4)
    with pytest.raises(UserError, match="should be int"):
        configure(DEFAULTS, ["--batch_size=2.5"])


def test_help_prints_every_key_with_its_default_and_comment():
    import io
    import re
    import generate
    import prepare
    import train
    from conftest import run_script
    from configurator import defaults_from, print_help
    for mod in (train, generate, prepare):
        out = io.StringIO()
        print_help(mod.__file__, defaults_from(vars(mod)), file=out)
        keys = re.findall(r"^  --(\w+)=", out.getvalue(), flags=re.M)
        assert sorted(keys) == sorted(defaults_from(vars(mod))), mod.__name__   # each key once
    p = run_script("train.py", "--help")
    assert p.returncode == 0 and '--mode="sft"' in p.stdout and "sft | refine | interleaved | diffusion" in p.stdout
    assert "# adapters" in p.stdout and "(0: one full canvas, LLaDA)" in p.stdout   # group titles, second comment lines
