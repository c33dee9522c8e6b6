import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

# Offline always: a hub lookup would retry for ~47 s before failing. HF_HOME goes to a temp dir
# so tests never read or write the user's cache; the session removes the dir it made.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
if "HF_HOME" not in os.environ:
    os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="gill-hf-test-home-")
    atexit.register(shutil.rmtree, os.environ["HF_HOME"], ignore_errors=True)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).parent))  # tests import their tiny builders by module name


import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent / "parity"))
import recipe  # noqa: E402  (the parity fixture's recipe: seeded tensors in the reference's layout)


@pytest.fixture(scope="session")
def fixture_paths(tmp_path_factory):
    """The parity fixture (4096-wide 2-layer OPT, tiny CLIP, tiny SD, original-format GILL folder),
    built once per session from seeded numpy streams (~10 s, ~0.6 GB on disk)."""
    return recipe.build_fixture(str(tmp_path_factory.mktemp("gill_fixture")), n_layers=2, seed=0, with_sd=True)


@pytest.fixture(scope="session")
def converted(fixture_paths, tmp_path_factory):
    """The fixture's original checkpoint converted to this package's adapter form."""
    from gill_hf.convert_original import convert_original

    out = tmp_path_factory.mktemp("converted") / "gill"
    convert_original(fixture_paths["gill_ckpt"], out, text_model=fixture_paths["opt"], vision_model=fixture_paths["clip"])
    return out
