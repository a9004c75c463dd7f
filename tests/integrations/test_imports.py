"""``riemix.integrations`` loads ``transformers`` only for the Trainer pieces, and ``riemix`` re-exports them lazily."""

from __future__ import annotations

import json
import subprocess
import sys

import riemix
import riemix.integrations

WATCHED = ("transformers", "riemix.integrations.trainer")


def _loaded_after(code: str) -> dict[str, bool]:
    """Which of ``WATCHED`` a fresh interpreter has imported after running ``code``."""
    probe = f"import json, sys\n{code}\nprint(json.dumps({{m: m in sys.modules for m in {WATCHED!r}}}))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_importing_the_package_and_its_light_modules_does_not_load_transformers():
    code = "import riemix.integrations.save, riemix.integrations.options\nriemix.RiemixOptions"
    assert _loaded_after(code) == {"transformers": False, "riemix.integrations.trainer": False}


def test_asking_for_the_trainer_loads_it():
    assert _loaded_after("import riemix\nriemix.RiemixTrainer") == {
        "transformers": True,
        "riemix.integrations.trainer": True,
    }


def test_riemix_re_exports_the_integration_names():
    for name in ("RiemixCallback", "RiemixOptions", "RiemixTrainer", "riemix_optimizer"):
        assert name in riemix.__all__ and name in dir(riemix)
        assert getattr(riemix, name) is getattr(riemix.integrations, name)
    assert set(riemix.integrations.__all__) <= set(dir(riemix.integrations))
