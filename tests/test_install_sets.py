from __future__ import annotations

import sys

from runner import install_sets


def test_mismatches_name_each_package(monkeypatch):
    monkeypatch.setitem(install_sets.SETS, "probe", {"about": "", "pip": [], "expect": {
        "pytest": ">=1", "jsonschema": "<1", "surely-not-installed-pkg": "==1.0"}})
    problems = install_sets.mismatches("probe")
    assert len(problems) == 2
    assert problems[0].startswith("jsonschema ") and problems[0].endswith("the set wants <1")
    assert problems[1] == "surely-not-installed-pkg is not installed (wanted ==1.0); run `recipe install probe`"


def test_every_set_installs_with_this_python_and_pins_the_checked_versions():
    for name in ("cpu", "gpu", "colab-a100"):
        for command in install_sets.commands(name):
            assert command[:4] == [sys.executable, "-m", "pip", "install"]
    assert install_sets.SETS["cpu"]["expect"]["trl"] == "==1.16.0"  # 1.15.0 crashes on CPU with triton present
    for name in ("gpu", "colab-a100"):
        expect = install_sets.SETS[name]["expect"]
        assert expect["trl"] == "==1.15.0" and expect["transformers"] == "==5.17.0" and expect["torch"] == "<2.15"
